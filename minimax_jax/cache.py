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


def take_row(cache: Cache, row: jax.Array) -> Cache:
    """Row `row` (int32 scalar, may be traced) of `cache` as a cache of batch 1."""
    return jax.tree.map(lambda x, axis: jax.lax.dynamic_slice_in_dim(x, row, 1, axis), cache, BATCH_AXES)


def put_row(cache: Cache, row: jax.Array, sub: Cache) -> Cache:
    """`cache` with row `row` replaced by the batch-1 cache `sub`."""
    return jax.tree.map(lambda x, s, axis: jax.lax.dynamic_update_slice_in_dim(x, s, row, axis),
                        cache, sub, BATCH_AXES)


def reset_row(cache: Cache, row: jax.Array) -> Cache:
    """`cache` with row `row` emptied (zero state, no K/V slots in use, position 0)."""
    return put_row(cache, row, jax.tree.map(lambda x: jnp.zeros_like(x), take_row(cache, row)))


def keep_rows(keep: jax.Array, new: Cache, old: Cache) -> Cache:
    """Row b from `new` where keep[b] (bool `[B]`), else from `old`."""

    def pick(n: jax.Array, o: jax.Array, axis: int) -> jax.Array:
        shape = [1] * n.ndim
        shape[axis] = keep.shape[0]
        return jnp.where(keep.reshape(shape), n, o)

    return jax.tree.map(pick, new, old, BATCH_AXES)
