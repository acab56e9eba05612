"""Causal GQA attention through cuDNN's fused flash attention (JAX's cuDNN custom calls).

Packed documents use cuDNN's ragged ("packed") form: the segments of all rows, laid end to end as
one row, become (offset, length) pairs, at most `max_segments` of them. cuDNN covers self-attention (T == S, no query offset) with
segment ids that form contiguous runs; `packed_cudnn` checks that on the device and takes the
blockwise XLA path when a row breaks it (more segments than `max_segments`, or ids that repeat
after a gap), so it never computes a different mask.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.cudnn import fused_attention_stablehlo as cudnn

from pallas_kernels.device import is_hopper
from pallas_kernels.reference import segment_starts

MAX_SEGMENTS = 64  # default segments per row in cuDNN's packed form
# cuDNN's packed backward allocates about (2 M + 1) * B * T * H * K float32 of workspace for the H
# heads of one call (measured on an H200: 258 GiB at M 64, T 65,536, H 64, K 128); calls over this
# bound run their heads in groups, one after the other, or take the XLA path.
PACKED_WORKSPACE_BYTES = 16 << 30
# Elements of any one operand of one cuDNN call: the kernels index their operands with 32-bit
# offsets, so larger calls run their heads in groups (`by_head_groups`) or take the XLA path.
MAX_CALL_ELEMENTS = (1 << 31) - 1


def _group_options(h: int, n: int) -> list[int]:
    """Head-group counts `by_head_groups` can run: divisors g of H with g | N or N | g, ascending."""
    return [g for g in range(1, h + 1) if h % g == 0 and (n % g == 0 or g % n == 0)]


def _fits(b: int, t: int, h: int, n: int, k: int, groups: int) -> bool:
    """Whether every operand of one of `groups` calls stays within MAX_CALL_ELEMENTS."""
    return b * t * max(h // groups, n // groups, 1) * k <= MAX_CALL_ELEMENTS


def head_groups(q: jax.Array, num_kv_heads: int) -> int:
    """The fewest head groups (`by_head_groups`) whose cuDNN calls over q `[B, T, H, K]` and its
    N kv heads keep every operand within MAX_CALL_ELEMENTS; 0 when one head per call does not."""
    b, t, h, k = q.shape
    return next((g for g in _group_options(h, num_kv_heads) if _fits(b, t, h, num_kv_heads, k, g)), 0)


def packed_plan(q: jax.Array, num_kv_heads: int) -> tuple[int, int]:
    """(segments, head groups) of cuDNN's packed form for q `[B, T, H, K]` with N kv heads.

    Segments: MAX_SEGMENTS per row, or fewer where even the finest grouping (one query head per
    call) leaves the backward workspace over PACKED_WORKSPACE_BYTES (0: not even one fits, or
    the operands are too large for any grouping). Head groups: the fewest cuDNN calls
    (`by_head_groups`), run one after the other, that reach those segments within the bound and
    keep every operand within MAX_CALL_ELEMENTS.
    """
    b, t, h, k = q.shape
    want = MAX_SEGMENTS * b
    fit, groups = 0, h
    for groups in (g for g in _group_options(h, num_kv_heads) if _fits(b, t, h, num_kv_heads, k, g)):
        fit = (PACKED_WORKSPACE_BYTES // (b * t * (h // groups) * k * 4) - 1) // 2
        if fit >= want:
            return want, groups
    return int(max(0, fit)), groups


def by_head_groups(call: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], q: jax.Array,
                   k: jax.Array, v: jax.Array, groups: int) -> jax.Array:
    """`call(q, k, v)` of GQA attention run as `groups` calls one after the other, each over
    H / groups query heads with their kv heads: N / groups of them, or, when groups is a multiple
    of N, the one kv head those query heads share. q `[B, T, H, K]`, k and v `[B, S, N, K]`;
    groups divides H and is a divisor or a multiple of N. Returns `[B, T, H, K]`."""
    if groups == 1:
        return call(q, k, v)
    b, t, h, kd = q.shape
    n = k.shape[2]
    qs = jnp.moveaxis(q.reshape(b, t, groups, h // groups, kd), 2, 0)
    if n % groups == 0:
        split = lambda x: jnp.moveaxis(x.reshape(b, x.shape[1], groups, n // groups, kd), 2, 0)  # noqa: E731
        o = lax.map(lambda a: call(*a), (qs, split(k), split(v)))
    else:
        per_kv = groups // n
        kv_head = lambda x, g: lax.dynamic_slice_in_dim(x, g // per_kv, 1, axis=2)  # noqa: E731
        o = lax.map(lambda a: call(a[0], kv_head(k, a[1]), kv_head(v, a[1])),
                    (qs, jnp.arange(groups, dtype=jnp.int32)))
    return jnp.moveaxis(o, 0, 2).reshape(q.shape)


def supports(q: jax.Array, k: jax.Array, v: jax.Array, causal_offset: bool) -> bool:
    """Whether cuDNN runs this call: Hopper, bf16/f16, self-attention (T == S, no query offset),
    head dim a multiple of 8 up to 256, H a multiple of N, and a head grouping that keeps every
    operand of a call within MAX_CALL_ELEMENTS (`head_groups`)."""
    if causal_offset or not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    kd = q.shape[-1]
    return (q.shape[1] == k.shape[1] and kd % 8 == 0 and kd <= 256
            and q.shape[2] % k.shape[2] == 0 and head_groups(q, k.shape[2]) > 0 and is_hopper())


def packed_segments(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs of equal ids in segment_ids int `[B, T]` -> cuDNN's packed description.

    Returns (lengths int32 `[B, M]`, offsets int32 `[B, M + 1]`, both -1 past a row's runs, and
    ok bool `[]`: every row has at most M runs and no id appears in two runs).
    """
    b, t = segment_ids.shape
    start = segment_starts(segment_ids, b, t).at[:, 0].set(True)
    count = jnp.sum(start, axis=1, dtype=jnp.int32)
    idx = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=t)[0])(start)
    idx = idx.astype(jnp.int32)
    m = jnp.arange(max_segments + 1, dtype=jnp.int32)[None, :]
    offsets = jnp.where(m <= count[:, None], idx, -1)
    lengths = jnp.where(m[:, :-1] < count[:, None], idx[:, 1:] - idx[:, :-1], -1)
    # ids increasing from run to run: no id appears in two runs
    increasing = jnp.all(jnp.where(start[:, 1:], segment_ids[:, 1:] > segment_ids[:, :-1], True))
    ok = jnp.all(count <= max_segments) & increasing
    return lengths, offsets, ok


