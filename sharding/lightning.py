"""Lightning attention with the sequence split over the mesh's `sequence` axis (LASP+).

Shard i of P holds tokens [i * L, (i + 1) * L) of every row (in zigzag order, two chunks of the
sequence, each treated below as a shard of its own: 2P chunks). Each shard runs the one-device op on
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

from sharding.tokens import SEQUENCE, sequence_chunks, spec_axes, token_spec, zigzag_chunk

LocalOp = Callable[..., tuple[jax.Array, jax.Array]]


def lightning_attention_sp(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array,
                           initial_state: jax.Array, segment_ids: jax.Array | None,
                           local_op: LocalOp, *, zigzag: bool = False) -> tuple[jax.Array, jax.Array]:
    """`pallas_kernels.lightning_attention` over the current mesh's `sequence` axis.

    q, k, v `[B, T, H, D]` (T split over the axis; T must be a multiple of its size), slopes
    float32 `[H]`, initial_state float32 `[B, H, D, D]`, segment_ids int `[B, T]` or None.
    zigzag: the tokens are in `sharding.tokens.zigzag_order` (each shard holds two chunks of the
    sequence, each run as a shard of its own). `local_op(q, k, v, slopes, initial_state,
    segment_ids) -> (o, final_state)` is the one-device op run on each chunk. Returns (o
    `[B, T, H, D]` in q's dtype, final state float32 `[B, H, D, D]`).
    """
    shards, per_shard = sequence_chunks(q.shape[1], zigzag)
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    tokens = token_spec(*q.shape[:2])  # the sequence, and the batch where it splits too
    rows = P(tokens[0])  # the initial and final states: split as the batch is
    run = jax.shard_map(
        lambda q, k, v, s0, seg: _shard(q, k, v, slopes, s0, seg, local_op, shards, per_shard),
        in_specs=(tokens, tokens, tokens, rows, tokens), out_specs=(tokens, rows),
        axis_names=spec_axes(tokens), check_vma=False)  # the one-device ops are not written for VMA types
    return run(q, k, v, initial_state, segment_ids)


def _shard(q, k, v, slopes, s0, seg, local_op, shards, per_shard):
    """One shard's part of `lightning_attention_sp` (inside the shard_map): its `per_shard`
    chunks, chunk j of the shard being chunk `chunk_of(index, j)` of the sequence."""
    b, length, h, _ = q.shape
    n = length // per_shard  # tokens per chunk
    index = jax.lax.axis_index(SEQUENCE)
    chunk_of = (lambda i, j: i) if per_shard == 1 else (lambda i, j: zigzag_chunk(i, j, shards))
    # the sequence's chunks in order, as (shard, chunk of that shard)
    home = sorted(((chunk_of(i, j), i, j) for i in range(shards) for j in range(per_shard)))
    where_is = jnp.asarray([i * per_shard + j for _, i, j in home])  # chunk -> gathered index

    part = lambda x, j: x[:, j * n:(j + 1) * n]
    local = [local_op(part(q, j), part(k, j), part(v, j), slopes, jnp.zeros_like(s0), part(seg, j))
             for j in range(per_shard)]

    # where the entering state stops counting: the first document start in each chunk
    lasts = jax.lax.all_gather(seg[:, n - 1::n], SEQUENCE)  # [P, B, per_shard]
    lasts = jnp.moveaxis(lasts, 2, 1).reshape(shards * per_shard, b)[where_is]  # [chunks, B]
    decay = jnp.exp(-slopes.astype(jnp.float32) * n)  # [H]
    firsts, carry = [], []
    for j in range(per_shard):
        c = chunk_of(index, j)
        s_j = part(seg, j)
        starts_here = (c > 0) & (s_j[:, 0] != lasts[jnp.maximum(c - 1, 0)])
        change = jnp.concatenate([starts_here[:, None], s_j[:, 1:] != s_j[:, :-1]], axis=1)  # [B, n]
        firsts.append(jnp.where(jnp.any(change, axis=1), jnp.argmax(change, axis=1), n))  # [B]
        carry.append(jnp.where((firsts[-1] == n)[:, None], decay[None, :], 0.0))  # [B, H]

    gather = lambda x: jnp.moveaxis(jax.lax.all_gather(jnp.stack(x, 1), SEQUENCE), 2, 1).reshape(
        shards * per_shard, *x[0].shape)[where_is]
    states = gather([s for _, s in local])  # [chunks, B, H, D, D]
    carries = gather(carry)  # [chunks, B, H]

    def step(state, xs):
        carry_j, s_j = xs
        return carry_j[..., None, None] * state + s_j, state

    final, entering = jax.lax.scan(step, s0.astype(jnp.float32), (carries, states))

    t = jnp.arange(n, dtype=jnp.float32)
    weight = jnp.exp(-slopes.astype(jnp.float32)[None, :] * (t[:, None] + 1))  # [n, H]
    outs = []
    for j, (o_local, _) in enumerate(local):
        e = entering[chunk_of(index, j)]  # [B, H, D, D]
        w = weight[None] * (jnp.arange(n)[None, :] < firsts[j][:, None])[..., None]  # [B, n, H]
        add = jnp.einsum("blhk,bhkv->blhv", part(q, j).astype(jnp.float32), e) * w[..., None]
        outs.append((o_local.astype(jnp.float32) + add).astype(q.dtype))
    return jnp.concatenate(outs, axis=1), final
