"""GQA softmax attention, causal or bidirectional: one op, several implementations.

The mask, for every implementation: key j is visible to query i of row b iff
``j <= i + q_offset[b]`` (causal; query i sits at key slot ``q_offset[b] + i``; with
``causal=False`` every key passes this test) and, when segment ids are given,
``q_segment_ids[b, i] == kv_segment_ids[b, j]``. Padding is a segment id that no
query carries. Scores are scaled by 1/sqrt(K) and the softmax statistics are float32. A query that
sees no key gets 0.

Implementations (``SOFTMAX_IMPLS``): "cudnn" (cuDNN flash attention, Hopper, self-attention; with
segment ids through cuDNN's packed form where its backward workspace fits, see
``softmax_cudnn.packed_plan``), "splash" (JAX's Pallas TPU splash attention, self-attention,
``softmax_tpu``; chosen where the program is lowered, by ``lax.platform_dependent``, so a program
compiled ahead of time for a TPU takes it too, and "xla" elsewhere), "xla" (blockwise flash-style
XLA, memory linear in T and S in forward and backward, any backend), "reference" (all scores at
once; the oracle), "pallas" (for ``paged_softmax_attention`` of one query token per row: the
Mosaic GPU decode kernel of ``softmax_gpu`` on Hopper, reading pages in place; self-attention
takes "xla") and "auto" (cuDNN where it supports the call, splash on TPU, the decode kernel for
paged decode on Hopper, else "xla"). A call an
implementation does not support falls back to "xla".
Under a mesh (``jax.set_mesh``) with a ``sequence`` axis of size P > 1, self-attention (no
q_offset) other than "reference" runs as ring attention over that axis (``sharding.softmax``,
the "xla" form per block); T must then be a multiple of P (of 2P in zigzag order, which balances
the causal work over the shards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import softmax_cudnn, softmax_gpu, softmax_tpu
from pallas_kernels.device import can_run_mosaic, run_manual
from pallas_kernels.reference import softmax_attention_reference
from pallas_kernels.softmax_xla import attention_xla, paged_attention_xla
from sharding.tokens import sequence_shards, zigzag_order
from sharding.softmax import softmax_attention_ring

SOFTMAX_IMPLS = ("auto", "cudnn", "splash", "pallas", "xla", "reference")
BLOCK_Q = 512  # query rows per block of the "xla" form
BLOCK_K = 512  # key slots per block of the "xla" form


def _check(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids, kv_segment_ids,
           q_offset, impl: str, s: int) -> None:
    if impl not in SOFTMAX_IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(SOFTMAX_IMPLS)}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    b, t, h, kd = q.shape
    if k.shape != v.shape or k.shape[-1] != kd or h % k.shape[-2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, with head dim "
                         f"{kd} and a number of heads dividing {h} (q {tuple(q.shape)})")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        for name, x, shape in (("q_segment_ids", q_segment_ids, (b, t)),
                               ("kv_segment_ids", kv_segment_ids, (b, s))):
            if tuple(x.shape) != shape or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"{name} must be integer {shape}, got {x.dtype} {tuple(x.shape)}")
    if q_offset is not None and tuple(q_offset.shape) != (b,):
        raise ValueError(f"q_offset must be [{b}], got shape {tuple(q_offset.shape)}")


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      q_segment_ids: jax.Array | None = None,
                      kv_segment_ids: jax.Array | None = None,
                      q_offset: jax.Array | None = None, impl: str = "auto",
                      block_q: int | None = None, block_k: int | None = None,
                      zigzag: bool = False, causal: bool = True) -> jax.Array:
    """GQA attention over contiguous keys (training, prefill, a vision tower), differentiable in
    q, k, v.

    q ``[B, T, H, K]``; k, v ``[B, S, N, K]`` (N divides H; query head h uses kv head
    h // (H / N)); segment ids int ``[B, T]`` and ``[B, S]``; q_offset int32 ``[B]`` (None: 0).
    block_q, block_k: the "xla" form's blocks (default BLOCK_Q, BLOCK_K).
    zigzag: q, k, v and the segment ids are in the current mesh's zigzag order
    (``sharding.tokens.zigzag_order``; self-attention under a mesh with a ``sequence`` axis).
    causal: False lets every query see every key its segment ids allow (no q_offset then; not
    split over a ``sequence`` axis; cuDNN takes it without segment ids, the "xla" form otherwise).
    Returns ``[B, T, H, K]`` in q's dtype.
    """
    _check(q, k, v, q_segment_ids, kv_segment_ids, q_offset, impl, k.shape[1])
    if not causal and q_offset is not None:
        raise ValueError("q_offset places queries for the causal mask; causal=False takes none")
    ring = causal and q_offset is None and k.shape[1] == q.shape[1] and sequence_shards() > 1
    if zigzag and not ring:
        raise ValueError("zigzag token order is for causal self-attention under a mesh with a "
                         "sequence axis of more than one shard")
    if not causal:  # every key slot j < S passes j <= i + S
        offset = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
    else:
        offset = jnp.zeros((q.shape[0],), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)

    def xla() -> jax.Array:
        return attention_xla(q, k, v, q_segment_ids, kv_segment_ids, offset,
                             block_q=block_q or BLOCK_Q, block_k=block_k or BLOCK_K)

    if impl == "reference":
        if zigzag:  # the oracle runs in the tokens' own order
            order = zigzag_order(q.shape[1], sequence_shards())
            back = lambda x: None if x is None else x[:, np.argsort(order)]
            o = softmax_attention_reference(back(q), back(k), back(v), back(q_segment_ids),
                                            back(kv_segment_ids), offset)
            return o[:, order]
        return softmax_attention_reference(q, k, v, q_segment_ids, kv_segment_ids, offset)
    if ring:
        return softmax_attention_ring(q, k, v, q_segment_ids, kv_segment_ids,
                                      block_q=block_q or BLOCK_Q, block_k=block_k or BLOCK_K,
                                      zigzag=zigzag)
    if impl in ("auto", "cudnn") and softmax_cudnn.supports(q, k, v, q_offset is not None):
        if q_segment_ids is None:
            return softmax_cudnn.self_cudnn(q, k, v, causal=causal)
        if not causal:
            return xla()
        limit, groups = softmax_cudnn.packed_plan(q, k.shape[2])
        if limit == 0:
            return xla()
        cudnn = lambda: softmax_cudnn.packed_cudnn(q, k, v, q_segment_ids, xla, max_segments=limit,
                                                   head_groups=groups)
        if q_segment_ids is kv_segment_ids:
            return cudnn()
        return jax.lax.cond(jnp.array_equal(q_segment_ids, kv_segment_ids), cudnn, xla)
    if impl in ("auto", "splash") and causal and softmax_tpu.supports(q, k, v, q_offset is not None):
        return jax.lax.platform_dependent(tpu=lambda: _splash(q, k, v, q_segment_ids, kv_segment_ids, xla),
                                          default=xla)
    return xla()


def _splash(q, k, v, q_segment_ids, kv_segment_ids, xla):
    """Splash where every query sees itself (no segment ids, or equal q and kv ids), else xla()."""
    if q_segment_ids is None or q_segment_ids is kv_segment_ids:
        return softmax_tpu.splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
    return jax.lax.cond(jnp.array_equal(q_segment_ids, kv_segment_ids),
                        lambda: softmax_tpu.splash_attention(q, k, v, q_segment_ids, kv_segment_ids),
                        xla)


def paged_softmax_attention(q: jax.Array, key_pages: jax.Array, value_pages: jax.Array,
                            page_table: jax.Array, *, q_segment_ids: jax.Array | None = None,
                            kv_segment_ids: jax.Array | None = None,
                            q_offset: jax.Array | None = None, impl: str = "auto",
                            block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Causal GQA attention over keys kept in a pool of pages (prefill chunks and decode).

    q ``[B, T, H, K]``; key_pages, value_pages ``[P, Z, N, K]``; page_table int32 ``[B, R]``: row
    b's key slot s is offset s % Z of page page_table[b, s // Z] (S = R * Z slots; entries out of
    range read some page, which the mask must hide through kv_segment_ids ``[B, S]``). Pages are
    read block by block through the table, never gathered whole. "reference" gathers all pages
    and runs the reference; "pallas" and "auto" run the Mosaic GPU decode kernel where it supports the call
    (``softmax_gpu.supports``: Hopper, T 1, pages in q's 16-bit dtype; outside a mesh or on a
    mesh of one device); every other call runs the blockwise XLA form (blocks block_q query rows
    by block_k key slots, rounded down to whole pages). Returns ``[B, T, H, K]`` in q's dtype.
    """
    if key_pages.ndim != 4 or page_table.ndim != 2:
        raise ValueError(f"key_pages must be [P, Z, N, K] and page_table [B, R], got shapes "
                         f"{tuple(key_pages.shape)} and {tuple(page_table.shape)}")
    b, r = page_table.shape
    z = key_pages.shape[1]
    row = jax.ShapeDtypeStruct((b, r * z) + key_pages.shape[2:], key_pages.dtype)
    _check(q, row, jax.ShapeDtypeStruct((b, r * z) + value_pages.shape[2:], value_pages.dtype),
           q_segment_ids, kv_segment_ids, q_offset, impl, r * z)
    offset = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    if impl == "reference":
        k, v = (jnp.take(x, page_table, axis=0, mode="clip").reshape(b, r * z, *x.shape[2:])
                for x in (key_pages, value_pages))
        return softmax_attention_reference(q, k.astype(q.dtype), v.astype(q.dtype), q_segment_ids,
                                           kv_segment_ids, offset)
    if impl in ("pallas", "auto") and softmax_gpu.supports(q, key_pages) and can_run_mosaic():
        return run_manual(softmax_gpu.paged_decode_attention, (q, key_pages, value_pages, page_table,
                                                              q_segment_ids, kv_segment_ids, offset))
    return paged_attention_xla(q, key_pages, value_pages, page_table, q_segment_ids,
                               kv_segment_ids, offset, block_q=block_q or BLOCK_Q,
                               block_k=block_k or BLOCK_K)
