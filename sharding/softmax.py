"""Softmax attention with the sequence split over the mesh's `sequence` axis: ring attention.

Shard i of P holds queries, keys and values of tokens [i * L, (i + 1) * L). The keys and values
(with their segment ids) go round the ring by `ppermute`, one shard further per step; at step s
shard i attends its queries to block j = i - s (mod P) with the blockwise XLA form (the causal
offset (i - j) * L; blocks after the queries' own are skipped) and merges the partial results by
their float32 log-sum-exp. The backward pass sends the keys and values round again, with their
gradients accumulating beside them, and returns each block's gradients to its shard after P
steps. Each step passes L * N * K keys and values per device; no device holds more than two key
blocks. In zigzag order (`sharding.tokens`) each shard's queries and each key block are two
chunks of the sequence, attended pair by pair with their own causal offsets: every shard then
does the same work at every step (two chunk pairs' worth), where in the contiguous order shard i
attends at i + 1 of the P steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.softmax_xla import attention_grads, attention_with_lse
from sharding.tokens import SEQUENCE, sequence_chunks, spec_axes, token_spec, zigzag_chunk


def softmax_attention_ring(q: jax.Array, k: jax.Array, v: jax.Array,
                           q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, *,
                           block_q: int, block_k: int, zigzag: bool = False) -> jax.Array:
    """Causal GQA self-attention over the current mesh's `sequence` axis (the mask of
    `pallas_kernels.softmax_attention` without q_offset).

    q `[B, T, H, K]`, k and v `[B, T, N, K]` (T a multiple of the axis size, of twice it with
    zigzag), segment ids int `[B, T]` (both or neither); zigzag: the tokens are in
    `sharding.tokens.zigzag_order`. Returns `[B, T, H, K]` in q's dtype.
    """
    shards, per_shard = sequence_chunks(q.shape[1], zigzag)
    if q_segment_ids is None:
        q_segment_ids = kv_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    tokens = token_spec(*q.shape[:2])  # the sequence, and the batch where it splits too
    ring = functools.partial(_ring, shards=shards, per_shard=per_shard, block_q=block_q,
                             block_k=block_k)
    run = jax.shard_map(ring, in_specs=(tokens,) * 5, out_specs=tokens, axis_names=spec_axes(tokens),
                        check_vma=False)
    return run(q, k, v, q_segment_ids, kv_segment_ids)


def _rotate(xs, shards: int):
    """Every array of xs one shard further round the ring."""
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, SEQUENCE, perm), xs)


def _pairs(q: jax.Array, s: int, shards: int, per_shard: int):
    """At ring step s, for each (query chunk a, key chunk c) of this shard and the key block it
    holds (from shard i - s): (a, c, whether a sees c at all, the causal offset `[B]` of c)."""
    i = jax.lax.axis_index(SEQUENCE)
    j = (i - s) % shards
    n = q.shape[1] // per_shard
    chunk = (lambda x, h: x) if per_shard == 1 else (lambda x, h: zigzag_chunk(x, h, shards))
    for a in range(per_shard):
        for c in range(per_shard):
            qc, kc = chunk(i, a), chunk(j, c)
            yield a, c, kc <= qc, jnp.full((q.shape[0],), (qc - kc) * n, jnp.int32)


def _split(x: jax.Array, per_shard: int) -> list[jax.Array]:
    n = x.shape[1] // per_shard
    return [x[:, j * n:(j + 1) * n] for j in range(per_shard)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q, k, v, q_seg, kv_seg, shards, per_shard, block_q, block_k):
    """One shard's ring attention (inside the shard_map): its output `[B, L, H, K]`."""
    return _ring_fwd(q, k, v, q_seg, kv_seg, shards, per_shard, block_q, block_k)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, shards, per_shard, block_q, block_k):
    qs, q_segs = _split(q, per_shard), _split(q_seg, per_shard)
    acc = [(jnp.zeros(x.shape, jnp.float32), jnp.full(x.shape[:3], -jnp.inf, jnp.float32))
           for x in qs]
    block = (k, v, kv_seg)
    for s in range(shards):
        ks, vs, kv_segs = (_split(x, per_shard) for x in block)
        for a, c, seen, offset in _pairs(q, s, shards, per_shard):

            def merge(acc_a, a=a, c=c, offset=offset):
                o, lse = acc_a
                o_s, lse_s = attention_with_lse(qs[a], ks[c], vs[c], q_segs[a], kv_segs[c], offset,
                                                block_q=block_q, block_k=block_k)
                new = jnp.logaddexp(lse, lse_s)
                keep, take = jnp.exp(lse - new)[..., None], jnp.exp(lse_s - new)[..., None]
                return o * keep + o_s.astype(jnp.float32) * take, new

            acc[a] = jax.lax.cond(seen, merge, lambda acc_a: acc_a, acc[a])
        if s + 1 < shards:
            block = _rotate(block, shards)
    o = jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype)
    lse = jnp.concatenate([lse for _, lse in acc], axis=1)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _ring_bwd(shards, per_shard, block_q, block_k, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    qs, q_segs, os_, lses, dos = (_split(x, per_shard) for x in (q, q_seg, o, lse, do))
    dq = [jnp.zeros(x.shape, jnp.float32) for x in qs]
    block = (k, v, kv_seg, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for s in range(shards):
        ks, vs, kv_segs, dks, dvs = (_split(x, per_shard) for x in block)
        for a, c, seen, offset in _pairs(q, s, shards, per_shard):

            def add(acc, a=a, c=c, offset=offset):
                dq_a, dk_c, dv_c = acc
                g = attention_grads(qs[a], ks[c], vs[c], q_segs[a], kv_segs[c], offset, os_[a],
                                    lses[a], dos[a], block_q=block_q, block_k=block_k)
                return dq_a + g[0], dk_c + g[1], dv_c + g[2]

            dq[a], dks[c], dvs[c] = jax.lax.cond(seen, add, lambda acc: acc, (dq[a], dks[c], dvs[c]))
        dk, dv = jnp.concatenate(dks, axis=1), jnp.concatenate(dvs, axis=1)
        block = _rotate((*block[:3], dk, dv), shards)  # after P steps each block is home again
    return (jnp.concatenate(dq, axis=1).astype(q.dtype), block[3].astype(k.dtype),
            block[4].astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)
