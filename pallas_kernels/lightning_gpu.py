"""Pallas Mosaic GPU (Hopper) kernels for lightning attention: forward and backward.

Everything runs on one kernel, a chunked decayed scan. For one (row, head) it walks chunks of C = 64
tokens (forward or reverse in time), keeps a float32 state in registers (one 64-column slab of the
value dim per compute warpgroup) and computes, with a, b, c ``[C, D]`` bf16 tiles in shared memory:

    out_i = sum_{j ~ i} lam^|i-j| (a_i . b_j) c_j + dq_i a_i S_in        (intra + inter, wgmma)
    S_out = ds S_in + sum_j dk_j b_j^T c_j                                (wgmma, b transposed)

where ``j ~ i`` is j <= i (forward) or j >= i (reverse) within the current segment, and every decay
is exp(-slope * n) with n >= 0 counted in tokens (never exp(+slope * i)). The forward pass is
scan(q, k, v); the backward pass is three more scans:

    dq = scan(do, v, k)                  forward, initial state S0^T
    dk = scan(v, do, q)                  reverse, initial state dS_T^T / lam
    dv = scan(k, q, do)                  reverse, initial state dS_T / lam; dS0 = lam * its final state

The backward scans reuse known states: dq's per-piece states are the forward's transposed, dk's
the dv scan's transposed. Slopes are constants of the kernels (no gradient flows to them).

For parallelism over long sequences the time axis is split into P pieces of whole chunks: a
state-only scan of every piece from a zero state, one einsum over pieces that combines those into
each piece's entering state, then the full scan of all pieces at once.

The intra-chunk mask lam^|i-j| is computed once per program into shared memory; per-token decays
are [C] row vectors. Runs on Hopper through Mosaic GPU and on the CPU in Pallas' GPU interpret mode
(the CI tests). Design, versions and measurements: benchmarks/KERNEL_NOTES.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.device import is_hopper

CHUNK = 64  # tokens per chunk (one wgmma M tile)
SLAB = 64  # value columns per compute warpgroup
STAGES = 3  # chunks of a, b, c in flight


def no_reset(reverse: bool) -> int:
    """``limit`` value of a token that no segment start separates from the chunk's entering state."""
    return CHUNK + 1 if reverse else -1


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    reverse: bool
    state_only: bool  # only the final state (no a, no output)
    segments: bool
    initial_state: bool
    interpret: bool


def _transforms():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _matmuls(*ops):
    """float32 products ``a @ b`` for ops of (a, b, shape), operands in shared memory: all wgmmas are
    issued before the first result is awaited, so independent products overlap."""

    def run(*accs):
        for acc, (a, b, _) in zip(accs, ops):
            plgpu.wgmma(acc, a, b)
        return tuple(acc[...] for acc in accs)

    return pl.run_scoped(run, *[plgpu.ACC(shape, jnp.float32) for _, _, shape in ops])


