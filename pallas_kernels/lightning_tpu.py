"""Pallas TPU (Mosaic) kernels for lightning attention: forward and backward.

The tokens of a row are cut into chunks of C = 128 (one MXU tile of rows). A grid program owns one
(row, head group) and walks the chunks in time order (or reverse), a float32 state of every head in
its group carried in VMEM scratch across the sequential ("arbitrary") chunk axis of the grid. With
a, b, c ``[C, D]`` tiles of one head, per-token decay columns e_q, e_k, the state decay e_s and the
intra-chunk decay mask M (``M[i, j] = lam^(i - j)`` for j <= i in the same segment), all computed
in-kernel from the slope:

    out = (M * a b^T) c + e_q * (a X_in)                 (scan, forward in time)
    X_out = e_s X_in + b^T (e_k * c)

The forward pass is scan(q, k, v) from S_0 and dq = scan(do, v, k) from S_0^T. dk and dv come
from one reverse scan that carries dS (the gradient of the state leaving the chunk), with M^T:

    dv = (M^T * k q^T) do + e_k * (k dS),   dk = (M^T * v do^T) q + e_k * (v dS^T)
    dS_in = e_s dS + q^T (e_q * do)

Decays are exp(-slope * n) with integer n >= 0 counted in tokens: e_q[i] = lam^(i + 1),
e_k[j] = lam^(real - 1 - j), e_s = lam^real (real: the chunk's real tokens; the zero padding of T
up to a multiple of C adds no decay step). Segment ids enter as each token's number of segment
starts since the chunk's entering state (0: the entering state reaches it), a ``[1, C]`` row vector
per chunk, made a column in-kernel by a transpose; M, e_q, e_k and e_s are zeroed across a start.
Slopes are constants (no gradient). The products take the input dtype on the MXU (the state cast
to it) with float32 accumulation; float32 inputs take full float32 passes.

Layout: q, k, v and o are ``[B, T, H, D]`` viewed as ``[B, T, H * D]``; a block is
``[block_t, G * D]`` with G = 128 / D heads (G = 1 at D = 128, 2 at D = 64), so the lane dim of
every block is 128 wide; ``block_t`` is a whole number of chunks (up to ``BLOCK_CHUNKS``) walked by
an in-kernel loop to amortize the per-grid-step cost. In TPU HBM the two views tile differently:
the view is a copy when q, k, v are arrays of their own, none when the fusion that produces them
writes ``[B, T, H * D]`` (``benchmarks/lightning_tpu_aot.py`` compiles both). Under a mesh the
kernels run inside ``shard_map`` on each device's rows and heads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
from jax.sharding import PartitionSpec as P

from pallas_kernels.device import automatic_axes
from pallas_kernels.reference import segment_starts
from pallas_kernels.softmax_tpu import mesh_spec
from sharding.tokens import axis_shards

CHUNK = 128  # tokens per chunk: rows of one MXU tile
BLOCK_CHUNKS = 8  # chunks per grid step (block_t = CHUNK * up to this many)
LANES = 128

NT = (((1,), (1,)), ((), ()))  # a @ b^T
TN = (((0,), (0,)), ((), ()))  # a^T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call: T real tokens padded to ``nchunks * CHUNK``, ``sub`` chunks per
    grid step, ``group`` heads per block, head dim ``d``."""

    length: int
    nchunks: int
    sub: int
    group: int
    d: int
    segments: bool
    interpret: bool | pltpu.InterpretParams

    @property
    def steps(self) -> int:
        return self.nchunks // self.sub

    @property
    def block_t(self) -> int:
        return self.sub * CHUNK


