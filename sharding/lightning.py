"""Lightning attention with the sequence split over the mesh's `sequence` axis (LASP+).

Shard i of P holds tokens [i * L, (i + 1) * L) of every row. Each shard runs the one-device op on
its tokens from a zero state, giving its local output and local final state S_i. The local states
and each shard's decay over its whole length (exp(-slope * L), or 0 when a document starts inside
the shard) are all-gathered: O(P * H * D^2) per device and layer, independent of T. Every shard
then forms its entering state, the decayed prefix
    E_0 = initial_state,   E_{i+1} = A_i E_i + S_i,
and adds the entering state's part to its output: o_t += exp(-slope * (t + 1)) q_t E_i for the
tokens before the shard's first document start. The final state E_P is the same on every shard.
The backward pass is JAX's own through these steps (the all-gather's transpose is a reduce-scatter),
so it is exact.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.tokens import SEQUENCE, sequence_shards, spec_axes, token_spec

LocalOp = Callable[..., tuple[jax.Array, jax.Array]]


def lightning_attention_sp(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array,
                           initial_state: jax.Array, segment_ids: jax.Array | None,
                           local_op: LocalOp) -> tuple[jax.Array, jax.Array]:
    """`pallas_kernels.lightning_attention` over the current mesh's `sequence` axis.

    q, k, v `[B, T, H, D]` (T split over the axis; T must be a multiple of its size), slopes
    float32 `[H]`, initial_state float32 `[B, H, D, D]`, segment_ids int `[B, T]` or None.
    `local_op(q, k, v, slopes, initial_state, segment_ids) -> (o, final_state)` is the one-device
    op run on each shard. Returns (o `[B, T, H, D]` in q's dtype, final state float32
    `[B, H, D, D]`).
    """
    shards = sequence_shards()
    t = q.shape[1]
    if t % shards:
        raise ValueError(f"sequence length {t} is not a multiple of the mesh's sequence axis ({shards})")
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    tokens = token_spec(*q.shape[:2])  # the sequence, and the batch where it splits too
    rows = P(tokens[0])  # the initial and final states: split as the batch is
    run = jax.shard_map(
        lambda q, k, v, s0, seg: _shard(q, k, v, slopes, s0, seg, local_op, shards),
        in_specs=(tokens, tokens, tokens, rows, tokens), out_specs=(tokens, rows),
        axis_names=spec_axes(tokens), check_vma=False)  # the one-device ops are not written for VMA types
    return run(q, k, v, initial_state, segment_ids)


def _shard(q, k, v, slopes, s0, seg, local_op, shards):
    """One shard's part of `lightning_attention_sp` (inside the shard_map)."""
    b, length, h, _ = q.shape
    index = jax.lax.axis_index(SEQUENCE)
    o_local, s_local = local_op(q, k, v, slopes, jnp.zeros_like(s0), seg)

    # where the entering state stops counting: the first document start in the shard
    lasts = jax.lax.all_gather(seg[:, -1], SEQUENCE)  # [P, B]
    starts_here = (index > 0) & (seg[:, 0] != lasts[jnp.maximum(index - 1, 0)])
    change = jnp.concatenate([starts_here[:, None], seg[:, 1:] != seg[:, :-1]], axis=1)  # [B, L]
    first = jnp.where(jnp.any(change, axis=1), jnp.argmax(change, axis=1), length)  # [B]

    decay = jnp.exp(-slopes.astype(jnp.float32) * length)  # [H]
    carry = jnp.where((first == length)[:, None], decay[None, :], 0.0)  # [B, H]
    states = jax.lax.all_gather(s_local, SEQUENCE)  # [P, B, H, D, D]
    carries = jax.lax.all_gather(carry, SEQUENCE)  # [P, B, H]

    def step(state, xs):
        carry_j, s_j = xs
        return carry_j[..., None, None] * state + s_j, state

    final, entering = jax.lax.scan(step, s0.astype(jnp.float32), (carries, states))
    e = entering[index]  # [B, H, D, D]

    t = jnp.arange(length, dtype=jnp.float32)
    weight = jnp.exp(-slopes.astype(jnp.float32)[None, :] * (t[:, None] + 1))  # [L, H]
    weight = weight[None] * (jnp.arange(length)[None, :] < first[:, None])[..., None]  # [B, L, H]
    part = jnp.einsum("blhk,bhkv->blhv", q.astype(jnp.float32), e) * weight[..., None]
    return (o_local.astype(jnp.float32) + part).astype(q.dtype), final