def _scan_call(a, b, c, slopes, s0, limit, real_tokens: tuple[int, int], cfg: ScanConfig):
    """One scan over rows of whole chunks.

    a, b, c ``[R, L, H, D]`` (bf16/f16; a unused when ``cfg.state_only``), L a multiple of CHUNK;
    slopes float32 ``[H]``; s0 float32 ``[R, H, D, D]`` or None; limit int32 ``[R, L]`` (chunk-local
    segment limit, see ``segment_limits``) or None. real_tokens = (T, P): row r is piece r % P of a
    sequence of T real tokens followed by zero padding. Returns (out ``[R, L, H, D]`` or None, final
    state ``[R, H, D, D]``).
    """
    length, pieces = real_tokens
    rows, rows_len, heads, d = b.shape
    nwg = d // SLAB
    nchunks = rows_len // CHUNK
    dtype = b.dtype
    f32 = jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = wgmma_layout.reduce(1)  # a [CHUNK] vector laid out like the rows of a wgmma tile

    def kernel(*refs):
        refs = list(refs)
        a_ref = None if cfg.state_only else refs.pop(0)
        b_ref, c_ref, slopes_ref = refs.pop(0), refs.pop(0), refs.pop(0)
        s0_ref = refs.pop(0) if cfg.initial_state else None
        lim_ref = refs.pop(0) if cfg.segments else None
        o_ref = None if cfg.state_only else refs.pop(0)
        sf_ref = refs.pop(0)
        s_smem, pc_smem, o_smem, mask_smem = refs

        row = lax.axis_index("rows")
        head = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        cols = pl.ds(wg * SLAB, SLAB)
        slope = slopes_ref[head]

        none = no_reset(cfg.reverse)

        def decay(n):
            return jnp.exp(-slope * n.astype(f32))

        def compute_thread(pipeline):
            # Intra-chunk decay mask lam^|i-j| on the causal side, the same for every chunk: computed once
            # (each compute warpgroup writes the same values) and read from shared memory per chunk.
            qi = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=wgmma_layout)
            kj = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=wgmma_layout)
            dist = kj - qi if cfg.reverse else qi - kj
            if not cfg.state_only:
                mask_smem[...] = jnp.where(dist >= 0, decay(jnp.maximum(dist, 0)), 0.0)
                plgpu.commit_smem()
            if cfg.initial_state:
                state = plgpu.load(
                    s0_ref.at[row, head, :, cols], layout=wgmma_layout, optimized=False
                )
            else:
                state = plgpu.layout_cast(jnp.zeros((d, SLAB), f32), wgmma_layout)
            state = pipeline(state)
            sf_ref.at[row, head, :, cols][...] = state
            if not cfg.state_only:
                plgpu.wait_smem_to_gmem(0)

        def body(idx, *args):
            *tiles, state = args
            tiles = list(tiles)
            a_t = None if cfg.state_only else tiles.pop(0)
            b_t, c_t = tiles.pop(0), tiles.pop(0)
            lim_t = tiles.pop(0) if cfg.segments else None
            (step,) = idx
            chunk = nchunks - 1 - step if cfg.reverse else step
            real = jnp.clip(
                length - (row % pieces) * rows_len - chunk * CHUNK, 0, CHUNK
            )  # real tokens here
            rows_v = plgpu.broadcasted_iota(jnp.int32, (CHUNK,), 0, layout=row_layout)

            def per_row(x):  # [CHUNK] row vector -> [CHUNK, SLAB] tile
                return lax.broadcast_in_dim(x, (CHUNK, SLAB), [0])

            # Decay of each key to the chunk's last processed token, and of the entering state.
            key_steps = rows_v if cfg.reverse else jnp.maximum(real - 1 - rows_v, 0)
            k_decay = decay(key_steps)
            s_decay = decay(real)
            if cfg.segments:
                lim_last = lim_t[0 if cfg.reverse else CHUNK - 1]
                key_live = rows_v < lim_last if cfg.reverse else rows_v >= lim_last
                k_decay = jnp.where(key_live, k_decay, 0.0)
                s_decay = jnp.where(lim_last == none, s_decay, 0.0)

            # Shared-memory operands of this step: S_in (input dtype) and the decayed value slab.
            if not cfg.state_only:
                s_smem[wg] = state.astype(dtype)
            c_slab = plgpu.load(c_t.at[:, cols], layout=wgmma_layout).astype(f32)
            pc_smem[wg] = (c_slab * per_row(k_decay)).astype(dtype)
            plgpu.commit_smem()
            # S_out = ds S_in + b^T (dk * c); in the same wgmma batch: a S_in (inter) and a b^T (scores).
            if cfg.state_only:
                (update,) = _matmuls((b_t.T, pc_smem.at[wg], (d, SLAB)))
                return state * s_decay + update
            update, inter, scores = _matmuls(
                (b_t.T, pc_smem.at[wg], (d, SLAB)),
                (a_t, s_smem.at[wg], (CHUNK, SLAB)),
                (a_t, b_t.T, (CHUNK, CHUNK)),
            )
            q_steps = jnp.maximum(real - rows_v, 0) if cfg.reverse else rows_v + 1
            q_decay = decay(q_steps)
            scores = scores * plgpu.load(mask_smem, layout=wgmma_layout)
            if cfg.segments:
                lim_rows = plgpu.load(lim_t, layout=row_layout)
                q_decay = jnp.where(lim_rows == none, q_decay, 0.0)
                kj = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=wgmma_layout)
                lim_qk = lax.broadcast_in_dim(lim_rows, (CHUNK, CHUNK), [0])
                scores = jnp.where(kj < lim_qk if cfg.reverse else kj >= lim_qk, scores, 0.0)
            pc_smem[wg] = scores.astype(
                dtype
            )  # the update wgmma that read this buffer has completed
            plgpu.commit_smem()
            (intra,) = _matmuls((pc_smem.at[wg], c_t.at[:, cols], (CHUNK, SLAB)))
            out = inter * per_row(q_decay) + intra
            plgpu.wait_smem_to_gmem(
                0, wait_read_only=True
            )  # the previous chunk's store has read o_smem
            o_smem[wg] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                o_smem.at[wg], o_ref.at[row, pl.ds(chunk * CHUNK, CHUNK), head, cols]
            )
            return state * s_decay + update

        def index(i):
            return (nchunks - 1 - i if cfg.reverse else i, 0)

        tile = plgpu.BlockSpec((CHUNK, d), index, transforms=_transforms())
        specs = [tile] * (2 if cfg.state_only else 3)
        if cfg.segments:
            specs.append(plgpu.BlockSpec((CHUNK,), lambda i: index(i)[:1]))
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(nchunks,),
            memory_registers=40,
            in_specs=specs,
            max_concurrent_steps=min(STAGES, nchunks),
            wg_axis="wg",
            num_compute_wgs=nwg,
            compute_context=compute_thread,
        )
        gmem = [] if cfg.state_only else [a_ref.at[row, :, head]]
        gmem += [b_ref.at[row, :, head], c_ref.at[row, :, head]]
        if cfg.segments:
            gmem.append(lim_ref.at[row])
        pipeline(*gmem)

    state_type = jax.ShapeDtypeStruct((rows, heads, d, d), f32)
    out_type = (
        [state_type] if cfg.state_only else [jax.ShapeDtypeStruct(b.shape, dtype), state_type]
    )
    scratch = [
        plgpu.SMEM((nwg, d, SLAB), dtype, transforms=_transforms()),
        plgpu.SMEM((nwg, CHUNK, SLAB), dtype, transforms=_transforms()),  # decayed c, then scores
        plgpu.SMEM((nwg, CHUNK, SLAB), dtype, transforms=_transforms()),
        plgpu.SMEM((CHUNK, CHUNK), f32),
    ]
    interpret = None
    if cfg.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(heads, rows),
        grid_names=("heads", "rows"),
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    operands = [] if cfg.state_only else [a]
    operands += [b, c, slopes]
    if cfg.initial_state:
        operands.append(s0)
    if cfg.segments:
        operands.append(limit)
    outs = call(*operands)
    return (None, outs[0]) if cfg.state_only else (outs[0], outs[1])


