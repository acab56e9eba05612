"""The engine's compiled steps over a fixed set of slots (the rows of one paged `Cache`).

Every step has fixed shapes (slot count, pages per slot, prefill chunk length), so each compiles
once:
- `reset(slot, pages)`: empty a slot for a new request and give it its K/V pages;
- `prefill(rows [R], tokens [R, C], mask [R, C], active [R], sampling)`: append one chunk of a
  prompt to each of R slots (the lightning layers carry their float32 state on, the softmax
  layers write K/V into the slot's pages) and sample from each chunk's last position; inactive
  rows are left as they were, pages included (they fill the R rows when fewer prompts are read);
- `decode(tokens [B], running [B], protect_rows [R], protect [R], sampling)`: one token for
  every slot; only running slots write K/V, and the protected rows (slots mid-prefill, at most R
  of them) keep their row state untouched. Only those R rows are saved and restored, never the
  whole cache; free slots are reset when they are taken.
The K/V pool is shared by all slots and never cleared: a slot reads only the slots it wrote since
its reset (kv_mask), so pages can pass from one request to the next as they are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.cache import (NO_PAGE, Cache, drop_writes, init_cache, keep_rows, put_rows,
                               reset_rows, take_rows)
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.serving.sampling import Sampled, SamplingBatch, sample_rows


class Steps:
    """The compiled steps of one model over `slots` rows of `pages_per_slot` pages of
    `page_size` tokens each, drawn from a pool of `num_pages` pages.

    The cache lives here and is only touched by these methods (the engine loop's thread).
    """

    def __init__(self, model: MiniMaxForCausalLM, *, slots: int, pages_per_slot: int,
                 page_size: int, num_pages: int, chunk: int, prefill_rows: int):
        graphdef, self.params = nnx.split(model)
        self.slots, self.chunk, self.prefill_rows = slots, chunk, prefill_rows
        self.pages_per_slot, self.page_size, self.num_pages = pages_per_slot, page_size, num_pages
        self.config = model.config
        self.cache = self._empty_cache()

        def prefill(params, cache: Cache, rows, tokens, mask, active, sampling: SamplingBatch):
            model = nnx.merge(graphdef, params)
            sub = take_rows(cache, rows)
            h, new_sub, _ = model.hidden_states(tokens, attention_mask=mask,
                                                cache=drop_writes(sub, active))
            new = put_rows(cache, rows, keep_rows(active, new_sub, sub))
            return new, sample_rows(model.logits(h[:, -1:])[:, 0], sampling)

        def decode(params, cache: Cache, tokens, running, protect_rows, protect,
                   sampling: SamplingBatch):
            model = nnx.merge(graphdef, params)
            saved = take_rows(cache, protect_rows)
            logits, new, _ = model.forward(tokens[:, None], cache=drop_writes(cache, running))
            new = dataclasses.replace(new, page_table=cache.page_table)
            restored = keep_rows(~protect, take_rows(new, protect_rows), saved)
            return put_rows(new, protect_rows, restored), sample_rows(logits[:, 0], sampling)

        self._reset = jax.jit(reset_rows, donate_argnums=0)
        self._prefill = jax.jit(prefill, donate_argnums=1)
        self._decode = jax.jit(decode, donate_argnums=1)

    def _empty_cache(self) -> Cache:
        return init_cache(self.config, self.slots, self.pages_per_slot * self.page_size,
                          page_size=self.page_size, num_pages=self.num_pages)

    def reset(self, slot: int, pages: list[int]) -> None:
        """Empty slot `slot` (zero lightning state, no K/V in use, position 0) and give it the
        pool pages `pages` (at most pages_per_slot ids) as its slots 0, Z, 2Z, ..."""
        if len(pages) > self.pages_per_slot:
            raise ValueError(f"a slot holds at most {self.pages_per_slot} pages, got {len(pages)}")
        table = np.full((1, self.pages_per_slot), NO_PAGE, np.int32)
        table[0, :len(pages)] = pages
        self.cache = self._reset(self.cache, jnp.asarray([slot], jnp.int32), table)

    def prefill(self, rows, tokens, mask, active, sampling: SamplingBatch) -> Sampled:
        """Append int32 tokens `[R, C]` (mask `[R, C]`: 0 = padding, only on the left of a prompt's
        first chunk) to the distinct slots `rows` int32 `[R]` where active bool `[R]`; returns
        the samples `[R]` after each chunk's last token."""
        self.cache, out = self._prefill(self.params, self.cache, rows, tokens, mask, active, sampling)
        return out

    def decode(self, tokens, running, protect_rows, protect, sampling: SamplingBatch) -> Sampled:
        """Feed int32 tokens `[B]` to all slots; only slots with running bool `[B]` write K/V, and
        the distinct slots protect_rows int32 `[R]` where protect bool `[R]` keep their row state
        as it was. Returns the samples `[B]`."""
        self.cache, out = self._decode(self.params, self.cache, tokens, running, protect_rows,
                                       protect, sampling)
        return out

    def cache_alive(self) -> bool:
        """False when a failed step consumed the (donated) cache; `rebuild` then starts over."""
        return not any(x.is_deleted() for x in jax.tree.leaves(self.cache))

    def rebuild(self) -> None:
        """A fresh empty cache for all slots, none holding pages (after a step failed and
        consumed the old one)."""
        self.cache = self._empty_cache()
