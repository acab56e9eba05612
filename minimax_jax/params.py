"""Parameter creation with logical axis names (mapped to mesh axes by `sharding.rules`)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
    *,
    stddev: float | None = None,
) -> nnx.Param:
    """A parameter of `shape` in `dtype`, named by `axes` (one logical name per dimension).

    Drawn from N(0, stddev^2) when `stddev` is given (needs `rngs`), else filled with ones.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    if stddev is None:
        value = jnp.ones(shape, dtype)
    else:
        value = stddev * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)
