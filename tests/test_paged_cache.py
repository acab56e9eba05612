"""The paged K/V cache: attention through a shuffled page table equals attention over contiguous
keys (dense and blockwise), writes land where the table says and nowhere else, and the row
operations move rows without touching the shared pool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from minimax_jax.attention import grouped_attention, paged_attention
from minimax_jax.cache import (NO_PAGE, drop_writes, init_cache, keep_rows, put_rows, reset_rows,
                               take_rows, write_pages)


def _shuffled_pools(rng, z: int, spare: int, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Arrays xs `[B, S, N, K]` (S = R * Z) scattered over pools of B * R + spare pages in one
    random order (returned as the page table `[B, R]`, then the pools), the spare pages full of
    NaN (stale data that must never reach an output)."""
    b, s = xs[0].shape[:2]
    r = s // z
    table = rng.permutation(b * r + spare)[:b * r].reshape(b, r).astype(np.int32)
    pools = []
    for x in xs:
        pool = np.full((b * r + spare, z) + x.shape[2:], np.nan, x.dtype)
        pool[table.reshape(-1)] = x.reshape((b * r, z) + x.shape[2:])
        pools.append(pool)
    return table, *pools


@pytest.mark.parametrize("key_block", [2048, 8, 12])  # dense; 2 pages a block; 3 (one padded)
def test_paged_attention_equals_contiguous(rng, key_block):
    b, t, h, n, d, z, r = 3, 4, 4, 2, 8, 4, 7
    s = r * z
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((b, t, h, d), (b, s, n, d), (b, s, n, d)))
    visible = rng.random((b, t, s)) < 0.6
    visible[:, :, s - z:] = False  # the last page unseen: its table entry holds no page
    visible[1] = False  # a row seeing nothing
    visible[2, 0] = False
    visible[2, 0, 5] = True  # a query seeing a single key
    table, k_pool, v_pool = _shuffled_pools(rng, z, 5, k, v)
    k_pool[table[:, -1]] = np.nan
    v_pool[table[:, -1]] = np.nan
    table[:, -1] = NO_PAGE
    q, k, v, k_pool, v_pool = map(jnp.asarray, (q, k, v, k_pool, v_pool))
    table, vis = jnp.asarray(table), jnp.asarray(visible)
    paged = jax.jit(paged_attention, static_argnames="key_block")(q, k_pool, v_pool, table, vis,
                                                                  key_block=key_block)
    contiguous = grouped_attention(q, k, v, vis, key_block=key_block)
    got, want = np.asarray(paged), np.asarray(contiguous)
    assert np.isfinite(got).all()
    seen = visible.any(axis=2)  # a query seeing nothing has an arbitrary (finite) output
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-6, atol=1e-6)


def test_write_pages_follows_the_table_and_drops_the_rest(rng):
    p, z, r, b, t = 9, 3, 4, 2, 5
    pool = rng.standard_normal((p, z, 2)).astype(np.float32)
    table = rng.permutation(p)[:b * r].reshape(b, r).astype(np.int32)
    table[1, 2:] = NO_PAGE  # row 1 holds two pages only
    chunk = rng.standard_normal((b, t, 2)).astype(np.float32)
    start = np.asarray([8, 4], np.int32)  # row 0 runs past its last slot (11)
    got = np.asarray(write_pages(*map(jnp.asarray, (pool, table, chunk, start))))
    want = pool.copy()
    for row in range(b):
        for i in range(t):
            slot = start[row] + i
            if slot < r * z and table[row, slot // z] != NO_PAGE:
                want[table[row, slot // z], slot % z] = chunk[row, i]
    np.testing.assert_array_equal(got, want)
    assert (got != pool).any(axis=(1, 2)).sum() == 3  # row 0's pages 2, 3 and row 1's page 1


def test_row_operations_move_rows_and_share_the_pool(rng):
    cfg = tiny_config()
    cache = init_cache(cfg, 4, 10, page_size=4, num_pages=8)
    assert cache.max_length == 12 and cache.key.shape[2:4] == (8, 4)
    assert (np.asarray(cache.page_table) == NO_PAGE).all()
    cache = jax.tree.map(lambda x: jnp.asarray(rng.integers(1, 9, x.shape)).astype(x.dtype), cache)
    rows = jnp.asarray([3, 1], jnp.int32)
    table = np.asarray([[5, 2, NO_PAGE], [0, NO_PAGE, NO_PAGE]], np.int32)
    fresh = reset_rows(cache, rows, jnp.asarray(table))
    np.testing.assert_array_equal(fresh.key, cache.key)  # the pool is not cleared
    np.testing.assert_array_equal(np.asarray(fresh.page_table)[[3, 1]], table)
    for name, axis in (("lightning_state", 2), ("kv_mask", 0), ("length", 0), ("next_position", 0)):
        new, old = (np.moveaxis(np.asarray(getattr(c, name)), axis, 0) for c in (fresh, cache))
        assert not new[[3, 1]].any() and (new[[0, 2]] == old[[0, 2]]).all(), name
    sub = take_rows(fresh, rows)
    assert sub.key is fresh.key and sub.length.shape == (2,)
    written = jax.tree.map(lambda x: (x + 1).astype(x.dtype), sub)
    back = put_rows(fresh, rows, keep_rows(jnp.asarray([True, False]), written, sub))
    np.testing.assert_array_equal(back.key, written.key)  # the pool comes with the written rows
    np.testing.assert_array_equal(back.length, np.asarray(fresh.length) + np.asarray([0, 0, 0, 1]))
    dropped = np.asarray(drop_writes(back, jnp.asarray([True, False, True, False])).page_table)
    assert (dropped[[1, 3]] == NO_PAGE).all()
    np.testing.assert_array_equal(dropped[[0, 2]], np.asarray(back.page_table)[[0, 2]])
