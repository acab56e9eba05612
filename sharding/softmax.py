"""Softmax attention with the sequence split over the mesh's `sequence` axis: ring attention.

Shard i of P holds queries, keys and values of tokens [i * L, (i + 1) * L). The keys and values
(with their segment ids) go round the ring by `ppermute`, one shard further per step; at step s
shard i attends its queries to block j = i - s (mod P) with the blockwise XLA form (the causal
offset (i - j) * L; blocks after the queries' own are skipped) and merges the partial results by
their float32 log-sum-exp. The backward pass sends the keys and values round again, with their
gradients accumulating beside them, and returns each block's gradients to its shard after P
steps. Each step passes L * N * K keys and values per device; no device holds more than two key
blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.softmax_xla import attention_grads, attention_with_lse
from sharding.tokens import SEQUENCE, sequence_shards, spec_axes, token_spec


def softmax_attention_ring(q: jax.Array, k: jax.Array, v: jax.Array,
                           q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, *,
                           block_q: int, block_k: int) -> jax.Array:
    """Causal GQA self-attention over the current mesh's `sequence` axis (the mask of
    `pallas_kernels.softmax_attention` without q_offset).

    q `[B, T, H, K]`, k and v `[B, T, N, K]` (T a multiple of the axis size), segment ids int
    `[B, T]` (both or neither). Returns `[B, T, H, K]` in q's dtype.
    """
    shards = sequence_shards()
    t = q.shape[1]
    if t % shards:
        raise ValueError(f"sequence length {t} is not a multiple of the mesh's sequence axis ({shards})")
    if q_segment_ids is None:
        q_segment_ids = kv_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    tokens = token_spec(*q.shape[:2])  # the sequence, and the batch where it splits too
    ring = functools.partial(_ring, shards=shards, block_q=block_q, block_k=block_k)
    run = jax.shard_map(ring, in_specs=(tokens,) * 5, out_specs=tokens, axis_names=spec_axes(tokens),
                        check_vma=False)
    return run(q, k, v, q_segment_ids, kv_segment_ids)


def _rotate(xs, shards: int):
    """Every array of xs one shard further round the ring."""
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, SEQUENCE, perm), xs)


def _offset(q: jax.Array, s: int, shards: int) -> tuple[jax.Array, jax.Array]:
    """(whether shard i sees key block i - s at all, the causal offset `[B]` of that block)."""
    i = jax.lax.axis_index(SEQUENCE)
    j = (i - s) % shards
    return j <= i, jnp.full((q.shape[0],), (i - j) * q.shape[1], jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, q_seg, kv_seg, shards, block_q, block_k):
    """One shard's ring attention (inside the shard_map): its output `[B, L, H, K]`."""
    return _ring_fwd(q, k, v, q_seg, kv_seg, shards, block_q, block_k)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, shards, block_q, block_k):
    b, length, h, kd = q.shape
    o = jnp.zeros((b, length, h, kd), jnp.float32)
    lse = jnp.full((b, length, h), -jnp.inf, jnp.float32)
    block = (k, v, kv_seg)
    for s in range(shards):
        seen, offset = _offset(q, s, shards)

        def merge(acc, block=block, offset=offset):
            o, lse = acc
            o_s, lse_s = attention_with_lse(q, block[0], block[1], q_seg, block[2], offset,
                                            block_q=block_q, block_k=block_k)
            new = jnp.logaddexp(lse, lse_s)
            keep, take = jnp.exp(lse - new)[..., None], jnp.exp(lse_s - new)[..., None]
            return o * keep + o_s.astype(jnp.float32) * take, new

        o, lse = jax.lax.cond(seen, merge, lambda acc: acc, (o, lse))
        if s + 1 < shards:
            block = _rotate(block, shards)
    o = o.astype(q.dtype)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _ring_bwd(shards, block_q, block_k, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    dq = jnp.zeros(q.shape, jnp.float32)
    block = (k, v, kv_seg, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for s in range(shards):
        seen, offset = _offset(q, s, shards)

        def add(acc, block=block, offset=offset):
            dq, dk, dv = acc
            g = attention_grads(q, block[0], block[1], q_seg, block[2], offset, o, lse, do,
                                block_q=block_q, block_k=block_k)
            return dq + g[0], dk + g[1], dv + g[2]

        dq, dk, dv = jax.lax.cond(seen, add, lambda acc: acc, (dq, block[3], block[4]))
        block = _rotate((*block[:3], dk, dv), shards)  # after P steps each block is home again
    return (dq.astype(q.dtype), block[3].astype(k.dtype), block[4].astype(v.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)
