"""RMSNorm as MiniMax computes it (spec §3.6): normalise in float32, cast back, then scale."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.params import param


def rms_normalize(x: jax.Array, eps: float, axes: Sequence[int] = (-1,)) -> jax.Array:
    """x / sqrt(mean(x^2 over `axes`) + eps), computed in float32 and returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=tuple(axes), keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the trailing `len(shape)` dims with a learned `scale` of `shape`."""

    def __init__(self, shape: Sequence[int], axes: Sequence[str | None], *, eps: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, tuple(shape), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., *shape]` in any float dtype -> same shape and dtype."""
        nd = self.scale.ndim
        y = rms_normalize(x, self.eps, axes=tuple(range(-nd, 0)))
        return y * self.scale[...].astype(x.dtype)
