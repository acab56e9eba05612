"""The multi-modal projector of MiniMax-VL-01 (spec minimax-vl-01 §3): linear_1 -> exact GELU ->
linear_2, both with bias, from the vision width to the text width."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.params import param
from minimax_jax.vision.vit import gelu, zeros


class Projector(nnx.Module):
    """features `[..., Dv]` -> `[..., Dt]`: gelu(x W1 + b1) W2 + b2 (W1 `[Dv, Dt]`, W2 `[Dt, Dt]`)."""

    def __init__(self, vision_size: int, text_size: int, *, param_dtype: jnp.dtype, stddev: float,
                 rngs: nnx.Rngs):
        self.linear_1 = param(rngs, (vision_size, text_size), (None, "embed"), param_dtype, stddev=stddev)
        self.linear_1_bias = zeros((text_size,), ("embed",), param_dtype)
        self.linear_2 = param(rngs, (text_size, text_size), ("mlp", "embed"), param_dtype, stddev=stddev)
        self.linear_2_bias = zeros((text_size,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., Dv]` in the compute dtype -> `[..., Dt]` in the same dtype."""
        dt = x.dtype
        h = jnp.einsum("...v,vd->...d", x, self.linear_1[...].astype(dt)) + self.linear_1_bias[...].astype(dt)
        h = gelu(h.astype(jnp.float32)).astype(dt)
        return jnp.einsum("...d,de->...e", h, self.linear_2[...].astype(dt)) + self.linear_2_bias[...].astype(dt)