def _dot(a, b, dims):
    """float32 MXU product; full float32 passes for float32 operands."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _decay(slope, n):
    return jnp.exp(-slope * n.astype(jnp.float32))


def _chunk_coefficients(geo: Geometry, slope, chunk, starts, mask):
    """Decays of one chunk of one head: mask ``[C, C]``, dq, dk ``[C, 1]``, ds ``[1, 1]``.

    chunk: the chunk's index in the row (traced int32); starts float32 ``[1, C]``: segment starts
    since the chunk's entering state (None without segments); mask: the decay mask of the chunk
    with no segment start (M or M^T, symmetric in the segment test).
    """
    real = jnp.clip(geo.length - chunk * CHUNK, 0, CHUNK)
    tok = lax.broadcasted_iota(jnp.int32, (CHUNK, 1), 0)
    q_decay = _decay(slope, tok + 1)
    k_decay = _decay(slope, jnp.maximum(real - 1 - tok, 0))
    s_decay = _decay(slope, jnp.full((1, 1), real, jnp.int32))
    if starts is not None:
        rows = jnp.broadcast_to(starts, (CHUNK, CHUNK))  # [i, j] = starts_j
        cols = rows.T  # [i, j] = starts_i
        rcol = cols[:, :1]
        last = rcol[CHUNK - 1:, :]
        mask = jnp.where(cols == rows, mask, 0.0)
        q_decay = jnp.where(rcol == 0, q_decay, 0.0)
        k_decay = jnp.where(rcol == last, k_decay, 0.0)
        s_decay = jnp.where(last == 0, s_decay, 0.0)
    return mask, q_decay, k_decay, s_decay


def _init_mask(mask_scr, slopes_ref, head0: int | jax.Array, group: int, transposed: bool):
    """mask_scr[g] = lam_g^(i - j) where j <= i (M; its transpose when ``transposed``), else 0."""
    row = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0)
    col = lax.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1)
    dist = col - row if transposed else row - col
    for g in range(group):
        mask_scr[g] = jnp.where(dist >= 0, _decay(slopes_ref[head0 + g], jnp.maximum(dist, 0)), 0.0)


def _chunk_starts(starts_ref, local):
    """float32 ``[1, C]`` segment starts of chunk ``local`` of the block, or None."""
    return None if starts_ref is None else starts_ref[local].astype(jnp.float32)


def _scan_kernel(geo: Geometry, slopes_ref, a_ref, b_ref, c_ref, x0_ref, *refs):
    """Forward-in-time scan of one (row, head group) block of ``sub`` chunks (module docstring)."""
    starts_ref = refs[0] if geo.segments else None
    out_ref, xf_ref, x_scr, mask_scr = refs[geo.segments:]
    d, group = geo.d, geo.group
    head0 = pl.program_id(1) * group
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        x_scr[...] = x0_ref[...]
        _init_mask(mask_scr, slopes_ref, head0, group, transposed=False)

    def body(local, carry):
        start = pl.multiple_of(local * CHUNK, CHUNK)
        rows = pl.ds(start, CHUNK)
        starts = _chunk_starts(starts_ref, local)
        for g in range(group):
            lanes = pl.ds(g * d, d)
            a, b, c = a_ref[rows, lanes], b_ref[rows, lanes], c_ref[rows, lanes]
            mask, q_decay, k_decay, s_decay = _chunk_coefficients(
                geo, slopes_ref[head0 + g], step * geo.sub + local, starts, mask_scr[g])
            x = x_scr[g]
            scores = _dot(a, b, NT) * mask
            out = _dot(scores.astype(a.dtype), c, NN) + q_decay * _dot(a, x.astype(a.dtype), NN)
            out_ref[rows, lanes] = out.astype(out_ref.dtype)
            x_scr[g] = s_decay * x + _dot(b, (k_decay * c).astype(b.dtype), TN)
        return carry

    lax.fori_loop(0, geo.sub, body, 0)

    @pl.when(step == geo.steps - 1)
    def _():
        xf_ref[...] = x_scr[...]


def _reverse_kernel(geo: Geometry, slopes_ref, q_ref, k_ref, v_ref, do_ref, g0_ref, *refs):
    """Reverse-in-time scan of one (row, head group) block: dk, dv and the carried dS."""
    starts_ref = refs[0] if geo.segments else None
    dk_ref, dv_ref, gf_ref, g_scr, mask_scr = refs[geo.segments:]
    d, group = geo.d, geo.group
    head0 = pl.program_id(1) * group
    step = pl.program_id(2)
    block = geo.steps - 1 - step

    @pl.when(step == 0)
    def _():
        g_scr[...] = g0_ref[...]
        _init_mask(mask_scr, slopes_ref, head0, group, transposed=True)

    def body(i, carry):
        local = geo.sub - 1 - i
        start = pl.multiple_of(local * CHUNK, CHUNK)
        rows = pl.ds(start, CHUNK)
        starts = _chunk_starts(starts_ref, local)
        for g in range(group):
            lanes = pl.ds(g * d, d)
            q, k, v, do = (ref[rows, lanes] for ref in (q_ref, k_ref, v_ref, do_ref))
            mask_t, q_decay, k_decay, s_decay = _chunk_coefficients(
                geo, slopes_ref[head0 + g], block * geo.sub + local, starts, mask_scr[g])
            ds = g_scr[g]
            ds_lo = ds.astype(q.dtype)
            kq = (_dot(k, q, NT) * mask_t).astype(q.dtype)  # [key j, query i]
            vdo = (_dot(v, do, NT) * mask_t).astype(q.dtype)
            dv = _dot(kq, do, NN) + k_decay * _dot(k, ds_lo, NN)
            dk = _dot(vdo, q, NN) + k_decay * _dot(v, ds_lo, NT)
            dk_ref[rows, lanes] = dk.astype(dk_ref.dtype)
            dv_ref[rows, lanes] = dv.astype(dv_ref.dtype)
            g_scr[g] = s_decay * ds + _dot(q, (q_decay * do).astype(q.dtype), TN)
        return carry

    lax.fori_loop(0, geo.sub, body, 0)

    @pl.when(step == geo.steps - 1)
    def _():
        gf_ref[...] = g_scr[...]


def _specs(geo: Geometry, n_tokens: int, reverse: bool):
    """BlockSpecs: slopes (SMEM), ``n_tokens`` token tensors ``[B, Tp, H * D]``, one state
    ``[B, H, D, D]`` and the segment starts ``[B, Tp / C, 1, C]`` (when present)."""
    d, group, steps = geo.d, geo.group, geo.steps

    def t_block(s):
        return steps - 1 - s if reverse else s

    tokens = pl.BlockSpec((None, geo.block_t, group * d), lambda b, h, s: (b, t_block(s), h))
    state = pl.BlockSpec((None, group, d, d), lambda b, h, s: (b, h, 0, 0))
    specs = [pl.BlockSpec(memory_space=pltpu.SMEM)] + [tokens] * n_tokens + [state]
    if geo.segments:
        specs.append(pl.BlockSpec((None, geo.sub, 1, CHUNK), lambda b, h, s: (b, t_block(s), 0, 0)))
    return specs, tokens, state


def _call(kernel, geo: Geometry, operands, n_tokens: int, n_out_tokens: int, reverse: bool,
          flops_per_chunk: int):
    """One pallas_call over the grid (B, H / G, steps); outputs: ``n_out_tokens`` token tensors in
    the first token operand's dtype and a float32 state."""
    tok = operands[1]
    b, tp, hd = tok.shape
    d, group = geo.d, geo.group
    heads = hd // d
    in_specs, tokens, state = _specs(geo, n_tokens, reverse)
    out_shape = [jax.ShapeDtypeStruct(tok.shape, tok.dtype)] * n_out_tokens
    out_shape.append(jax.ShapeDtypeStruct((b, heads, d, d), jnp.float32))
    token_bytes = b * tp * hd * tok.dtype.itemsize
    cost = pl.CostEstimate(
        flops=b * heads * geo.nchunks * flops_per_chunk,
        transcendentals=b * heads * (CHUNK * CHUNK + geo.nchunks * (2 * CHUNK + 1)),
        bytes_accessed=(n_tokens + n_out_tokens) * token_bytes + 2 * b * heads * d * d * 4)
    return pl.pallas_call(
        functools.partial(kernel, geo),
        grid=(b, heads // group, geo.steps),
        in_specs=in_specs,
        out_specs=[tokens] * n_out_tokens + [state],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((group, d, d), jnp.float32),
                        pltpu.VMEM((group, CHUNK, CHUNK), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=geo.interpret,
    )(*operands)


def _scan(geo: Geometry, slopes, a, b, c, x0, segs):
    """out ``[B, Tp, H * D]`` (a's dtype) and the final state of the forward scan from x0."""
    d = geo.d
    flops = 4 * CHUNK * d * (CHUNK + d)  # a b^T, (.) c, a X, b^T c
    return _call(_scan_kernel, geo, (slopes, a, b, c, x0, *segs), 3, 1, False, flops)


def _reverse(geo: Geometry, slopes, q, k, v, do, g0, segs):
    """dk, dv ``[B, Tp, H * D]`` (q's dtype) and dS_0 of the reverse scan from dS_T = g0."""
    d = geo.d
    # k q^T, v do^T and the two products with them; k dS, v dS^T, q^T do
    flops = 8 * CHUNK * CHUNK * d + 6 * CHUNK * d * d
    return _call(_reverse_kernel, geo, (slopes, q, k, v, do, g0, *segs), 4, 2, True, flops)


def _transpose(state):
    return jnp.swapaxes(state, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(geo, q, k, v, s0, slopes, segs):
    o, state = _scan(geo, slopes, q, k, v, s0, segs)
    return o, state


def _attention_fwd(geo, q, k, v, s0, slopes, segs):
    return _attention(geo, q, k, v, s0, slopes, segs), (q, k, v, s0, slopes, segs)


def _attention_bwd(geo, residuals, cotangents):
    q, k, v, s0, slopes, segs = residuals
    do, d_state = cotangents
    do = do.astype(q.dtype)
    dq, _ = _scan(geo, slopes, do, v, k, _transpose(s0), segs)
    dk, dv, ds0 = _reverse(geo, slopes, q, k, v, do, d_state.astype(jnp.float32), segs)
    return dq, dk, dv, ds0, None, (None,) * len(segs)


_attention.defvjp(_attention_fwd, _attention_bwd)


def heads_per_block(d: int) -> int:
    """Heads side by side in one block so that its lane dim is 128 wide."""
    return max(1, LANES // d)


def _local_heads(spec: P, h: int) -> int:
    """Heads per device under the spec ``[B, T, H, D]`` of ``mesh_spec`` (heads over one axis)."""
    return h // axis_shards(spec[2]) if spec[2] else h


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the kernels take these inputs (on a TPU): bf16/f32 of one dtype, head dim 64 or
    128, each device's heads a multiple of ``heads_per_block``, the current mesh (if any) one the
    kernels can run under (``softmax_tpu.mesh_spec``: rows over the batch axes, heads over
    ``tensor``, no other axis of more than one device)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        return False
    b, t, h, d = q.shape
    spec = mesh_spec(b, t, h)
    return d in (64, 128) and spec is not None and _local_heads(spec, h) % heads_per_block(d) == 0


def _segment_operands(segment_ids, b: int, t: int, tp: int):
    """Per token, its segment starts since the entering state of its chunk, int32
    ``[B, Tp / C, 1, C]`` (one row per chunk), in a 1-tuple; () without segment ids."""
    if segment_ids is None:
        return ()
    starts = jnp.pad(segment_starts(segment_ids, b, t), [(0, 0), (0, tp - t)])
    count = jnp.cumsum(starts.astype(jnp.int32), axis=1).reshape(b, tp // CHUNK, CHUNK)
    local = count - (count[:, :, :1] - starts.reshape(count.shape)[:, :, :1])
    return (local[:, :, None, :],)


def _blocking(nchunks: int) -> int:
    """Chunks per grid step: the largest divisor of nchunks up to BLOCK_CHUNKS."""
    return max(s for s in range(1, BLOCK_CHUNKS + 1) if nchunks % s == 0)


def lightning_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
    *,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
    """Kernel path of ``lightning_attention`` on TPU (see ``supports`` for the inputs it takes).

    q, k, v ``[B, T, H, D]`` bf16 or float32 (one dtype), D 64 or 128, H a multiple of
    ``heads_per_block(D)``; slopes float ``[H]`` (constants: no gradient flows to them);
    initial_state float32 ``[B, H, D, D]`` (key dim rows) or None (zeros); segment_ids int
    ``[B, T]`` or None. Differentiable in q, k, v and initial_state. ``interpret`` (True, or
    ``pltpu.InterpretParams`` for the TPU interpreter that simulates VMEM, SMEM and the block
    copies) runs the kernels in Pallas' interpreter on any backend. Under a mesh the kernels run
    inside ``shard_map`` on each device's rows and heads (``supports`` says which meshes). Returns
    o ``[B, T, H, D]`` in q's dtype and the final state float32 ``[B, H, D, D]``.
    """
    b, t, h, d = q.shape
    if d not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {d}")
    group = heads_per_block(d)
    if h % group:
        raise ValueError(f"{h} heads of dim {d}: the heads must be a multiple of {group}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"q, k, v must all be bfloat16 or all float32, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    s0 = (jnp.zeros((b, h, d, d), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    run = functools.partial(_local, interpret=interpret)
    if not automatic_axes():
        return run(q, k, v, slopes, s0, segment_ids)
    spec = mesh_spec(b, t, h)
    if spec is None or _local_heads(spec, h) % group:
        mesh = dict(jax.sharding.get_abstract_mesh().shape)
        raise ValueError(f"the TPU kernels cannot run under the mesh {mesh} for q {q.shape}: rows "
                         f"go over the batch axes, heads over tensor (see lightning_tpu.supports)")
    state = P(spec[0], spec[2], None, None)
    segs = () if segment_ids is None else (segment_ids,)
    mapped = jax.shard_map(
        lambda q, k, v, sl, s0, *seg: run(q, k, v, sl, s0, seg[0] if seg else None),
        in_specs=(spec,) * 3 + (P(spec[2]), state) + (P(spec[0], None),) * len(segs),
        out_specs=(spec, state), axis_names=set(automatic_axes()), check_vma=False)
    return mapped(q, k, v, slopes, s0, *segs)


def _local(q, k, v, slopes, s0, segment_ids, *, interpret):
    """``lightning_attention_tpu`` on the rows and heads at hand (s0 given)."""
    b, t, h, d = q.shape
    nchunks = -(-t // CHUNK)
    tp = nchunks * CHUNK
    geo = Geometry(length=t, nchunks=nchunks, sub=_blocking(nchunks), group=heads_per_block(d),
                   d=d, segments=segment_ids is not None, interpret=interpret)
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad).reshape(b, tp, h * d) for x in (q, k, v))
    segs = _segment_operands(segment_ids, b, t, tp)
    o, state = _attention(geo, q, k, v, s0, slopes.astype(jnp.float32), segs)
    return o.reshape(b, tp, h, d)[:, :t], state
