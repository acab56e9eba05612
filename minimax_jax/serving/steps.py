"""The engine's compiled steps over a fixed set of slots (the rows of one paged `Cache`, and of
the slots' sampling state `SlotState`).

Every step has fixed shapes (slot count, pages per slot), so `reset` and `decode` compile once and
`prefill` once per prompt chunk length the engine uses (a few buckets), twice if prompts are
scored:
- `reset(slot, pages, bias, suppress)`: empty a slot for a new request, give it its K/V pages
  and its logit bias and suppressed ids;
- `prefill(rows [R], tokens [R, C], mask [R, C], active [R], sampling, targets [R, C] | None)`:
  append one chunk of a prompt to each of R slots (the lightning layers carry their float32
  state on, the softmax layers write K/V into the slot's pages, the sampling state marks the
  tokens seen) and sample from each chunk's last position; with `targets` also score every
  position of the chunk. Inactive rows are left as they were, pages included (they fill the R
  rows when fewer prompts are read);
- `decode(tokens [B], running [B], protect_rows [R], protect [R], sampling)`: one token for
  every slot; only running slots write K/V and count the token they are fed, and the protected
  rows (slots mid-prefill, at most R of them) keep their row state untouched. Only those R rows
  are saved and restored, never the whole cache; free slots are reset when they are taken.
The K/V pool is shared by all slots and never cleared: a slot reads only the slots it wrote since
its reset (kv_mask), so pages can pass from one request to the next as they are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from minimax_jax.cache import (NO_PAGE, Cache, drop_writes, init_cache, keep_rows, put_rows,
                               reset_rows, take_rows)
from minimax_jax.config import MiniMaxConfig
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.serving.sampling import (MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, Sampled, SamplingBatch,
                                          SlotState, count_fed, reset_slot, sample_rows,
                                          score_positions, see_prompt)


def cache_bytes(cfg: MiniMaxConfig, *, slots: int, pages_per_slot: int, page_size: int,
                num_pages: int) -> int:
    """Bytes of the cache `Steps` allocates for these sizes (nothing is allocated)."""
    empty = functools.partial(init_cache, cfg, slots, pages_per_slot * page_size, page_size=page_size,
                              num_pages=num_pages)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(empty)))


class Steps:
    """The compiled steps of one model over `slots` rows of `pages_per_slot` pages of
    `page_size` tokens each, drawn from a pool of `num_pages` pages; up to `prefill_rows`
    prompts per prefill step.

    The cache and the sampling state live here and are only touched by these methods (the
    engine loop's thread).
    """

    def __init__(self, model: MiniMaxForCausalLM, *, slots: int, pages_per_slot: int,
                 page_size: int, num_pages: int, prefill_rows: int):
        graphdef, self.params = nnx.split(model)
        self.slots, self.prefill_rows = slots, prefill_rows
        self.pages_per_slot, self.page_size, self.num_pages = pages_per_slot, page_size, num_pages
        self.config = model.config
        self.cache, self.state = self._empty()

        def reset(cache: Cache, state: SlotState, slot, table, bias_ids, bias_values, suppress_ids):
            return (reset_rows(cache, slot[None], table),
                    reset_slot(state, slot, bias_ids, bias_values, suppress_ids))

        def prefill(params, cache: Cache, state: SlotState, rows, tokens, mask, active,
                    sampling: SamplingBatch, targets):
            model = nnx.merge(graphdef, params)
            sub = take_rows(cache, rows)
            h, new_sub, _ = model.hidden_states(tokens, attention_mask=mask,
                                                cache=drop_writes(sub, active))
            new = put_rows(cache, rows, keep_rows(active, new_sub, sub))
            state = see_prompt(state, rows, tokens, mask * active[:, None])
            sampled = sample_rows(model.logits(h[:, -1:])[:, 0], sampling, state.take(rows))
            scores = None if targets is None else score_positions(model.logits, h, targets)
            return new, state, sampled, scores

        def decode(params, cache: Cache, state: SlotState, tokens, running, protect_rows, protect,
                   sampling: SamplingBatch):
            model = nnx.merge(graphdef, params)
            saved = take_rows(cache, protect_rows)
            logits, new, _ = model.forward(tokens[:, None], cache=drop_writes(cache, running))
            new = dataclasses.replace(new, page_table=cache.page_table)
            restored = keep_rows(~protect, take_rows(new, protect_rows), saved)
            state = count_fed(state, tokens, running)
            return put_rows(new, protect_rows, restored), state, sample_rows(logits[:, 0], sampling, state)

        self._reset = jax.jit(reset, donate_argnums=(0, 1))
        self._prefill = jax.jit(prefill, donate_argnums=(1, 2))
        self._decode = jax.jit(decode, donate_argnums=(1, 2))

    def _empty(self) -> tuple[Cache, SlotState]:
        cache = init_cache(self.config, self.slots, self.pages_per_slot * self.page_size,
                           page_size=self.page_size, num_pages=self.num_pages)
        return cache, SlotState.empty(self.slots, self.config.vocab_size)

    def reset(self, slot: int, pages: list[int], bias: dict[int, float] | None = None,
              suppress: tuple[int, ...] = ()) -> None:
        """Empty slot `slot` (zero lightning state, no K/V in use, position 0, nothing seen or
        generated), give it the pool pages `pages` (at most pages_per_slot ids) as its slots 0,
        Z, 2Z, ..., the logit bias `bias` (token id -> bias, at most MAX_LOGIT_BIAS) and the ids
        `suppress` (at most MAX_STOP_TOKEN_IDS + 1) to mask before min_tokens."""
        bias = bias or {}
        if len(pages) > self.pages_per_slot:
            raise ValueError(f"a slot holds at most {self.pages_per_slot} pages, got {len(pages)}")
        table = np.full((1, self.pages_per_slot), NO_PAGE, np.int32)
        table[0, :len(pages)] = pages
        v = self.config.vocab_size  # padding ids: dropped
        bias_ids = np.full(MAX_LOGIT_BIAS, v, np.int32)
        bias_values = np.zeros(MAX_LOGIT_BIAS, np.float32)
        bias_ids[:len(bias)], bias_values[:len(bias)] = list(bias), list(bias.values())
        suppress_ids = np.full(MAX_STOP_TOKEN_IDS + 1, v, np.int32)
        suppress_ids[:len(suppress)] = suppress
        self.cache, self.state = self._reset(self.cache, self.state, np.int32(slot), table, bias_ids,
                                             bias_values, suppress_ids)

    def prefill(self, rows, tokens, mask, active, sampling: SamplingBatch,
                targets=None) -> tuple[Sampled, Sampled | None]:
        """Append int32 tokens `[R, C]` (mask `[R, C]`: 0 = padding, only on the left of a prompt's
        first chunk) to the distinct slots `rows` int32 `[R]` where active bool `[R]`; returns
        the samples `[R]` after each chunk's last token, and with int32 targets `[R, C]` (the
        token after each position) their scores `[R, C]` (see `score_positions`), else None."""
        self.cache, self.state, out, scores = self._prefill(
            self.params, self.cache, self.state, rows, tokens, mask, active, sampling, targets)
        return out, scores

    def decode(self, tokens, running, protect_rows, protect, sampling: SamplingBatch) -> Sampled:
        """Feed int32 tokens `[B]` to all slots; only slots with running bool `[B]` write K/V, and
        the distinct slots protect_rows int32 `[R]` where protect bool `[R]` keep their row state
        as it was. Returns the samples `[B]`."""
        self.cache, self.state, out = self._decode(self.params, self.cache, self.state, tokens, running,
                                                   protect_rows, protect, sampling)
        return out

    def cache_alive(self) -> bool:
        """False when a failed step consumed the (donated) cache or state; `rebuild` then starts over."""
        return not any(x.is_deleted() for x in jax.tree.leaves((self.cache, self.state)))

    def rebuild(self) -> None:
        """A fresh empty cache and sampling state for all slots, none holding pages (after a
        step failed and consumed the old ones)."""
        self.cache, self.state = self._empty()