def segment_limits(resets: jax.Array, reverse: bool) -> jax.Array:
    """Chunk-local segment limits from reset flags.

    resets bool ``[B, T + 1]`` (T a multiple of CHUNK): True where the state is reset before the
    token; position 0 and the extra position T are False. Returns int32 ``[B, T]``: forward, the
    chunk-local index of the last reset at or before the token (``no_reset`` if none in its chunk);
    reverse, the first reset after the token up to the next chunk's first token (index CHUNK).
    """
    b, t1 = resets.shape
    nch = (t1 - 1) // CHUNK
    local = jnp.arange(CHUNK, dtype=jnp.int32)
    if reverse:
        after = resets[:, 1:].reshape(b, nch, CHUNK)
        idx = jnp.where(after, local + 1, no_reset(True))
        lim = lax.cummin(idx, axis=2, reverse=True)
    else:
        at = resets[:, :-1].reshape(b, nch, CHUNK)
        lim = lax.cummax(jnp.where(at, local, no_reset(False)), axis=2)
    return lim.reshape(b, nch * CHUNK).astype(jnp.int32)


def num_pieces(batch: int, heads: int, nchunks: int, target_programs: int) -> int:
    """Pieces per row so that batch * heads * pieces reaches target_programs (a divisor of nchunks)."""
    pieces = 1
    for p in range(1, nchunks + 1):
        if nchunks % p == 0:
            pieces = p
            if batch * heads * p >= target_programs:
                break
    return pieces


