"""The decoding cache: float32 lightning states, K/V of the softmax layers, explicit positions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from minimax_jax.config import FULL, LINEAR, MiniMaxConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """Per-sequence decoding state, stacked like the scanned layer blocks.

    lightning_state float32 `[num_blocks, n_linear, B, H, K, K]`: one state per lightning layer
    (n_linear = lightning layers in the repeating block). key, value `[num_blocks, n_full, B, S, N, K]`
    (post-RoPE keys; S = max_length slots). kv_mask bool `[B, S]`: slot holds a real token.
    length int32 `[B]`: slots written so far in each row (padding slots count; they stay masked).
    next_position int32 `[B]`: the RoPE position of each row's next token.
    """

    lightning_state: jax.Array
    key: jax.Array
    value: jax.Array
    kv_mask: jax.Array
    length: jax.Array
    next_position: jax.Array

    @property
    def max_length(self) -> int:
        return self.kv_mask.shape[1]


def init_cache(cfg: MiniMaxConfig, batch_size: int, max_length: int) -> Cache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens (K/V in cfg.dtype)."""
    pattern = cfg.block_pattern
    n_lin, n_full = pattern.count(LINEAR), pattern.count(FULL)
    nb, h, n, k = cfg.num_blocks, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kv_shape = (nb, n_full, batch_size, max_length, n, k)
    return Cache(
        lightning_state=jnp.zeros((nb, n_lin, batch_size, h, k, k), jnp.float32),
        key=jnp.zeros(kv_shape, cfg.dtype),
        value=jnp.zeros(kv_shape, cfg.dtype),
        kv_mask=jnp.zeros((batch_size, max_length), jnp.bool_),
        length=jnp.zeros((batch_size,), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32),
    )


# The batch axis of every Cache leaf (rows are the serving engine's slots).
BATCH_AXES = Cache(lightning_state=2, key=2, value=2, kv_mask=0, length=0, next_position=0)


def take_rows(cache: Cache, rows: jax.Array) -> Cache:
    """Rows `rows` (int32 `[R]`, may be traced) of `cache`, as a cache of batch R."""
    return jax.tree.map(lambda x, axis: jnp.take(x, rows, axis=axis), cache, BATCH_AXES)


def put_rows(cache: Cache, rows: jax.Array, sub: Cache) -> Cache:
    """`cache` with rows `rows` (int32 `[R]`, distinct) replaced by the batch-R cache `sub`."""

    def put(x: jax.Array, s: jax.Array, axis: int) -> jax.Array:
        return x.at[(slice(None),) * axis + (rows,)].set(s)

    return jax.tree.map(put, cache, sub, BATCH_AXES)


def reset_rows(cache: Cache, rows: jax.Array) -> Cache:
    """`cache` with rows `rows` emptied (zero state, no K/V slots in use, position 0)."""
    return put_rows(cache, rows, jax.tree.map(jnp.zeros_like, take_rows(cache, rows)))


def keep_rows(keep: jax.Array, new: Cache, old: Cache) -> Cache:
    """Row b from `new` where keep[b] (bool `[B]`), else from `old`."""

    def pick(n: jax.Array, o: jax.Array, axis: int) -> jax.Array:
        shape = [1] * n.ndim
        shape[axis] = keep.shape[0]
        return jnp.where(keep.reshape(shape), n, o)

    return jax.tree.map(pick, new, old, BATCH_AXES)
