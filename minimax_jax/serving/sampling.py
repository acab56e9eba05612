"""Per-row sampling for the serving engine: every slot has its own temperature, top_p, top_k
and seed, as arrays, so one compiled step serves any mix of requests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.sampling import filtered_logits

TOP_LOGPROBS = 20  # alternatives returned per token (OpenAI's maximum for top_logprobs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Sampling settings of B rows: seed uint32 `[B]`, step int32 `[B]` (tokens sampled so far;
    the row's key is fold_in(key(seed), step)), temperature float32 `[B]` (0 = greedy), top_p
    float32 `[B]` (1 = off), top_k int32 `[B]` (0 = off)."""

    seed: jax.Array
    step: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array

    @staticmethod
    def of(rows: list[tuple[int, int, float, float, int]]) -> "SamplingBatch":
        """From host rows (seed, step, temperature, top_p, top_k) -> numpy arrays."""
        seed, step, temperature, top_p, top_k = zip(*rows)
        return SamplingBatch(np.asarray(seed, np.uint32), np.asarray(step, np.int32),
                             np.asarray(temperature, np.float32), np.asarray(top_p, np.float32),
                             np.asarray(top_k, np.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """What one step returns per row: token int32 `[B]`, its logprob float32 `[B]`, and the
    TOP_LOGPROBS most likely tokens: top_ids int32 `[B, L]`, top_logprobs float32 `[B, L]`.
    Logprobs are those of the model's distribution (log_softmax of the raw logits)."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def sample_rows(logits: jax.Array, params: SamplingBatch) -> Sampled:
    """Pick one token per row of float32 logits `[B, V]` with each row's own settings."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw() -> jax.Array:
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(params.seed, params.step)
        filtered = filtered_logits(logits, params.temperature, params.top_p, params.top_k)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    # the sort behind top_p / top_k runs only when some row samples
    token = jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda: greedy)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return Sampled(token, chosen, top_ids.astype(jnp.int32), top_logprobs)
