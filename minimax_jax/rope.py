"""Rotary position embedding, rotate-half style, on the first `rotary_dim` dims of each head."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float, rotary_dim: int) -> jax.Array:
    """Rotate x `[B, T, N, K]` at integer `positions` `[B, T]` (spec §4).

    On channels 0..r-1 (r = rotary_dim), pairs (i, i + r/2) rotate by angle p * theta^(-2i/r);
    channels r..K-1 pass through. Computed in float32, returned in x's dtype.
    """
    half = rotary_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary_dim)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