def combine_pieces(deltas, n_real, cut, slopes, s0):
    """State entering each piece, in processing order, as one matrix product over pieces.

    deltas float32 ``[B, P, H, D, D]``: each piece's final state from a zero state; n_real int ``[P]``
    tokens per piece; cut bool ``[B, P]``: a segment start inside the piece (its entering state does
    not survive it); s0 ``[B, H, D, D]`` or None. Piece p enters with
    sum_{p' < p} W[p, p'] deltas[p'] + w0[p] s0, where W decays through the pieces in between
    (exp of a non-positive token count) and is zero across a cut.
    """
    pieces = n_real.shape[0]
    before = jnp.cumsum(n_real) - n_real  # tokens before piece p
    cuts_before = jnp.cumsum(cut, axis=1) - cut  # [B, P]
    p_idx = jnp.arange(pieces)
    gap = (before[:, None] - (before + n_real)[None, :]).astype(
        jnp.float32
    )  # tokens strictly between
    live = (p_idx[None, :] < p_idx[:, None])[None] & (
        cuts_before[:, :, None] == (cuts_before + cut)[:, None, :]
    )  # [B, P, P']
    w = jnp.where(live[:, None], jnp.exp(-slopes[None, :, None, None] * jnp.maximum(gap, 0.0)), 0.0)
    entering = jnp.einsum("bhpq,bqhkv->bphkv", w, deltas, precision=lax.Precision.HIGHEST)
    if s0 is not None:
        w0 = jnp.where(
            (cuts_before == 0)[:, None, :],
            jnp.exp(-slopes[None, :, None] * before[None, None, :].astype(jnp.float32)),
            0.0,
        )
        entering = entering + jnp.moveaxis(w0, 1, 2)[..., None, None] * s0[:, None]
    return entering


@functools.partial(jax.jit, static_argnames=("reverse", "length", "pieces", "interpret"))
def scan(
    a,
    b,
    c,
    slopes,
    s0,
    resets,
    entering=None,
    *,
    reverse: bool,
    length: int,
    pieces: int,
    interpret: bool = False,
):
    """The decayed scan over whole rows, split into ``pieces`` for parallelism.

    a, b, c ``[B, Tp, H, D]`` (Tp a multiple of CHUNK * pieces, zero after ``length`` real tokens);
    slopes float32 ``[H]``; s0 float32 ``[B, H, D, D]`` or None (the state entering the scan: before
    position 0, or after the last token when ``reverse``); resets bool ``[B, Tp + 1]`` or None;
    entering float32 ``[B * P, H, D, D]`` or None: every piece's entering state when already known
    (s0 included), which skips the state-only pass. Returns out ``[B, Tp, H, D]`` (a's dtype), the
    final state float32 ``[B, H, D, D]`` and the entering states used (None for one piece and no s0).
    """
    bsz, tp, h, d = b.shape
    lp = tp // pieces
    segments = resets is not None
    lim = segment_limits(resets, reverse) if segments else None

    def rows(x):  # [B, Tp, ...] -> [B * P, Tp / P, ...]
        return x.reshape((bsz * pieces, lp) + x.shape[2:])

    def call(state_only, s0_rows, a_rows):
        cfg = ScanConfig(
            reverse=reverse,
            state_only=state_only,
            segments=segments,
            initial_state=s0_rows is not None,
            interpret=interpret,
        )
        return _scan_call(
            a_rows,
            rows(b),
            rows(c),
            slopes,
            s0_rows,
            None if lim is None else rows(lim),
            (length, pieces),
            cfg,
        )

    if entering is None and pieces == 1:
        entering = s0
    if entering is None:
        entering = _entering_states(
            call, bsz, h, d, slopes, s0, resets, reverse, length, pieces, lp
        )
    out, finals = call(False, entering, rows(a))
    finals = finals.reshape(bsz, pieces, h, d, d)
    return out.reshape(b.shape), finals[:, 0 if reverse else -1], entering


