"""Per-row sampling for the serving engine: every slot has its own settings (temperature, top_p,
top_k, seed, min_tokens, penalties) as arrays, and its own vocabulary-sized state on the device
(logit_bias, the tokens it must not end with too early, the prompt tokens it read, the counts of
the tokens it generated), so one compiled step serves any mix of requests.

The logits a row samples from are the model's, then (in this order) the repetition penalty over
the prompt and the generated tokens (positive logits / p, negative ones * p, as in HF / vLLM),
the frequency and presence penalties over the generated tokens (OpenAI's: logit - count * f -
(count > 0) * p), the logit bias, and, while fewer than min_tokens tokens were sampled, EOS and
the stop token ids masked out, and last, for rows under a grammar (constrained decoding), every
token the grammar does not allow masked out. Reported logprobs are always the model's own
(log_softmax of the raw logits)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.sampling import filtered_logits

TOP_LOGPROBS = 20  # alternatives returned per token (OpenAI's maximum for top_logprobs)
MAX_LOGIT_BIAS = 300  # logit_bias entries of one request
MAX_STOP_TOKEN_IDS = 32  # stop_token_ids of one request
SCORE_BLOCK = 32  # prompt positions whose logits exist at once when scoring a prompt
NEG = float(np.finfo(np.float32).min)


ROW_DTYPES = (np.uint32, np.int32, np.float32, np.float32, np.int32, np.int32, np.float32, np.float32,
              np.float32, np.int32)  # SamplingBatch's `[B]` fields, in SamplingRow's order


class SamplingRow(NamedTuple):
    """One row's settings for one step (host side); the defaults are an idle, greedy row."""

    seed: int = 0
    step: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Sampling settings of B rows: seed uint32 `[B]`, step int32 `[B]` (tokens sampled so far;
    the row's key is fold_in(key(seed), step)), temperature float32 `[B]` (0 = greedy), top_p
    float32 `[B]` (1 = off), top_k int32 `[B]` (0 = off), min_tokens int32 `[B]`, and the
    float32 `[B]` repetition (1 = off), presence and frequency (0 = off) penalties, top_logprobs
    int32 `[B]` (the alternatives a row returns; 0 = none); allowed bool
    `[B, V]` (the tokens each row may sample: constrained decoding) or None (every token; a
    step without it compiles apart, so unconstrained batches never carry a mask)."""

    seed: jax.Array
    step: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_tokens: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    top_logprobs: jax.Array
    allowed: jax.Array | None = None

    @staticmethod
    def of(rows: list[SamplingRow], allowed: np.ndarray | None = None) -> "SamplingBatch":
        """From host rows (and the bool `[B, V]` allowed mask, or None) -> numpy arrays."""
        columns = zip(*rows)
        return SamplingBatch(*(np.asarray(c, d) for c, d in zip(columns, ROW_DTYPES)), allowed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot sampling state on the device, S slots over the model's V ids: bias float32
    `[S, V]` (logit_bias), suppress bool `[S, V]` (EOS and stop_token_ids: masked while fewer
    than min_tokens were sampled), seen bool `[S, V]` (tokens of the prompt read so far), counts
    int32 `[S, V]` (how often each generated token was fed back)."""

    bias: jax.Array
    suppress: jax.Array
    seen: jax.Array
    counts: jax.Array

    @staticmethod
    def empty(slots: int, vocab: int) -> "SlotState":
        """Every slot neutral: no bias, nothing suppressed, seen or counted."""
        return SlotState(jnp.zeros((slots, vocab), jnp.float32), jnp.zeros((slots, vocab), jnp.bool_),
                         jnp.zeros((slots, vocab), jnp.bool_), jnp.zeros((slots, vocab), jnp.int32))

    def take(self, rows: jax.Array) -> "SlotState":
        """The state of slots `rows` int32 `[R]`."""
        return jax.tree.map(lambda x: x[rows], self)


def reset_slot(state: SlotState, slot: jax.Array, bias_ids: jax.Array, bias_values: jax.Array,
               suppress_ids: jax.Array) -> SlotState:
    """`state` with slot `slot` (int32 scalar) holding the bias float32 bias_values `[N]` at
    int32 bias_ids `[N]` and suppressing int32 suppress_ids `[M]`, nothing seen or counted. Ids
    >= V are padding (dropped)."""
    v = state.bias.shape[1]
    bias = jnp.zeros((v,), jnp.float32).at[bias_ids].add(bias_values, mode="drop")
    suppress = jnp.zeros((v,), jnp.bool_).at[suppress_ids].set(True, mode="drop")
    return SlotState(state.bias.at[slot].set(bias), state.suppress.at[slot].set(suppress),
                     state.seen.at[slot].set(False), state.counts.at[slot].set(0))


def see_prompt(state: SlotState, rows: jax.Array, tokens: jax.Array, mask: jax.Array) -> SlotState:
    """Mark int32 tokens `[R, C]` where mask `[R, C]` as seen by the distinct slots rows `[R]`."""
    hits = jnp.zeros((rows.shape[0], state.seen.shape[1]), jnp.int32)
    hits = hits.at[jnp.arange(rows.shape[0])[:, None], tokens].add(mask.astype(jnp.int32))
    return dataclasses.replace(state, seen=state.seen.at[rows].set(state.seen[rows] | (hits > 0)))


def count_fed(state: SlotState, tokens: jax.Array, running: jax.Array) -> SlotState:
    """Count the generated token int32 `[S]` fed back to each slot where running bool `[S]`."""
    counts = state.counts.at[jnp.arange(tokens.shape[0]), tokens].add(running.astype(jnp.int32))
    return dataclasses.replace(state, counts=counts)


def process_logits(logits: jax.Array, params: SamplingBatch, state: SlotState) -> jax.Array:
    """float32 logits `[B, V]` -> the logits rows sample from (module docstring), `state` the
    rows' own `[B, V]`."""
    counts = state.counts.astype(jnp.float32)
    p = params.repetition_penalty[:, None]
    logits = jnp.where(state.seen | (state.counts > 0), jnp.where(logits > 0, logits / p, logits * p), logits)
    logits = (logits - params.frequency_penalty[:, None] * counts
              - params.presence_penalty[:, None] * (counts > 0) + state.bias)
    early = (params.step < params.min_tokens)[:, None]
    logits = jnp.where(early & state.suppress, NEG, logits)
    return logits if params.allowed is None else jnp.where(params.allowed, logits, NEG)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """What one step returns per row: token int32 `[B]`, its logprob float32 `[B]`, and the
    TOP_LOGPROBS most likely tokens: top_ids int32 `[B, L]`, top_logprobs float32 `[B, L]` (in
    a decode step only when some row asks for alternatives; zeros otherwise). Logprobs are those
    of the model's distribution (log_softmax of the raw logits)."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def sample_rows(logits: jax.Array, params: SamplingBatch, state: SlotState) -> Sampled:
    """Pick one token per row of float32 logits `[B, V]` with each row's own settings and state."""
    processed = process_logits(logits, params, state)
    greedy = jnp.argmax(processed, axis=-1).astype(jnp.int32)

    def draw() -> jax.Array:
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(params.seed, params.step)
        filtered = filtered_logits(processed, params.temperature, params.top_p, params.top_k)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    # the sort behind top_p / top_k runs only when some row samples
    token = jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda: greedy)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    shape = (logits.shape[0], min(TOP_LOGPROBS, logits.shape[-1]))
    none = lambda: (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32))  # noqa: E731
    # the vocabulary-wide top_k (a sort on a GPU) runs only when some row returns alternatives
    top_logprobs, top_ids = jax.lax.cond(jnp.any(params.top_logprobs > 0),
                                         lambda: tuple(jax.lax.top_k(logprobs, shape[1])), none)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return Sampled(token, chosen, top_ids.astype(jnp.int32), top_logprobs)


