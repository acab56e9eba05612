"""Blockwise (flash-style) softmax attention in plain XLA, for every backend.

Queries are taken `block_q` at a time (`lax.map`), keys `block_k` at a time (a loop that stops at
the last key block any query of the block can see, and skips blocks with nothing visible); the
softmax runs online in float32. The backward pass (`jax.custom_vjp`) recomputes each block's
probabilities from the saved float32 log-sum-exp, in two passes (dq over query blocks; dk and dv
over key blocks), so forward and backward both use memory linear in T and S: no score block is
saved. The mask is the op's (`pallas_kernels.softmax_attention`): key j is visible to query i of
row b iff j <= i + q_offset[b] and q_segment_ids[b, i] == kv_segment_ids[b, j].

Shapes: q `[B, T, H, K]`, k and v `[B, S, N, K]` (H = N * G; query head h uses kv head h // G).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

NEG = -1e30  # the score of a hidden key (finite, so fully hidden rows stay NaN-free)


def _visible(q_idx, k_idx, q_seg, kv_seg, q_offset, s_len: int) -> jax.Array:
    """bool `[B, bq, bk]` for absolute query rows q_idx `[bq]`, key slots k_idx `[bk]`."""
    vis = k_idx[None, None, :] <= q_idx[None, :, None] + q_offset[:, None, None]
    vis &= (k_idx < s_len)[None, None, :]
    if q_seg is not None:
        vis &= q_seg[:, :, None] == kv_seg[:, None, :]
    return vis


def _pad_to(x: jax.Array | None, axis: int, size: int, mode: str = "constant") -> jax.Array | None:
    if x is None or x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, mode=mode)


def _blocks(t: int, block: int) -> tuple[int, int]:
    """(block length, number of blocks) covering t positions."""
    b = min(block, t)
    return b, -(-t // b)


def _forward(q, fetch: Callable, nk: int, bk: int, s_len: int, q_seg, q_offset, block_q: int):
    """The online-softmax forward over the key blocks that `fetch` returns.

    q `[B, T, H, K]`; fetch(j) -> (keys, values `[B, bk, N, K]`, kv segment ids `[B, bk]` or None)
    of key block j (slots j * bk ...); q_seg int `[B, T]` or None; q_offset int32 `[B]`. Values
    that no query of a block sees are zeroed (a page pool may hold stale data). Returns
    (o `[B, T, H, K]` in q's dtype, lse float32 `[B, T, H]`; a query that sees nothing gets o = 0
    and lse = NEG).
    """
    b, t, h, kd = q.shape
    bq, nq = _blocks(t, block_q)
    scale = kd ** -0.5
    qp = _pad_to(q, 1, nq * bq)
    qsp = _pad_to(q_seg, 1, nq * bq, "edge")
    max_off = jnp.max(q_offset)
    nkv = jax.eval_shape(fetch, 0)[0].shape[2]
    g = h // nkv

    def one_block(i):
        qg = lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1).reshape(b, bq, nkv, g, kd)
        qs = None if qsp is None else lax.dynamic_slice_in_dim(qsp, i * bq, bq, axis=1)
        q_idx = i * bq + jnp.arange(bq)

        def body(j, carry):
            kb, vb, ks = fetch(j)
            vis = _visible(q_idx, j * bk + jnp.arange(bk), qs, ks, q_offset, s_len)

            def attend(c):
                m, l, acc = c
                v_seen = jnp.where(jnp.any(vis, axis=1)[:, :, None, None], vb, 0)
                s = jnp.einsum("bqngk,bsnk->bngqs", qg, kb, preferred_element_type=jnp.float32)
                s = jnp.where(vis[:, None, None], s * scale, NEG)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(vis[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bngqs,bsnk->bngqk", p.astype(v_seen.dtype), v_seen,
                                preferred_element_type=jnp.float32)
                return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

            return lax.cond(jnp.any(vis), attend, lambda c: c, carry)

        init = (jnp.full((b, nkv, g, bq), NEG, jnp.float32), jnp.zeros((b, nkv, g, bq), jnp.float32),
                jnp.zeros((b, nkv, g, bq, kd), jnp.float32))
        hi = jnp.minimum(nk, (i * bq + bq - 1 + max_off) // bk + 1)
        m, l, acc = lax.fori_loop(0, hi, body, init)
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
        o = jnp.moveaxis(o, 3, 1).reshape(b, bq, h, kd)  # [B, N, G, bq, K] -> [B, bq, H, K]
        return o.astype(q.dtype), jnp.moveaxis(lse, 3, 1).reshape(b, bq, h)

    o, lse = lax.map(one_block, jnp.arange(nq))
    o = jnp.moveaxis(o, 0, 1).reshape(b, nq * bq, h, kd)[:, :t]
    lse = jnp.moveaxis(lse, 0, 1).reshape(b, nq * bq, h)[:, :t]
    return o, lse


def _contiguous(k, v, kv_seg, bk: int, nk: int) -> Callable:
    """fetch(j) over contiguous keys and values `[B, S, N, K]` padded to nk * bk slots."""
    kp, vp = _pad_to(k, 1, nk * bk), _pad_to(v, 1, nk * bk)
    ksp = _pad_to(kv_seg, 1, nk * bk, "edge")

    def fetch(j):
        take = lambda x: lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1)
        return take(kp), take(vp), None if ksp is None else take(ksp)

    return fetch


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, q_seg, kv_seg, q_offset, block_q, block_k):
    return _attention_fwd(q, k, v, q_seg, kv_seg, q_offset, block_q, block_k)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, q_offset, block_q, block_k):
    s = k.shape[1]
    bk, nk = _blocks(s, block_k)
    o, lse = _forward(q, _contiguous(k, v, kv_seg, bk, nk), nk, bk, s, q_seg, q_offset, block_q)
    return o, (q, k, v, q_seg, kv_seg, q_offset, o, lse)


def _attention_bwd(block_q, block_k, res, do):
    q, k, v, q_seg, kv_seg, q_offset, o, lse = res
    b, t, h, kd = q.shape
    s, nkv = k.shape[1], k.shape[2]
    g = h // nkv
    scale = kd ** -0.5
    bq, nq = _blocks(t, block_q)
    bk, nk = _blocks(s, block_k)
    max_off = jnp.max(q_offset)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, T, H]

    def grouped(x):  # [B, T, H, ...] -> [B, T, N, G, ...]
        return x.reshape(x.shape[:2] + (nkv, g) + x.shape[3:])

    qp, dop = grouped(_pad_to(q, 1, nq * bq)), grouped(_pad_to(do, 1, nq * bq))
    lsep, deltap = grouped(_pad_to(lse, 1, nq * bq)), grouped(_pad_to(delta, 1, nq * bq))
    qsp = _pad_to(q_seg, 1, nq * bq, "edge")
    kp, vp = _pad_to(k, 1, nk * bk), _pad_to(v, 1, nk * bk)
    ksp = _pad_to(kv_seg, 1, nk * bk, "edge")
    q_slice = lambda x, i: lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1)
    k_slice = lambda x, j: lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1)

    def visible(i, j):
        """bool `[B, bq, bk]` of query block i and key block j."""
        qs = None if qsp is None else q_slice(qsp, i)
        ks = None if ksp is None else k_slice(ksp, j)
        return _visible(i * bq + jnp.arange(bq), j * bk + jnp.arange(bk), qs, ks, q_offset, s)

    def probs(i, j, vis):
        """(p, ds) float32 `[B, N, G, bq, bk]` of query block i and key block j seeing vis."""
        qb, kb, vb, dob = q_slice(qp, i), k_slice(kp, j), k_slice(vp, j), q_slice(dop, i)
        sc = jnp.einsum("bqngk,bsnk->bngqs", qb, kb, preferred_element_type=jnp.float32) * scale
        lse_b = jnp.moveaxis(q_slice(lsep, i), 1, 3)  # [B, N, G, bq]
        p = jnp.where(vis[:, None, None], jnp.exp(sc - lse_b[..., None]), 0.0)
        dp = jnp.einsum("bqngk,bsnk->bngqs", dob, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.moveaxis(q_slice(deltap, i), 1, 3)[..., None])
        return p, ds

    def dq_block(i):
        def body(j, dq):
            vis = visible(i, j)

            def add(dq):
                _, ds = probs(i, j, vis)
                kb = k_slice(kp, j)
                return dq + jnp.einsum("bngqs,bsnk->bqngk", ds.astype(kb.dtype), kb,
                                       preferred_element_type=jnp.float32)
            return lax.cond(jnp.any(vis), add, lambda d: d, dq)

        hi = jnp.minimum(nk, (i * bq + bq - 1 + max_off) // bk + 1)
        dq = lax.fori_loop(0, hi, body, jnp.zeros((b, bq, nkv, g, kd), jnp.float32))
        return (dq * scale).reshape(b, bq, h, kd).astype(q.dtype)

    def dkv_block(j):
        def body(i, carry):
            vis = visible(i, j)

            def add(carry):
                dk, dv = carry
                p, ds = probs(i, j, vis)
                qb, dob = q_slice(qp, i), q_slice(dop, i)
                dv = dv + jnp.einsum("bngqs,bqngk->bsnk", p.astype(dob.dtype), dob,
                                     preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bngqs,bqngk->bsnk", ds.astype(qb.dtype), qb,
                                     preferred_element_type=jnp.float32)
                return dk, dv
            return lax.cond(jnp.any(vis), add, lambda c: c, carry)

        lo = jnp.clip((j * bk - max_off) // bq, 0, nq)
        zeros = jnp.zeros((b, bk, nkv, kd), jnp.float32)
        dk, dv = lax.fori_loop(lo, nq, body, (zeros, zeros))
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    dq = jnp.moveaxis(lax.map(dq_block, jnp.arange(nq)), 0, 1).reshape(b, nq * bq, h, kd)[:, :t]
    dk, dv = lax.map(dkv_block, jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, nk * bk, nkv, kd)[:, :s]
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, nk * bk, nkv, kd)[:, :s]
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None,
                  kv_segment_ids: jax.Array | None, q_offset: jax.Array, *, block_q: int = 512,
                  block_k: int = 512) -> jax.Array:
    """Blockwise causal GQA attention over contiguous keys, differentiable in q, k and v.

    q `[B, T, H, K]`, k and v `[B, S, N, K]` (any float dtype, scores and softmax in float32);
    segment ids int `[B, T]` / `[B, S]` (both or neither); q_offset int32 `[B]`. Returns
    `[B, T, H, K]` in q's dtype (0 for a query that sees nothing). Memory is O((T + S) * H * K +
    block_q * block_k * H) in the forward and the backward pass.
    """
    return _attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_q, block_k)


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None,
                       kv_segment_ids: jax.Array | None, q_offset: jax.Array, *, block_q: int = 512,
                       block_k: int = 512) -> tuple[jax.Array, jax.Array]:
    """`attention_xla`'s forward pass, not differentiable, with its log-sum-exp: (o `[B, T, H, K]`
    in q's dtype, lse float32 `[B, T, H]`, NEG for a query that sees nothing). Attention over
    several key ranges merges from these."""
    o, residuals = _attention_fwd(q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_q, block_k)
    return o, residuals[-1]


def attention_grads(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array | None,
                    kv_segment_ids: jax.Array | None, q_offset: jax.Array, o: jax.Array,
                    lse: jax.Array, do: jax.Array, *, block_q: int = 512,
                    block_k: int = 512) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`attention_xla`'s backward pass for the keys k, v of a softmax that may span more keys:
    given the whole softmax's output o and log-sum-exp lse `[B, T, H]` and the output's
    gradient do, returns (dq, dk, dv), these keys' share of q's gradient and their own."""
    residuals = (q, k, v, q_segment_ids, kv_segment_ids, q_offset, o, lse)
    return _attention_bwd(block_q, block_k, residuals, do)[:3]