def _entering_states(call, bsz, h, d, slopes, s0, resets, reverse, length, pieces, lp):
    """1. each piece from a zero state (state-only scan); 2. combined into every piece's entering
    state, ``[B * P, H, D, D]``."""
    _, deltas = call(True, None, None)
    deltas = deltas.reshape(bsz, pieces, h, d, d)
    n_real = jnp.clip(length - jnp.arange(pieces) * lp, 0, lp)
    if resets is not None:
        span = resets[:, 1:] if reverse else resets[:, :-1]
        cut = jnp.any(span.reshape(bsz, pieces, lp), axis=2)
    else:
        cut = jnp.zeros((bsz, pieces), jnp.bool_)
    if reverse:  # combine in processing order
        deltas, n_real, cut = deltas[:, ::-1], n_real[::-1], cut[:, ::-1]
    entering = combine_pieces(deltas, n_real, cut, slopes, s0)
    if reverse:
        entering = entering[:, ::-1]
    return entering.reshape(bsz * pieces, h, d, d)


# Programs per launch that num_pieces reaches: 128 stays within one wave of an H100/H200's 132
# SMs; fastest forward+backward at every benchmark shape in the sweep of 2026-11-22 (KERNEL_NOTES).
TARGET_PROGRAMS = 128


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the kernels handle these inputs on the default device (Hopper, bf16/f16, D 64/128)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    return q.shape[-1] in (64, 128) and is_hopper()


def _resets(segment_ids, b, t, tp):
    if segment_ids is None:
        return None
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    false = jnp.zeros((b, 1), jnp.bool_)
    return jnp.concatenate([false, change, jnp.zeros((b, tp - t + 1), jnp.bool_)], axis=1)


def _transpose(state):
    return None if state is None else jnp.swapaxes(state, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, s0, slopes, resets, length, pieces, interpret):
    return _attention_fwd(q, k, v, s0, slopes, resets, length, pieces, interpret)[0]


def _attention_fwd(q, k, v, s0, slopes, resets, length, pieces, interpret):
    o, state, entering = scan(
        q,
        k,
        v,
        slopes,
        s0,
        resets,
        reverse=False,
        length=length,
        pieces=pieces,
        interpret=interpret,
    )
    return (o, state), (q, k, v, s0, slopes, resets, entering)


def _attention_bwd(length, pieces, interpret, residuals, cotangents):
    q, k, v, s0, slopes, resets, entering = residuals
    do, d_state = cotangents
    do = do.astype(q.dtype)
    kw = dict(length=length, pieces=pieces, interpret=interpret)
    # dq scans sum v^T k: the transposes of the forward's per-piece entering states.
    dq, _, _ = scan(
        do, v, k, slopes, _transpose(s0), resets, _transpose(entering), reverse=False, **kw
    )
    # the state "after the last token" seen by the reverse scans is dS_T / lam; the dk scan's states
    # are the transposes of the dv scan's.
    g0 = d_state * jnp.exp(slopes)[None, :, None, None]
    dv, g_first, g_entering = scan(k, q, do, slopes, g0, resets, reverse=True, **kw)
    dk, _, _ = scan(
        v, do, q, slopes, _transpose(g0), resets, _transpose(g_entering), reverse=True, **kw
    )
    ds0 = None if s0 is None else g_first * jnp.exp(-slopes)[None, :, None, None]
    return dq, dk, dv, ds0, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def lightning_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Kernel path of ``lightning_attention`` (see ``supports`` for the inputs it takes).

    Differentiable in q, k, v and initial_state; slopes are treated as constants (zero gradient).

    q, k, v ``[B, T, H, D]`` bf16/f16, D 64 or 128; slopes ``[H]``; initial_state float32
    ``[B, H, D, D]`` or None; segment_ids int ``[B, T]`` or None. Returns o ``[B, T, H, D]`` in q's
    dtype and the final state float32 ``[B, H, D, D]``.
    """
    b, t, h, d = q.shape
    nchunks = -(-t // CHUNK)
    tp = nchunks * CHUNK
    pieces = num_pieces(b, h, nchunks, TARGET_PROGRAMS)
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) if tp != t else x for x in (q, k, v))
    resets = _resets(segment_ids, b, t, tp)
    s0 = None if initial_state is None else initial_state.astype(jnp.float32)
    o, state = _attention(q, k, v, s0, slopes.astype(jnp.float32), resets, t, pieces, interpret)
    return o[:, :t], state
