"""The engine's compiled steps over a fixed set of slots (the rows of one `Cache`).

Every step has fixed shapes (slot count, prefill chunk length), so each compiles once:
- `reset(slot)`: empty a slot for a new request;
- `prefill(rows [R], tokens [R, C], mask [R, C], active [R], sampling)`: append one chunk of a
  prompt to each of R slots (the lightning layers carry their float32 state on, the softmax
  layers append K/V) and sample from each chunk's last position; inactive rows are left as they
  were (they fill the R rows when fewer prompts are being read);
- `decode(tokens [B], protect_rows [R], protect [R], sampling)`: one token for every slot; the
  protected rows (slots mid-prefill, at most R of them) keep their cache untouched. Only those R
  rows are saved and restored, never the whole cache; free slots are reset when they are taken.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.cache import Cache, init_cache, keep_rows, put_rows, reset_rows, take_rows
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.serving.sampling import Sampled, SamplingBatch, sample_rows


class Steps:
    """The compiled steps of one model over `slots` rows of `cache_length` K/V slots each.

    The cache lives here and is only touched by these methods (the engine loop's thread).
    """

    def __init__(self, model: MiniMaxForCausalLM, *, slots: int, cache_length: int, chunk: int,
                 prefill_rows: int):
        graphdef, self.params = nnx.split(model)
        self.slots, self.chunk, self.prefill_rows = slots, chunk, prefill_rows
        self.config, self.cache_length = model.config, cache_length
        self.cache = init_cache(self.config, slots, cache_length)

        def prefill(params, cache: Cache, rows, tokens, mask, active, sampling: SamplingBatch):
            model = nnx.merge(graphdef, params)
            sub = take_rows(cache, rows)
            logits, new_sub, _ = model.forward(tokens, attention_mask=mask, cache=sub)
            return put_rows(cache, rows, keep_rows(active, new_sub, sub)), sample_rows(logits[:, -1], sampling)

        def decode(params, cache: Cache, tokens, protect_rows, protect, sampling: SamplingBatch):
            model = nnx.merge(graphdef, params)
            saved = take_rows(cache, protect_rows)
            logits, cache, _ = model.forward(tokens[:, None], cache=cache)
            restored = keep_rows(protect, saved, take_rows(cache, protect_rows))
            return put_rows(cache, protect_rows, restored), sample_rows(logits[:, 0], sampling)

        self._reset = jax.jit(reset_rows, donate_argnums=0)
        self._prefill = jax.jit(prefill, donate_argnums=1)
        self._decode = jax.jit(decode, donate_argnums=1)

    def reset(self, slot: int) -> None:
        """Empty slot `slot` (zero lightning state, no K/V in use, position 0)."""
        self.cache = self._reset(self.cache, jnp.asarray([slot], jnp.int32))

    def prefill(self, rows, tokens, mask, active, sampling: SamplingBatch) -> Sampled:
        """Append int32 tokens `[R, C]` (mask `[R, C]`: 0 = padding, only on the left of a prompt's
        first chunk) to the distinct slots `rows` int32 `[R]` where active bool `[R]`; returns
        the samples `[R]` after each chunk's last token."""
        self.cache, out = self._prefill(self.params, self.cache, rows, tokens, mask, active, sampling)
        return out

    def decode(self, tokens, protect_rows, protect, sampling: SamplingBatch) -> Sampled:
        """Feed int32 tokens `[B]` to all slots; the distinct slots protect_rows int32 `[R]` where
        protect bool `[R]` keep their cache as it was. Returns the samples `[B]`."""
        self.cache, out = self._decode(self.params, self.cache, tokens, protect_rows, protect, sampling)
        return out

    def cache_alive(self) -> bool:
        """False when a failed step consumed the (donated) cache; `rebuild` then starts over."""
        return not any(x.is_deleted() for x in jax.tree.leaves(self.cache))

    def rebuild(self) -> None:
        """A fresh empty cache for all slots (after a step failed and consumed the old one)."""
        self.cache = init_cache(self.config, self.slots, self.cache_length)