def score_positions(logits_fn, h: jax.Array, targets: jax.Array) -> Sampled:
    """The model's logprob of int32 targets `[R, C]` (the next prompt token at each position)
    and the TOP_LOGPROBS most likely tokens there, from hidden states h `[R, C, D]`; logits_fn
    turns `[R, n, D]` into float32 logits `[R, n, V]`. Only SCORE_BLOCK positions' logits exist
    at a time. Returns a `Sampled` of `[R, C]` (token = targets) and `[R, C, L]` arrays."""
    r, c, d = h.shape
    block = min(SCORE_BLOCK, c)
    nb = -(-c // block)
    pad = nb * block - c
    hb = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(r, nb, block, d).swapaxes(0, 1)
    tb = jnp.pad(targets, ((0, 0), (0, pad))).reshape(r, nb, block).swapaxes(0, 1)

    def score(xs):
        h_blk, t_blk = xs
        logprobs = jax.nn.log_softmax(logits_fn(h_blk), axis=-1)
        top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logprobs.shape[-1]))
        return jnp.take_along_axis(logprobs, t_blk[..., None], axis=-1)[..., 0], top_ids, top_logprobs

    chosen, top_ids, top_logprobs = jax.lax.map(score, (hb, tb))

    def unblock(x: jax.Array) -> jax.Array:
        return x.swapaxes(0, 1).reshape(r, nb * block, *x.shape[3:])[:, :c]

    return Sampled(targets, unblock(chosen), unblock(top_ids).astype(jnp.int32), unblock(top_logprobs))
