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
