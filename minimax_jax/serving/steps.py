"""The engine's compiled steps over a fixed set of slots (the rows of one paged `Cache`, and of
the slots' sampling state `SlotState`).

Every step has fixed shapes (slot count, pages per slot), so `reset` and the decode loop compile
once and `prefill` once per prompt chunk length the engine uses (a few buckets), twice if prompts
are scored:
- `reset(slot, pages, bias, suppress)`: empty a slot for a new request, give it its K/V pages
  and its logit bias and suppressed ids;
- `prefill(rows [R], tokens [R, C], mask [R, C], active [R], sampling, targets [R, C] | None)`:
  append one chunk of a prompt to each of R slots (the lightning layers carry their float32
  state on, the softmax layers write K/V into the slot's pages, the sampling state marks the
  tokens seen) and sample from each chunk's last position; with `targets` also score every
  position of the chunk. Inactive rows are left as they were, pages included (they fill the R
  rows when fewer prompts are read);
- `decode_many(tokens [B], budget [B], protect_rows [R], protect [R], sampling)`: up to
  `decode_steps` tokens for every slot in one dispatch, a `lax.while_loop` on the device: each
  iteration feeds every active slot its last token, writes its K/V, samples the next one and
  counts it; a slot stops at its budget (the tokens it may still generate) or on sampling one of
  its suppressed ids (EOS, stop_token_ids), and the loop ends when every slot has stopped. A
  slot that stops writes no more K/V; the rest of its row state is then undefined (its request
  has ended). The protected rows (slots mid-prefill, at most R of them) keep their row state
  untouched: only those R rows are saved and restored, never the whole cache. Free slots are
  reset when they are taken. `decode` is one iteration of the same loop (for steps whose next
  token needs host work first);
- `save_prefix(slot, index)` / `restore_prefix(slot, index, length)`: copy a slot's per-slot
  state that no page holds (the lightning states, the tokens seen) to snapshot `index` of the
  prefix store, and back into a freshly reset slot whose first length / Z pages hold the
  prefix's K/V.
The K/V pool is shared by all slots and never cleared: a slot reads only the slots it wrote since
its reset (kv_mask), so pages can pass from one request to the next as they are.

A model whose params are placed on a mesh (`load_model(..., mesh=)`) runs every step under that
mesh (`jax.set_mesh`, so the ops take their parallel forms), its cache split as `cache_shardings`
says (the prefix store likewise, the sampling state replicated); each step returns them placed as
it took them, so nothing recompiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minimax_jax.cache import (NO_PAGE, Cache, drop_writes, init_cache, keep_rows, put_rows,
                               reset_rows, take_rows)
from minimax_jax.config import MiniMaxConfig
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.serving.sampling import (MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, TOP_LOGPROBS, Sampled,
                                          SamplingBatch, SlotState, count_fed, reset_slot, sample_rows,
                                          score_positions, see_prompt)
from minimax_jax.vision.model import MiniMaxVLForConditionalGeneration, text_model
from sharding.mesh import param_shardings, placed_bytes, placed_mesh
from sharding.rules import logical_to_spec
from sharding.tokens import token_spec


def cache_shardings(cache: Cache, mesh: Mesh) -> Cache:
    """NamedShardings on `mesh` for a cache shaped like `cache` (arrays or shapes): the rows of
    the per-row fields (lightning states, page table, kv_mask, length, next_position) split over
    the mesh's batch axes as the model splits the rows of its tokens
    (`sharding.tokens.token_spec`: over all of them, or over none when they do not divide the
    rows), the lightning states' heads and the K/V pages' heads as the attention params split
    theirs (the `heads` and `kv_heads` rules: `tensor`); the pool's pages, shared by all rows,
    are not split."""
    with jax.set_mesh(mesh):
        rows = token_spec(cache.page_table.shape[0], 1)
    b = None if rows is None else rows[0]
    (h,), (n,) = logical_to_spec(("heads",)), logical_to_spec(("kv_heads",))
    pages = P(None, None, None, None, n)  # [blocks, layers, P, Z, N, K]
    specs = {"lightning_state": P(None, None, b, h), "key": pages, "value": pages, "page_table": P(b),
             "kv_mask": P(b), "length": P(b), "next_position": P(b)}
    return Cache(**{name: NamedSharding(mesh, spec) for name, spec in specs.items()})


def cache_bytes(cfg: MiniMaxConfig, *, slots: int, pages_per_slot: int, page_size: int,
                num_pages: int, mesh: Mesh | None = None) -> int:
    """Bytes of the cache `Steps` allocates for these sizes (nothing is allocated); on a mesh
    the bytes of all its devices together, as `cache_shardings` splits it."""
    empty = functools.partial(init_cache, cfg, slots, pages_per_slot * page_size, page_size=page_size,
                              num_pages=num_pages)
    shapes = jax.eval_shape(empty)
    if mesh is not None:
        return placed_bytes(shapes, cache_shardings(shapes, mesh))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixStore:
    """Snapshots of the per-slot state of cached prefixes, N of them: lightning_state float32
    `[N, num_blocks, n_linear, H, K, K]` (a slot's lightning states) and seen bool `[N, V]` (the
    prompt tokens its sampler had seen)."""

    lightning_state: jax.Array
    seen: jax.Array

    @staticmethod
    def empty(cfg: MiniMaxConfig, n: int) -> "PrefixStore":
        """N zero snapshots for the model `cfg`."""
        state = jax.eval_shape(lambda: init_cache(cfg, 1, 1)).lightning_state
        shape = (n, *state.shape[:2], *state.shape[3:])
        return PrefixStore(jnp.zeros(shape, jnp.float32), jnp.zeros((n, cfg.vocab_size), jnp.bool_))

    @staticmethod
    def shardings(mesh: Mesh) -> "PrefixStore":
        """NamedShardings of a store on `mesh`: the lightning states' heads split as the cache's
        (`cache_shardings`), the rest replicated."""
        (h,) = logical_to_spec(("heads",))
        return PrefixStore(NamedSharding(mesh, P(None, None, None, h)), NamedSharding(mesh, P()))


def prefix_store_bytes(cfg: MiniMaxConfig, n: int, mesh: Mesh | None = None) -> int:
    """Bytes of a `PrefixStore` of `n` snapshots (nothing is allocated); on a mesh the bytes of
    all its devices together."""
    shapes = jax.eval_shape(lambda: PrefixStore.empty(cfg, n))
    if mesh is not None:
        return placed_bytes(shapes, PrefixStore.shardings(mesh))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def _hold(tree: Any, shardings: Any) -> Any:
    """`tree` inside a step, constrained to `shardings` (a pytree prefix of it; None: as it is)."""
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


class Steps:
    """The compiled steps of one model over `slots` rows of `pages_per_slot` pages of
    `page_size` tokens each, drawn from a pool of `num_pages` pages; up to `prefill_rows`
    prompts per prefill step, up to `decode_steps` tokens per decode dispatch, and
    `prefix_snapshots` snapshot slots for the prefix cache (0: none).

    The cache, the sampling state and the prefix store live here and are only touched by these
    methods (the engine loop's thread). A model placed on a mesh (`mesh`: the mesh of its params,
    `sharding.mesh.placed_mesh`) runs its steps under it (see the module docstring); its params
    are placed by `sharding.param_shardings` (as `load_model(..., mesh=)` places them).
    """

    def __init__(self, model: MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration, *, slots: int,
                 pages_per_slot: int, page_size: int, num_pages: int, prefill_rows: int, decode_steps: int = 1,
                 prefix_snapshots: int = 0):
        graphdef, params = nnx.split(model)
        self.graphdef = graphdef
        self.mesh = placed_mesh(params)
        self.params = params if self.mesh is None else jax.device_put(params, param_shardings(params, self.mesh))
        self.slots, self.prefill_rows, self.decode_steps = slots, prefill_rows, decode_steps
        self.pages_per_slot, self.page_size, self.num_pages = pages_per_slot, page_size, num_pages
        self.config = text_model(model).config
        self.prefix_snapshots = prefix_snapshots
        # how the cache, the sampling state and the prefix store are placed (None: no mesh)
        cache_sh = state_sh = store_sh = None
        if self.mesh is not None:
            cache_sh = cache_shardings(jax.eval_shape(self._new_cache), self.mesh)
            state_sh, store_sh = NamedSharding(self.mesh, P()), PrefixStore.shardings(self.mesh)
        self._cache_sharding, self._state_sharding, self._store_sharding = cache_sh, state_sh, store_sh
        self.cache, self.state = self._empty()
        self.store = self._empty_store() if prefix_snapshots else None
        top = min(TOP_LOGPROBS, self.config.vocab_size)

        def reset(cache: Cache, state: SlotState, slot, table, bias_ids, bias_values, suppress_ids):
            return (_hold(reset_rows(cache, slot[None], table), cache_sh),
                    _hold(reset_slot(state, slot, bias_ids, bias_values, suppress_ids), state_sh))

        def prefill(params, cache: Cache, state: SlotState, rows, tokens, mask, active,
                    sampling: SamplingBatch, targets, images):
            vl = nnx.merge(graphdef, params)
            model = text_model(vl)
            sub = take_rows(cache, rows)
            if images is None:
                h, runner = tokens, model
            else:  # image tokens: their embeddings replace the token embeddings
                embeds, is_image = images
                h = jnp.where(is_image[..., None], embeds.astype(model.config.dtype), model.embed(tokens))
                runner = vl
            h, new_sub, _ = runner.hidden_states(h, attention_mask=mask, cache=drop_writes(sub, active))
            new = put_rows(cache, rows, keep_rows(active, new_sub, sub))
            state = see_prompt(state, rows, tokens, mask * active[:, None])
            sampled = sample_rows(model.logits(h[:, -1:])[:, 0], sampling, state.take(rows))
            scores = None if targets is None else score_positions(model.logits, h, targets)
            return _hold(new, cache_sh), _hold(state, state_sh), sampled, scores

        def decode_loop(params, cache: Cache, state: SlotState, tokens, budget, protect_rows, protect,
                        sampling: SamplingBatch, *, steps: int):
            model = text_model(nnx.merge(graphdef, params))
            saved = take_rows(cache, protect_rows)
            b = tokens.shape[0]
            out = Sampled(jnp.zeros((steps, b), jnp.int32), jnp.zeros((steps, b), jnp.float32),
                          jnp.zeros((steps, b, top), jnp.int32), jnp.zeros((steps, b, top), jnp.float32))

            def more(carry) -> jax.Array:
                i, _, _, _, active, _, _ = carry
                return (i < steps) & jnp.any(active)

            def step(carry):
                i, cache, state, token, active, count, out = carry
                logits, new, _ = model.forward(token[:, None], cache=drop_writes(cache, active))
                new = dataclasses.replace(new, page_table=cache.page_table)
                state = count_fed(state, token, active)
                sampled = sample_rows(logits[:, 0], dataclasses.replace(sampling, step=sampling.step + i),
                                      state)
                out = jax.tree.map(lambda buf, x: buf.at[i].set(x), out, sampled)
                count = count + active
                stopped = state.suppress[jnp.arange(b), sampled.token]
                return i + 1, new, state, sampled.token, active & (count < budget) & ~stopped, count, out

            start = (jnp.int32(0), cache, state, tokens, budget > 0, jnp.zeros((b,), jnp.int32), out)
            _, cache, state, _, _, count, out = jax.lax.while_loop(more, step, start)
            restored = keep_rows(~protect, take_rows(cache, protect_rows), saved)
            return _hold(put_rows(cache, protect_rows, restored), cache_sh), _hold(state, state_sh), out, count

        def decode_one(params, cache, state, tokens, running, protect_rows, protect, sampling):
            cache, state, out, _ = decode_loop(params, cache, state, tokens, running.astype(jnp.int32),
                                               protect_rows, protect, sampling, steps=1)
            return cache, state, jax.tree.map(lambda x: x[0], out)

        def save_prefix(store: PrefixStore, cache: Cache, state: SlotState, slot, index):
            return _hold(PrefixStore(store.lightning_state.at[index].set(cache.lightning_state[:, :, slot]),
                                     store.seen.at[index].set(state.seen[slot])), store_sh)

        def restore_prefix(cache: Cache, state: SlotState, store: PrefixStore, slot, index, length):
            cache = dataclasses.replace(
                cache, lightning_state=cache.lightning_state.at[:, :, slot].set(store.lightning_state[index]),
                kv_mask=cache.kv_mask.at[slot].set(jnp.arange(cache.max_length) < length),
                length=cache.length.at[slot].set(length),
                next_position=cache.next_position.at[slot].set(length))
            state = dataclasses.replace(state, seen=state.seen.at[slot].set(store.seen[index]))
            return _hold(cache, cache_sh), _hold(state, state_sh)

        self._reset = jax.jit(reset, donate_argnums=(0, 1))
        self._prefill = jax.jit(prefill, donate_argnums=(1, 2))
        self._decode = jax.jit(decode_one, donate_argnums=(1, 2))
        self._decode_many = jax.jit(functools.partial(decode_loop, steps=decode_steps), donate_argnums=(1, 2))
        self._save_prefix = jax.jit(save_prefix, donate_argnums=(0,))
        self._restore_prefix = jax.jit(restore_prefix, donate_argnums=(0, 1))
        self._crop_features = jax.jit(lambda params, pixels: nnx.merge(self.graphdef, params).crop_features(pixels))

    def _new_cache(self) -> Cache:
        """An empty cache for all slots, none holding pages."""
        return init_cache(self.config, self.slots, self.pages_per_slot * self.page_size,
                          page_size=self.page_size, num_pages=self.num_pages)

    def _new_state(self) -> SlotState:
        """Every slot's sampling state neutral."""
        return SlotState.empty(self.slots, self.config.vocab_size)

    def _new_store(self) -> PrefixStore:
        """prefix_snapshots zero snapshots."""
        return PrefixStore.empty(self.config, self.prefix_snapshots)

    def _scope(self) -> contextlib.AbstractContextManager:
        """The model's mesh as the current one (`jax.set_mesh`), or nothing without one."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _empty(self) -> tuple[Cache, SlotState]:
        """A new empty cache and sampling state, placed as the steps take them."""
        if self.mesh is None:
            return self._new_cache(), self._new_state()
        return (jax.jit(self._new_cache, out_shardings=self._cache_sharding)(),
                jax.jit(self._new_state, out_shardings=self._state_sharding)())

    def _empty_store(self) -> PrefixStore:
        """A new prefix store of zero snapshots, placed as the steps take it."""
        if self.mesh is None:
            return self._new_store()
        return jax.jit(self._new_store, out_shardings=self._store_sharding)()

    def reset(self, slot: int, pages: list[int], bias: dict[int, float] | None = None,
              suppress: tuple[int, ...] = ()) -> None:
        """Empty slot `slot` (zero lightning state, no K/V in use, position 0, nothing seen or
        generated), give it the pool pages `pages` (at most pages_per_slot ids) as its slots 0,
        Z, 2Z, ..., the logit bias `bias` (token id -> bias, at most MAX_LOGIT_BIAS) and the ids
        `suppress` (at most MAX_STOP_TOKEN_IDS + 1) to mask before min_tokens and to stop at."""
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
        with self._scope():
            self.cache, self.state = self._reset(self.cache, self.state, np.int32(slot), table, bias_ids,
                                                 bias_values, suppress_ids)

    def prefill(self, rows, tokens, mask, active, sampling: SamplingBatch,
                targets=None, images=None) -> tuple[Sampled, Sampled | None]:
        """Append int32 tokens `[R, C]` (mask `[R, C]`: 0 = padding, only on the left of a prompt's
        first chunk) to the distinct slots `rows` int32 `[R]` where active bool `[R]`; returns
        the samples `[R]` after each chunk's last token, and with int32 targets `[R, C]` (the
        token after each position) their scores `[R, C]` (see `score_positions`), else None.
        A VL model's images: (embeds `[R, C, D]`, is_image bool `[R, C]`), the embeddings read
        instead of the tokens' where is_image (its image tokens), or None."""
        with self._scope():
            self.cache, self.state, out, scores = self._prefill(
                self.params, self.cache, self.state, rows, tokens, mask, active, sampling, targets, images)
        return out, scores

    def image_features(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> jax.Array:
        """A VL model's image tokens `[n, D]` of one prompt's images (see
        `MiniMaxVLForConditionalGeneration.image_features`). The vision tower and projector run
        compiled, their crops padded to a power of two, so requests reuse a few programs."""
        model = nnx.merge(self.graphdef, self.params)

        def crop_features(pixels: jax.Array) -> jax.Array:
            n = pixels.shape[0]
            padded = jnp.pad(pixels, ((0, (1 << max(n - 1, 0).bit_length()) - n),) + ((0, 0),) * 3)
            return self._crop_features(self.params, padded)[:n]

        with self._scope():
            return model.image_features(jnp.asarray(pixel_values), image_sizes, crop_features=crop_features)

    def decode(self, tokens, running, protect_rows, protect, sampling: SamplingBatch) -> Sampled:
        """Feed int32 tokens `[B]` to all slots; only slots with running bool `[B]` write K/V, and
        the distinct slots protect_rows int32 `[R]` where protect bool `[R]` keep their row state
        as it was. Returns the samples `[B]`."""
        with self._scope():
            self.cache, self.state, out = self._decode(self.params, self.cache, self.state, tokens, running,
                                                       protect_rows, protect, sampling)
        return out

    def decode_many(self, tokens, budget, protect_rows, protect,
                    sampling: SamplingBatch) -> tuple[Sampled, jax.Array]:
        """Up to decode_steps tokens per slot in one dispatch: feed int32 tokens `[B]` and go on
        feeding each slot what it samples, at most int32 budget `[B]` tokens (0: the slot does not
        run), stopping a slot early when it samples one of its suppressed ids. `sampling.step` is
        each slot's count of tokens sampled before this dispatch. Protected rows as in `decode`.
        Returns the samples `[decode_steps, B]` (row i: the i-th token of this dispatch) and the
        int32 `[B]` count of valid ones per slot."""
        with self._scope():
            self.cache, self.state, out, count = self._decode_many(
                self.params, self.cache, self.state, tokens, budget, protect_rows, protect, sampling)
        return out, count

    def save_prefix(self, slot: int, index: int) -> None:
        """Copy slot `slot`'s lightning states and seen tokens to snapshot `index`."""
        with self._scope():
            self.store = self._save_prefix(self.store, self.cache, self.state, np.int32(slot), np.int32(index))

    def restore_prefix(self, slot: int, index: int, length: int) -> None:
        """Make the just reset slot `slot` continue after a cached prefix of `length` tokens: its
        lightning states and seen tokens from snapshot `index`, its first `length` K/V slots in
        use (its first length / Z pages must hold the prefix's K/V), position `length`."""
        with self._scope():
            self.cache, self.state = self._restore_prefix(self.cache, self.state, self.store, np.int32(slot),
                                                          np.int32(index), np.int32(length))

    def cache_alive(self) -> bool:
        """False when a failed step consumed the (donated) cache, state or prefix store; `rebuild`
        then starts over."""
        return not any(x.is_deleted() for x in jax.tree.leaves((self.cache, self.state, self.store)))

    def rebuild(self) -> None:
        """A fresh empty cache, sampling state and prefix store for all slots, none holding pages
        (after a step failed and consumed the old ones)."""
        self.cache, self.state = self._empty()
        if self.store is not None:
            self.store = self._empty_store()