def paged_attention_xla(q: jax.Array, key_pages: jax.Array, value_pages: jax.Array,
                        page_table: jax.Array, q_segment_ids: jax.Array | None,
                        kv_segment_ids: jax.Array | None, q_offset: jax.Array, *,
                        block_q: int = 512, block_k: int = 512) -> jax.Array:
    """Blockwise causal GQA attention over keys kept in a pool of pages (forward only).

    q `[B, T, H, K]`; key_pages, value_pages `[P, Z, N, K]`; page_table int32 `[B, R]`: row b's
    slot s is offset s % Z of page page_table[b, s // Z] (S = R * Z slots; out-of-range entries
    read some page, which the mask must hide: kv_segment_ids `[B, S]`). Pages are gathered
    max(1, block_k // Z) at a time, never the whole row. Returns `[B, T, H, K]` in q's dtype.
    """
    z, nkv, kd = key_pages.shape[1:]
    b, r = page_table.shape
    per_block, nk = _blocks(r, max(1, block_k // z))
    table = _pad_to(page_table, 1, nk * per_block)
    ksp = _pad_to(kv_segment_ids, 1, nk * per_block * z, "edge")
    bk = per_block * z

    def fetch(j):
        pages = lax.dynamic_slice_in_dim(table, j * per_block, per_block, axis=1)
        k, v = (jnp.take(x, pages, axis=0, mode="clip").reshape(b, bk, nkv, kd).astype(q.dtype)
                for x in (key_pages, value_pages))
        return k, v, None if ksp is None else lax.dynamic_slice_in_dim(ksp, j * bk, bk, axis=1)

    o, _ = _forward(q, fetch, nk, bk, r * z, q_segment_ids, q_offset, block_q)
    return o
