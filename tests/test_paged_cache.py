"""The paged K/V cache: writes land where the table says and nowhere else, and the row operations
move rows without touching the shared pool (attention through the pages: test_softmax_attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from minimax_jax.cache import (NO_PAGE, drop_writes, init_cache, keep_rows, put_rows, reset_rows,
                               take_rows, write_pages)


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
