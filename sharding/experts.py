"""The MoE layer's experts split over the mesh's `expert` axis (expert parallelism).

Device e of P holds experts [e * E / P, (e + 1) * E / P) and its share of the tokens (the batch is
split over the expert axis too, so attention and the rest run there as data parallelism). Each
device sorts its tokens' expert assignments by the device that holds the expert, sends them with
one `all_to_all` (a fixed number of rows per device pair: every assignment by default, so no
token is ever dropped, or `capacity_factor` times the even share), runs its experts on what it
received, and returns the results with a second `all_to_all`. The backward pass is JAX's own
(an all_to_all's transpose is an all_to_all).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.tokens import axis_shards, spec_axes, token_spec

EXPERT = "expert"

# ffn(rows [M, D], local expert ids int32 [M] (E_local = an empty row), w1, w3, w2) -> [M, D]
LocalExperts = Callable[..., jax.Array]


def expert_shards() -> int:
    """`sharding.tokens.axis_shards("expert")`."""
    return axis_shards(EXPERT)


def experts_parallel(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array,
                     w3: jax.Array, w2: jax.Array, ffn: LocalExperts, *,
                     capacity_factor: float | None = None) -> jax.Array:
    """The weighted sum of the routed experts' outputs over the current mesh's expert axis.

    x `[B, T, D]`, weights float32 `[B, T, k]`, experts int32 `[B, T, k]`, w1 / w3 `[E, D, F]`,
    w2 `[E, F, D]` (E a multiple of the axis size; B split over the batch axes and the expert
    axis, as `sharding.tokens.token_spec` says). Returns `[B, T, D]` in x's dtype.
    """
    shards = expert_shards()
    if w1.shape[0] % shards:
        raise ValueError(f"{w1.shape[0]} experts cannot be split over the mesh's expert axis ({shards})")
    spec = token_spec(*x.shape[:2])
    if spec is None or EXPERT not in jax.tree.leaves(tuple(spec)):
        raise ValueError(f"the batch ({x.shape[0]} rows) must split over the mesh's expert axis ({shards})")
    local = functools.partial(_exchange, ffn=ffn, shards=shards, capacity_factor=capacity_factor)
    run = jax.shard_map(local, in_specs=(spec, spec, spec, P(EXPERT), P(EXPERT), P(EXPERT)),
                        out_specs=spec, axis_names=spec_axes(spec), check_vma=False)
    return run(x, weights, experts, w1, w3, w2)


def _exchange(x, weights, experts, w1, w3, w2, *, ffn, shards, capacity_factor):
    """One device's part of `experts_parallel` (inside the shard_map)."""
    b, t, d = x.shape
    k = experts.shape[-1]
    n, e_local = b * t, w1.shape[0]
    a = n * k
    cap = a if capacity_factor is None else min(a, math.ceil(capacity_factor * a / shards))
    flat = experts.reshape(a)
    dest = flat // e_local
    order = jnp.argsort(dest, stable=True)
    dest_sorted = dest[order]
    counts = jnp.bincount(dest, length=shards)
    pos = jnp.arange(a) - (jnp.cumsum(counts) - counts)[dest_sorted]
    slot = jnp.where(pos < cap, dest_sorted * cap + pos, shards * cap)  # shards * cap: dropped

    xf = x.reshape(n, d)
    send = jnp.zeros((shards * cap + 1, d), x.dtype).at[slot].set(xf[order // k])[:-1]
    ids = jnp.full((shards * cap + 1,), e_local, jnp.int32).at[slot].set(
        (flat % e_local)[order].astype(jnp.int32))[:-1]
    exchange = lambda z: jax.lax.all_to_all(z.reshape(shards, cap, *z.shape[1:]), EXPERT, 0, 0,  # noqa: E731
                                            tiled=True).reshape(z.shape)
    y = exchange(ffn(exchange(send), exchange(ids), w1, w3, w2))
    y = jnp.concatenate([y, jnp.zeros((1, d), y.dtype)])[slot]  # [a, D] in `order`; dropped: 0
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, d)
    out = jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights.reshape(n, k))
    return out.astype(x.dtype).reshape(b, t, d)
