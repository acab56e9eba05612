"""The softmax-attention op against a float64 numpy oracle: causal GQA with segment ids, padding,
query offsets and paged keys, values and gradients; memory linear in T; the dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_softmax_attention, softmax_attention
from pallas_kernels.softmax_gpu import BLOCK_KV, SMEM_BYTES, paged_decode_attention, smem_bytes, stages, supports
from pallas_kernels.softmax_cudnn import (MAX_CALL_ELEMENTS, MAX_SEGMENTS, PACKED_WORKSPACE_BYTES,
                                           by_head_groups, head_groups, packed_plan, packed_segments)

# float32 blockwise against float64: each output is a convex combination of values (|v| ~ 1) with
# weights from float32 exponentials, and each gradient sums at most S terms of that size; sums of
# S <= 64 float32 terms stay within ~S * 2**-24 * 4 of the float64 result.
TOL = 2e-5


def oracle(q, k, v, q_seg, kv_seg, q_offset):
    """float64 numpy attention with the op's mask; rows that see nothing give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    s, n = k.shape[1], k.shape[2]
    vis = np.arange(s)[None, None, :] <= np.arange(t)[None, :, None] + np.asarray(q_offset)[:, None, None]
    if q_seg is not None:
        vis &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    kh = np.repeat(k, h // n, axis=2)
    vh = np.repeat(v, h // n, axis=2)
    sc = np.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(d)
    sc = np.where(vis[:, None], sc, -np.inf)
    m = np.max(sc, axis=-1, keepdims=True)
    p = np.where(vis[:, None], np.exp(sc - np.where(np.isfinite(m), m, 0)), 0)
    den = p.sum(-1, keepdims=True)
    p = p / np.where(den > 0, den, 1)
    return np.einsum("bhts,bshd->bthd", p, vh)


def oracle_grads(q, k, v, q_seg, kv_seg, q_offset, do):
    """float64 gradients (dq, dk, dv) of sum(o * do), from the softmax backward formulas."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    b, t, h, d = q.shape
    s, n = k.shape[1], k.shape[2]
    g = h // n
    vis = np.arange(s)[None, None, :] <= np.arange(t)[None, :, None] + np.asarray(q_offset)[:, None, None]
    if q_seg is not None:
        vis &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    kh, vh = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    sc = np.where(vis[:, None], np.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(d), -np.inf)
    m = np.max(sc, axis=-1, keepdims=True)
    p = np.where(vis[:, None], np.exp(sc - np.where(np.isfinite(m), m, 0)), 0)
    den = p.sum(-1, keepdims=True)
    p = p / np.where(den > 0, den, 1)
    dp = np.einsum("bthd,bshd->bhts", do, vh)
    ds = p * (dp - np.sum(p * dp, -1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", ds, kh) / np.sqrt(d)
    dkh = np.einsum("bhts,bthd->bshd", ds, q) / np.sqrt(d)
    dvh = np.einsum("bhts,bthd->bshd", p, do)
    fold = lambda x: x.reshape(b, s, n, g, d).sum(3)
    return dq, fold(dkh), fold(dvh)


def _inputs(rng, b, t, s, h, n, d):
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((b, t, h, d), (b, s, n, d), (b, s, n, d), (b, t, h, d)))


CASES = {
    "causal": lambda t: (None, None),
    "packed": lambda t: ((np.arange(t)[None] * 5 // t + np.array([[0], [3]])).astype(np.int32),) * 2,
    # left padding (keys no query sees) and a document that starts mid-row
    "padded": lambda t: (np.where(np.arange(t)[None] < t // 3, 0, 1).repeat(2, 0).astype(np.int32),
                         np.where(np.arange(t)[None] < [[4], [0]], -1,
                                  np.where(np.arange(t)[None] < t // 3, 0, 1)).astype(np.int32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_values_and_gradients_match_float64(rng, case, impl):
    b, t, h, n, d = 2, 45, 4, 2, 8  # T not a multiple of the blocks; two query heads per kv head
    q, k, v, do = _inputs(rng, b, t, t, h, n, d)
    q_seg, kv_seg = CASES[case](t)
    seg = {} if q_seg is None else dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))

    def loss(q, k, v):
        o = softmax_attention(q, k, v, **seg, impl=impl, block_q=16, block_k=8)
        return jnp.sum(o * do), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    off = np.zeros(b, np.int32)
    np.testing.assert_allclose(o, oracle(q, k, v, q_seg, kv_seg, off), rtol=TOL, atol=TOL)
    for got, want in zip(grads, oracle_grads(q, k, v, q_seg, kv_seg, off, do)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("impl", ["xla", "reference", "cudnn"])
@pytest.mark.parametrize("case", ["causal", "padded"])
def test_bidirectional_values_and_gradients_match_float64(rng, case, impl):
    """causal=False: every key its segment ids allow, later keys included (a vision tower)."""
    b, t, h, n, d = 2, 45, 4, 2, 8
    q, k, v, do = _inputs(rng, b, t, t, h, n, d)
    q_seg, kv_seg = CASES[case](t)
    seg = {} if q_seg is None else dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))

    def loss(q, k, v):
        o = softmax_attention(q, k, v, **seg, impl=impl, block_q=16, block_k=8, causal=False)
        return jnp.sum(o * do), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    everything = np.full(b, t, np.int32)  # j <= i + T holds for every key slot j < T
    np.testing.assert_allclose(o, oracle(q, k, v, q_seg, kv_seg, everything), rtol=TOL, atol=TOL)
    causal = oracle(q, k, v, q_seg, kv_seg, np.zeros(b, np.int32))
    assert np.max(np.abs(np.asarray(o) - causal)) > 0.1  # the later keys count
    for got, want in zip(grads, oracle_grads(q, k, v, q_seg, kv_seg, everything, do)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_query_offset_and_rows_that_see_nothing(rng):
    b, t, s, h, n, d = 2, 13, 40, 4, 4, 8
    q, k, v, do = _inputs(rng, b, t, s, h, n, d)
    off = jnp.asarray([27, 3], jnp.int32)  # row 0: the chunk ends at the last key; row 1: early
    q_seg = np.zeros((b, t), np.int32)
    kv_seg = np.zeros((b, s), np.int32)
    kv_seg[1, :5] = -1  # row 1: its first queries see no key at all
    seg = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    f = lambda q, k, v: softmax_attention(q, k, v, **seg, q_offset=off, impl="xla", block_q=4, block_k=8)
    o, vjp = jax.vjp(f, q, k, v)
    want = oracle(q, k, v, q_seg, kv_seg, np.asarray(off))
    assert np.all(np.asarray(o)[1, :2] == 0)
    np.testing.assert_allclose(o, want, rtol=TOL, atol=TOL)
    for got, ref in zip(vjp(do), oracle_grads(q, k, v, q_seg, kv_seg, np.asarray(off), do)):
        np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("block_k", [4, 12, 2048])  # one page a block; 3 pages; all at once
def test_paged_equals_contiguous_with_stale_pages(rng, block_k):
    b, t, h, n, d, z, r = 3, 6, 4, 2, 8, 4, 7
    s = r * z
    q, k, v, _ = _inputs(rng, b, t, s, h, n, d)
    table = rng.permutation(b * r + 5)[:b * r].reshape(b, r).astype(np.int32)
    pools = []
    for x in (k, v):  # spare pages full of NaN: stale data that must never reach an output
        pool = np.full((b * r + 5, z, n, d), np.nan, np.float32)
        pool[table.reshape(-1)] = np.asarray(x).reshape(b * r, z, n, d)
        pools.append(jnp.asarray(pool))
    lengths = np.array([s - z - 1, 9, 3])  # slots in use per row; the rest hold NaN
    kv_seg = np.where(np.arange(s)[None] < lengths[:, None], 0, -1).astype(np.int32)
    stale = np.where(np.arange(s)[None, :, None, None] < lengths[:, None, None, None], 1.0, np.nan)
    for i, x in enumerate((k, v)):
        pool = np.asarray(pools[i]).copy()
        pool[table.reshape(-1)] = (np.asarray(x) * stale).reshape(b * r, z, n, d)
        pools[i] = jnp.asarray(pool)
    off = jnp.asarray(lengths - t, jnp.int32)
    q_seg = jnp.zeros((b, t), jnp.int32)
    got = jax.jit(paged_softmax_attention, static_argnames=("impl", "block_q", "block_k"))(
        q, *pools, jnp.asarray(table), q_segment_ids=q_seg, kv_segment_ids=jnp.asarray(kv_seg),
        q_offset=off, impl="xla", block_q=4, block_k=block_k)
    want = oracle(q, np.nan_to_num(k * stale), np.nan_to_num(v * stale), np.asarray(q_seg), kv_seg,
                  np.asarray(off))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


# The decode kernel (Pallas GPU interpret mode) on bf16 inputs against the float64 oracle of the
# same bf16 values: its softmax weights enter p @ v rounded to bf16 (relative 2**-9 each) and the
# output is rounded to bf16, so outputs (|o| <= max |v| ~ 4) stay within 1e-2 of max |o|.
DECODE_CASES = {  # b, h, n, d, page size, pages per row, offsets, segments, splits
    "gqa4-segments": (2, 8, 2, 64, 16, 24, [300, 37], True, None),
    "mha-page32-one-split": (1, 2, 2, 128, 32, 24, [700], False, 1),  # 6 blocks through 2 stages
    "edges": (3, 4, 1, 64, 16, 16, [0, 255, 128], True, None),  # first slot only; last; block start
    "d64-three-stages": (1, 4, 1, 64, 16, 40, [600], True, 1),  # 5 blocks through 3 stages
}


def test_decode_kernel_buffers_fit_shared_memory():
    """Head dim 64 keeps three blocks in flight, MiniMax's 128 two (three came to 233,576 bytes,
    which a Hopper compile refuses); 192 does not fit even two, so the kernel declines it and the
    call falls back."""
    assert stages(64, 2, True) == 3 and stages(128, 2, True) == 2 and stages(192, 2, False) == 0
    assert smem_bytes(128, 2, 3, True) + 2_560 == 233_576 > SMEM_BYTES > smem_bytes(128, 2, 2, True)
    page = jnp.zeros((4, 16, 1, 192), jnp.bfloat16)
    assert not supports(jnp.zeros((1, 1, 4, 192), jnp.bfloat16), page, interpret=True)
    assert supports(jnp.zeros((1, 1, 4, 128), jnp.bfloat16), page[..., :128], interpret=True)


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_paged_decode_kernel_matches_float64(rng, case):
    """Pages shuffled through the pool, table entries past the query NO_PAGE, spare and masked
    slots full of large stale values; with segments, a row whose query sees no key gets 0."""
    b, h, n, d, z, r, offsets, segments, splits = DECODE_CASES[case]
    s, spare = r * z, 3
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _inputs(rng, b, 1, s, h, n, d))
    table = rng.permutation(b * r + spare)[:b * r].reshape(b, r).astype(np.int32)
    off = np.asarray(offsets, np.int32)
    if segments:
        kv_seg = rng.integers(0, 2, (b, s)).astype(np.int32)
        q_seg = kv_seg[np.arange(b), off][:, None].copy()
        if b > 2:
            q_seg[2] = 7  # no key of segment 7
    visible = np.arange(s)[None] <= off[:, None]
    if segments:
        visible &= kv_seg == q_seg
    pools = []
    for x in (k, v):
        pool = np.full((b * r + spare, z, n, d), 1e4, np.float32)
        rows = np.where(visible[:, :, None, None], np.asarray(x, np.float32), 1e4)
        pool[table.reshape(-1)] = rows.reshape(b * r, z, n, d)
        pools.append(jnp.asarray(pool, jnp.bfloat16))
    table = np.where(np.arange(r)[None] * z > off[:, None], np.iinfo(np.int32).max, table)
    seg = (jnp.asarray(q_seg), jnp.asarray(kv_seg)) if segments else (None, None)
    got = paged_decode_attention(q, *pools, jnp.asarray(table), *seg, jnp.asarray(off),
                                 splits=splits, interpret=True)
    want = oracle(np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32),
                  None if not segments else q_seg, None if not segments else kv_seg, off)
    assert got.shape == (b, 1, h, d) and got.dtype == jnp.bfloat16
    tol = 1e-2 * np.max(np.abs(want))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=tol)
    if segments and b > 2:
        assert np.all(np.asarray(got)[2] == 0)


def test_paged_decode_request_off_hopper_falls_back(rng):
    b, h, n, d, z, r = 2, 4, 2, 64, 16, BLOCK_KV // 16
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _inputs(rng, b, 1, r * z, h, n, d))
    pools = [x.reshape(b * r, z, n, d) for x in (k, v)]
    table = jnp.arange(b * r, dtype=jnp.int32).reshape(b, r)
    args = dict(q_offset=jnp.asarray([5, 100], jnp.int32))
    np.testing.assert_array_equal(paged_softmax_attention(q, *pools, table, **args, impl="pallas"),
                                  paged_softmax_attention(q, *pools, table, **args, impl="xla"))


def test_memory_is_linear_in_sequence_length():
    b, t, h, n, d = 1, 32768, 4, 2, 16
    shape = lambda hh: jax.ShapeDtypeStruct((b, t, hh, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(softmax_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla"))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape(h), shape(n), shape(n), seg).compile()
    temp = grad.memory_analysis().temp_size_in_bytes
    io = 4 * b * t * d * (2 * h + 2 * n) * 4  # q, o, do, dq and k, v, dk, dv in float32
    assert temp < 2 * io + (64 << 20), (temp, io)  # one score matrix alone: t * t * 4 = 4 GiB


def test_packed_segments_describe_runs():
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5], [0, 1, 0, 0, 2, 2]], jnp.int32)
    lengths, offsets, ok = packed_segments(seg[:2], 3)
    np.testing.assert_array_equal(lengths, [[2, 3, 1], [6, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, 6], [0, 6, -1, -1]])
    assert bool(ok)
    assert not bool(packed_segments(seg[:1], 2)[2])  # three runs, room for two
    assert not bool(packed_segments(seg[2:], 8)[2])  # id 0 in two runs: not a packed layout


@pytest.mark.parametrize("shape, n", [((1, 4096, 64, 128), 8), ((1, 65536, 64, 128), 8),
                                      ((2, 16384, 8, 128), 2), ((1, 1 << 20, 8, 128), 2),
                                      ((1, 1 << 22, 64, 128), 8)])
def test_packed_plan_keeps_the_workspace_bound(shape, n):
    """The fewest head groups whose per-call backward workspace, (2 M + 1) * B * T * H/g * K
    float32, stays within the bound for MAX_SEGMENTS per row, or the finest grouping's most
    (one query head per call), every operand of a call within MAX_CALL_ELEMENTS."""
    b, t, h, k = shape
    segments, groups = packed_plan(jax.ShapeDtypeStruct(shape, jnp.bfloat16), n)
    workspace = lambda m, g: (2 * m + 1) * b * t * (h // g) * k * 4
    assert h % groups == 0 and (n % groups == 0 or groups % n == 0)
    assert segments <= MAX_SEGMENTS * b and b * t * (h // groups) * k <= MAX_CALL_ELEMENTS
    if segments:
        assert workspace(segments, groups) <= PACKED_WORKSPACE_BYTES
    if segments == MAX_SEGMENTS * b:  # no coarser grouping reaches the full table
        assert all(workspace(segments, g) > PACKED_WORKSPACE_BYTES or b * t * (h // g) * k > MAX_CALL_ELEMENTS
                   for g in range(1, groups) if h % g == 0 and (n % g == 0 or g % n == 0))
    else:  # the finest grouping, and one more segment would not fit
        assert groups == h and workspace(segments + 1, groups) > PACKED_WORKSPACE_BYTES


@pytest.mark.parametrize("shape, n, groups", [
    ((1, 1 << 20, 4, 128), 1, 1),  # 2**29 elements a call: one call
    ((1, 1 << 22, 4, 128), 1, 2),  # the 4M-token prompt: 2**31 elements at once, 2**30 in two calls
    ((1, 1 << 20, 64, 128), 8, 8),  # 2**33: 8 calls of 8 query heads and their kv head
    ((1, 1 << 23, 8, 128), 2, 8),  # 2**30 a head: 8 calls of one query head sharing a kv head
    ((1, 1 << 24, 2, 128), 1, 0),  # 2**31 elements with one head a call: cuDNN cannot take it
])
def test_head_groups_keep_each_call_within_32_bit_offsets(shape, n, groups):
    assert head_groups(jax.ShapeDtypeStruct(shape, jnp.bfloat16), n) == groups


@pytest.mark.parametrize("h, n, groups", [(8, 4, 2), (8, 2, 4), (8, 1, 8), (4, 4, 4)])
def test_attention_by_head_groups_equals_one_call(rng, h, n, groups):
    """Groups of query heads with their own kv heads (groups dividing N) or sharing one (groups a
    multiple of N) give the one-call result exactly, values and gradients."""
    q, k, v, do = _inputs(rng, 2, 12, 12, h, n, 8)
    call = lambda q, k, v: softmax_attention(q, k, v, impl="reference")  # noqa: E731
    loss = lambda f: lambda *x: jnp.sum(f(*x) * do)  # noqa: E731
    grouped = lambda q, k, v: by_head_groups(call, q, k, v, groups)  # noqa: E731
    np.testing.assert_array_equal(grouped(q, k, v), call(q, k, v))
    for got, want in zip(jax.grad(loss(grouped), (0, 1, 2))(q, k, v), jax.grad(loss(call), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_cudnn_request_off_hopper_falls_back(rng):
    q, k, v, _ = _inputs(rng, 1, 20, 20, 4, 2, 8)
    seg = jnp.asarray((np.arange(20) >= 7)[None].astype(np.int32))
    args = dict(q_segment_ids=seg, kv_segment_ids=seg)
    np.testing.assert_array_equal(softmax_attention(q, k, v, **args, impl="cudnn"),
                                  softmax_attention(q, k, v, **args, impl="xla"))


def test_bad_inputs_name_what_is_wrong(rng):
    q, k, v, _ = _inputs(rng, 1, 8, 8, 4, 3, 8)
    with pytest.raises(ValueError, match="number of heads"):
        softmax_attention(q, k, v)
    q, k, v, _ = _inputs(rng, 1, 8, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="both"):
        softmax_attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="kv_segment_ids"):
        softmax_attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), jnp.int32),
                          kv_segment_ids=jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="unknown impl"):
        softmax_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="causal=False takes none"):
        softmax_attention(q, k, v, q_offset=jnp.zeros((1,), jnp.int32), causal=False)