def self_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
    """cuDNN flash attention, causal or bidirectional: q `[B, T, H, K]`, k and v `[B, T, N, K]`
    (bf16/f16) -> `[B, T, H, K]` in q's dtype; the heads in groups where one call would be too
    large (`head_groups`)."""
    mask = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    call = lambda *qkv: cudnn.dot_product_attention(*qkv, scale=q.shape[-1] ** -0.5,  # noqa: E731
                                                    mask_type=mask)
    return by_head_groups(call, q, k, v, head_groups(q, k.shape[2]))


def packed_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                 fallback: Callable[[], jax.Array], *, max_segments: int,
                 head_groups: int = 1) -> jax.Array:
    """cuDNN flash attention, causal within documents: `self_cudnn` (causal) with segment_ids int
    `[B, T]` (the same for queries and keys).

    The B rows go to cuDNN as one packed row of max_segments segments (see
    `packed_plan`): segments never cross rows, and one row is the form that gives correct
    results on the GPU. head_groups > 1 runs the heads as that many cuDNN calls one after the
    other (`by_head_groups`), each with 1 / head_groups of the workspace. `fallback()` computes the same attention another way; it runs when the
    segment ids do not fit the packed form (see `packed_segments`). Returns `[B, T, H, K]` in q's
    dtype.
    """
    b, t = segment_ids.shape
    flat = lambda x: x.reshape(1, b * t, *x.shape[2:])
    row_ids = segment_ids + (jnp.arange(b, dtype=segment_ids.dtype) * (jnp.max(segment_ids) + 1))[:, None]
    lengths, offsets, ok = packed_segments(flat(row_ids), max_segments)
    ok &= jnp.all(segment_ids >= 0)

    def call(*qkv: jax.Array) -> jax.Array:
        return cudnn.dot_product_attention(
            *qkv, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
            scale=q.shape[-1] ** -0.5, mask_type=cudnn.MaskType.PADDING_CAUSAL)

    def packed(_):
        return by_head_groups(call, flat(q), flat(k), flat(v), head_groups).reshape(q.shape)

    return lax.cond(ok, packed, lambda _: fallback(), None)
