"""The decoding cache: float32 lightning states per row, and the K/V of the softmax layers in a
pool of fixed-size pages that rows reach through their page tables."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.config import FULL, LINEAR, MiniMaxConfig

PAGE_SIZE = 16  # default tokens per K/V page
NO_PAGE = int(np.iinfo(np.int32).max)  # a page-table entry without a page: writes to it are dropped


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """Per-sequence decoding state, stacked like the scanned layer blocks.

    lightning_state float32 `[num_blocks, n_linear, B, H, K, K]`: one state per lightning layer
    (n_linear = lightning layers in the repeating block). key, value
    `[num_blocks, n_full, P, Z, N, K]`: a pool of P pages of Z tokens (post-RoPE keys), shared by
    all rows. page_table int32 `[B, R]`: row b's slot s lives at offset s % Z of page
    page_table[b, s // Z] (NO_PAGE: none); a row has S = R * Z slots. kv_mask bool `[B, S]`: slot
    holds a real token of this row (stale pool data is never seen). length int32 `[B]`: slots
    written so far in each row (padding slots count; they stay masked). next_position int32
    `[B]`: the RoPE position of each row's next token.
    """

    lightning_state: jax.Array
    key: jax.Array
    value: jax.Array
    page_table: jax.Array
    kv_mask: jax.Array
    length: jax.Array
    next_position: jax.Array

    @property
    def max_length(self) -> int:
        """S: the slots of one row (pages per row x page size)."""
        return self.kv_mask.shape[1]

    @property
    def page_size(self) -> int:
        """Z: tokens per page."""
        return self.key.shape[3]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKV:
    """One softmax layer's view of the cache: key, value `[P, Z, N, K]` (the pool's pages) and
    page_table int32 `[B, R]` (see `Cache`)."""

    key: jax.Array
    value: jax.Array
    page_table: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockCache:
    """One scanned block's part of the cache: lightning_state float32 `[n_linear, B, H, K, K]`
    (this block's), key and value `[num_blocks, n_full, P, Z, N, K]` (the whole pool: a layer
    reads and writes its own pages in place, so no block's pages are copied out and back),
    page_table int32 `[B, R]`, block int32 `[]` (this block's index)."""

    lightning_state: jax.Array
    key: jax.Array
    value: jax.Array
    page_table: jax.Array
    block: jax.Array

    def pages(self, j: int) -> PagedKV:
        """The view of this block's full-attention layer j: the pool as `[L * P, Z, N, K]` (L =
        num_blocks * n_full layers), the page table shifted to that layer's P pages (NO_PAGE
        stays)."""
        nb, nf, p = self.key.shape[:3]
        offset = (self.block * nf + j) * p
        table = jnp.where(self.page_table == NO_PAGE, NO_PAGE, self.page_table + offset)
        flat = lambda pool: pool.reshape(nb * nf * p, *pool.shape[3:])  # noqa: E731
        return PagedKV(flat(self.key), flat(self.value), table)

    def with_pages(self, kv: PagedKV) -> BlockCache:
        """This block cache with the pool written through a view from `pages`."""
        return dataclasses.replace(self, key=kv.key.reshape(self.key.shape),
                                   value=kv.value.reshape(self.value.shape))


def init_cache(cfg: MiniMaxConfig, batch_size: int, max_length: int, *,
               page_size: int | None = None, num_pages: int | None = None) -> Cache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens (K/V in cfg.dtype).

    Pages hold `page_size` tokens (default min(max_length, PAGE_SIZE)); a row has
    ceil(max_length / page_size) of them, so its slots are max_length rounded up to whole pages.
    num_pages None: the pool is exactly the rows' pages, row b owning the b-th run of them (the
    contiguous layout, for `generate`). Otherwise a pool of `num_pages` pages of which no row
    holds any yet (page tables all NO_PAGE; `reset_rows` hands pages to rows).
    """
    page_size = min(max_length, PAGE_SIZE) if page_size is None else page_size
    if min(batch_size, max_length, page_size) < 1 or (num_pages is not None and num_pages < 1):
        raise ValueError(f"batch_size, max_length, page_size and num_pages must be >= 1, got "
                         f"{batch_size}, {max_length}, {page_size}, {num_pages}")
    pages_per_row = -(-max_length // page_size)
    if num_pages is None:
        num_pages = batch_size * pages_per_row
        page_table = jnp.arange(num_pages, dtype=jnp.int32).reshape(batch_size, pages_per_row)
    else:
        page_table = jnp.full((batch_size, pages_per_row), NO_PAGE, jnp.int32)
    pattern = cfg.block_pattern
    n_lin, n_full = pattern.count(LINEAR), pattern.count(FULL)
    nb, h, n, k = cfg.num_blocks, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kv_shape = (nb, n_full, num_pages, page_size, n, k)
    return Cache(
        lightning_state=jnp.zeros((nb, n_lin, batch_size, h, k, k), jnp.float32),
        key=jnp.zeros(kv_shape, cfg.dtype),
        value=jnp.zeros(kv_shape, cfg.dtype),
        page_table=page_table,
        kv_mask=jnp.zeros((batch_size, pages_per_row * page_size), jnp.bool_),
        length=jnp.zeros((batch_size,), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32),
    )


def write_rows(buffer: jax.Array, chunk: jax.Array, start: jax.Array) -> jax.Array:
    """Write chunk `[B, T, ...]` into buffer `[B, S, ...]` at slots start[b]..start[b]+T-1 of
    row b."""
    return jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x, s, axis=0))(
        buffer, chunk, start
    )


def write_pages(pages: jax.Array, page_table: jax.Array, chunk: jax.Array,
                start: jax.Array) -> jax.Array:
    """Write chunk `[B, T, ...]` into the pool pages `[P, Z, ...]` at row b's slots
    start[b]..start[b]+T-1 (slot s: page page_table[b, s // Z] `[B, R]`, offset s % Z). Slots
    beyond the table or on a NO_PAGE entry are dropped."""
    z = pages.shape[1]
    slot = start[:, None] + jnp.arange(chunk.shape[1], dtype=jnp.int32)[None, :]  # [B, T]
    page = jnp.take_along_axis(page_table, slot // z, axis=1, mode="fill", fill_value=NO_PAGE)
    return pages.at[page, slot % z].set(chunk.astype(pages.dtype), mode="drop")


# The row axis of each per-row Cache field; the K/V pool (key, value) belongs to no row.
BATCH_AXES = {"lightning_state": 2, "page_table": 0, "kv_mask": 0, "length": 0, "next_position": 0}


def _map_rows(fn, pool_from: Cache, *caches: Cache) -> Cache:
    """`pool_from` with each per-row field f replaced by fn(axis, *(c.f for c in caches))."""
    return dataclasses.replace(pool_from, **{
        name: fn(axis, *(getattr(c, name) for c in caches)) for name, axis in BATCH_AXES.items()
    })


def take_rows(cache: Cache, rows: jax.Array) -> Cache:
    """Rows `rows` (int32 `[R]`, may be traced) of `cache`, as a cache of batch R on the same
    pool."""
    return _map_rows(lambda axis, x: jnp.take(x, rows, axis=axis), cache, cache)


def put_rows(cache: Cache, rows: jax.Array, sub: Cache) -> Cache:
    """`cache` with rows `rows` (int32 `[R]`, distinct) replaced by the batch-R cache `sub`; the
    pool is `sub`'s (taken from `cache`, then written to)."""

    def put(axis: int, x: jax.Array, s: jax.Array) -> jax.Array:
        return x.at[(slice(None),) * axis + (rows,)].set(s)

    return _map_rows(put, sub, cache, sub)


def reset_rows(cache: Cache, rows: jax.Array, page_table: jax.Array) -> Cache:
    """`cache` with rows `rows` (int32 `[R]`) emptied (zero state, no K/V slots in use,
    position 0) and given the pages page_table int32 `[R, pages per row]` (NO_PAGE: none). The
    pool is untouched: kv_mask hides what earlier rows left in those pages."""
    empty = _map_rows(lambda axis, x: jnp.zeros_like(x), cache, take_rows(cache, rows))
    empty = dataclasses.replace(empty, page_table=page_table.astype(jnp.int32))
    return put_rows(cache, rows, empty)


def keep_rows(keep: jax.Array, new: Cache, old: Cache) -> Cache:
    """Row b from `new` where keep[b] (bool `[B]`), else from `old`; the pool is `new`'s."""

    def pick(axis: int, n: jax.Array, o: jax.Array) -> jax.Array:
        shape = [1] * n.ndim
        shape[axis] = keep.shape[0]
        return jnp.where(keep.reshape(shape), n, o)

    return _map_rows(pick, new, new, old)


def drop_writes(cache: Cache, write: jax.Array) -> Cache:
    """`cache` where rows b with write[b] False (bool `[B]`) hold no pages, so a forward pass
    writes none of their K/V into the pool (what they read is meaningless)."""
    page_table = jnp.where(write[:, None], cache.page_table, NO_PAGE)
    return dataclasses.replace(cache, page_table=page_table)
