"""Pallas Mosaic GPU (Hopper) decode attention over paged keys: one query token per row, GQA.

Each program takes one row b, one KV head n and one split of the row's visible key slots. The
query heads of the group (G = H / N of them, padded to a 64-row wgmma tile) stay in shared memory;
a memory warpgroup streams the key and value slots ``BLOCK_KV`` at a time straight from the page
pool (one TMA copy per page of ``Z`` slots into consecutive rows of a shared-memory block, the page
read from the page table: no gather copy), as many blocks in flight (2 or 3, ``stages``) as fit in
Hopper's shared memory. The compute warpgroup
scores a block (``q @ k^T``, wgmma), masks it (slot > q_offset[b], or a key segment id other than
the query's), folds it into a float32 online softmax (row max and sum in registers) and adds
``p @ v`` (wgmma, p staged in shared memory). Only blocks holding a visible slot are read, so a row with a
short context in a long page table costs its own length. Each split writes its normalised output
and log-sum-exp; one small XLA reduction merges the splits (flash decoding).

Runs on Hopper through Mosaic GPU and on the CPU in Pallas' GPU interpret mode (the tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.device import is_hopper

ROWS = 64  # query rows of a program (one wgmma M tile: the group's heads, zero-padded)
BLOCK_KV = 128  # key slots scored per step
MAX_STAGES = 3  # key / value blocks in flight, at most
SMEM_BYTES = 232_448  # shared memory a Hopper block may take (227 KiB)
SMEM_RESERVE = 4_096  # Mosaic's own use beyond the scratch buffers (2,560 bytes on an H200, read from its error message)
TARGET_PROGRAMS = 264  # programs to fill 132 multiprocessors twice
LOG2E = math.log2(math.e)


def smem_bytes(head_dim: int, itemsize: int, stages: int, segments: bool) -> int:
    """Shared memory of the kernel's scratch buffers in bytes: the query tile, the softmax weights'
    tile, ``stages`` key and value blocks, their key segment ids (with ``segments``) and the
    barriers."""
    tiles = itemsize * (ROWS * head_dim + ROWS * BLOCK_KV + 2 * stages * BLOCK_KV * head_dim)
    return tiles + (4 * stages * BLOCK_KV if segments else 0) + 8 * (1 + 4 * stages)


def stages(head_dim: int, itemsize: int, segments: bool) -> int:
    """Key / value blocks in flight: the most (up to ``MAX_STAGES``) whose buffers and Mosaic's
    reserve fit ``SMEM_BYTES``; 0 when not even double buffering fits."""
    fits = [s for s in range(2, MAX_STAGES + 1)
            if smem_bytes(head_dim, itemsize, s, segments) + SMEM_RESERVE <= SMEM_BYTES]
    return max(fits, default=0)


def supports(q: jax.Array, key_pages: jax.Array, interpret: bool = False) -> bool:
    """Whether the kernel takes this call: q ``[B, 1, H, K]`` (one query token per row), pages
    ``[P, Z, N, K]`` in q's 16-bit dtype, K a multiple of 64 whose double-buffered blocks fit in
    shared memory (K <= 128), at most 64 query heads per KV head, Z a multiple of 8 dividing
    ``BLOCK_KV``; on a Hopper GPU unless ``interpret``."""
    _, t, h, k = q.shape
    _, z, n, _ = key_pages.shape
    return ((interpret or is_hopper()) and t == 1 and q.dtype == key_pages.dtype
            and q.dtype in (jnp.bfloat16, jnp.float16) and k % 64 == 0
            and stages(k, q.dtype.itemsize, True) >= 2
            and h % n == 0 and h // n <= ROWS and z % 8 == 0 and BLOCK_KV % z == 0)


def num_splits(batch: int, kv_heads: int, blocks: int) -> int:
    """Splits of a row's key blocks so that batch x kv_heads x splits reaches TARGET_PROGRAMS
    (at most one split per block)."""
    return max(1, min(blocks, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def _transforms(dtype) -> tuple:
    swizzle = plgpu.find_swizzle(64 * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _partials(q, key_pages, value_pages, page_table, q_segment_ids, kv_segment_ids, q_offset,
              splits: int, interpret: bool):
    """Per split: float32 normalised outputs ``[B, N, splits, ROWS, K]`` and log2-sum-exp2 of the
    scaled scores ``[B, N, splits, ROWS]`` (-inf where the split sees no key)."""
    b, n, _, kd = q.shape
    z = key_pages.shape[1]
    pages_per_block = BLOCK_KV // z
    segments = kv_segment_ids is not None
    dtype = q.dtype
    n_stages = stages(kd, dtype.itemsize, segments)
    f32 = jnp.float32
    wgmma = plgpu.Layout.WGMMA
    scale = LOG2E / math.sqrt(kd)

    def kernel(*refs):
        refs = list(refs)
        q_ref, k_ref, v_ref, table_ref, offset_ref = refs[:5]
        del refs[:5]
        qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if segments else (None, None)
        o_ref, lse_ref = refs.pop(0), refs.pop(0)
        q_smem, p_smem, k_smem, v_smem = refs.pop(0), refs.pop(0), refs.pop(0), refs.pop(0)
        seg_smem = refs.pop(0) if segments else None
        q_bar, k_bar, v_bar, k_free, v_free = refs

        row, head, split = lax.axis_index("rows"), lax.axis_index("heads"), lax.axis_index("splits")
        wg = lax.axis_index("wg")
        offset = offset_ref[row]
        active = lax.div(offset + BLOCK_KV, jnp.int32(BLOCK_KV))  # blocks holding slots <= offset
        per_split = lax.div(active + splits - 1, jnp.int32(splits))
        first = jnp.minimum(split * per_split, active)
        steps = jnp.minimum(first + per_split, active) - first

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, steps)
            def _(step):
                slot = lax.rem(step, n_stages)

                @pl.when(step >= n_stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

                blk = first + step
                if segments:
                    plgpu.copy_gmem_to_smem(kseg_ref.at[row, pl.ds(blk * BLOCK_KV, BLOCK_KV)],
                                            seg_smem.at[slot], k_bar.at[slot])
                for i in range(pages_per_block):
                    page = jnp.clip(table_ref[row, blk * pages_per_block + i], 0, key_pages.shape[0] - 1)
                    rows = pl.ds(i * z, z)
                    plgpu.copy_gmem_to_smem(k_ref.at[page, :, head], k_smem.at[slot, rows], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[page, :, head], v_smem.at[slot, rows], v_bar.at[slot])

            @pl.loop(jnp.maximum(steps - n_stages, 0), steps)
            def _(step):  # the last blocks are consumed before the barriers go away
                plgpu.barrier_wait(k_free.at[lax.rem(step, n_stages)])
                plgpu.barrier_wait(v_free.at[lax.rem(step, n_stages)])

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(q_ref.at[row, head], q_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            q_seg = qseg_ref[row] if segments else None
            cols = plgpu.broadcasted_iota(jnp.int32, (ROWS, BLOCK_KV), 1, layout=wgmma)

            def body(step, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(step, n_stages)
                plgpu.barrier_wait(k_bar.at[slot])

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((ROWS, BLOCK_KV), f32)) * scale
                visible = cols + (first + step) * BLOCK_KV <= offset
                if segments:
                    seg = plgpu.load(seg_smem.at[slot], layout=wgmma.reduce(0), optimized=False)
                    visible &= lax.broadcast_in_dim(seg, (ROWS, BLOCK_KV), [1]) == q_seg
                plgpu.barrier_arrive(k_free.at[slot])
                s = jnp.where(visible, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                p_smem[...] = p.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(v_bar.at[slot])

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                    return acc_ref[...]

                pv = pl.run_scoped(values, plgpu.ACC((ROWS, kd), f32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l_i

            init = (plgpu.layout_cast(jnp.zeros((ROWS, kd), f32), wgmma),
                    plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, f32), wgmma.reduce(1)),
                    plgpu.layout_cast(jnp.zeros((ROWS,), f32), wgmma.reduce(1)))
            acc, m_i, l_i = lax.fori_loop(0, steps, body, init)
            seen = l_i > 0
            inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
            o_ref.at[row, head, split][...] = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            lse_ref.at[row, head, split][...] = jnp.where(seen, m_i + jnp.log(jnp.where(seen, l_i, 1.0)) * LOG2E,
                                                          -jnp.inf)

    scratch = [plgpu.SMEM((ROWS, kd), dtype, transforms=_transforms(dtype)),
               plgpu.SMEM((ROWS, BLOCK_KV), dtype, transforms=_transforms(dtype)),
               plgpu.SMEM((n_stages, BLOCK_KV, kd), dtype, transforms=_transforms(dtype)),
               plgpu.SMEM((n_stages, BLOCK_KV, kd), dtype, transforms=_transforms(dtype))]
    if segments:
        scratch.append(plgpu.SMEM((n_stages, BLOCK_KV), jnp.int32))
    loads = pages_per_block + (1 if segments else 0)
    scratch += [plgpu.Barrier(),
                plgpu.Barrier(num_arrivals=loads, num_barriers=n_stages),
                plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=n_stages),
                plgpu.Barrier(num_barriers=n_stages),
                plgpu.Barrier(num_barriers=n_stages)]
    interpret_params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret_params = InterpretGPUParams()
    call = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((b, n, splits, ROWS, kd), f32),
                  jax.ShapeDtypeStruct((b, n, splits, ROWS), f32)],
        scratch_types=scratch,
        grid=(b, n, splits),
        grid_names=("rows", "heads", "splits"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params,
    )
    operands = [q, key_pages, value_pages, page_table, q_offset]
    if segments:
        operands += [q_segment_ids, kv_segment_ids]
    return call(*operands)


@functools.partial(jax.jit, static_argnames=("splits", "interpret"))
def paged_decode_attention(q: jax.Array, key_pages: jax.Array, value_pages: jax.Array,
                           page_table: jax.Array, q_segment_ids: jax.Array | None,
                           kv_segment_ids: jax.Array | None, q_offset: jax.Array, *,
                           splits: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal GQA attention of one query token per row over paged keys (see the module doc).

    q ``[B, 1, H, K]``; key_pages, value_pages ``[P, Z, N, K]`` in q's dtype (bf16 / f16); page_table
    int32 ``[B, R]`` (slot s of row b: offset s % Z of page page_table[b, s // Z]; entries out of
    range are clipped into the pool, so the mask must hide them); q_segment_ids ``[B, 1]`` and
    kv_segment_ids ``[B, R * Z]`` or both None; q_offset int32 ``[B]``: the query's slot (it sees
    slots <= q_offset[b] of its segment). Scores scaled by 1/sqrt(K), float32 softmax; a query that
    sees no key gets 0. ``splits``: programs per row and KV head (default ``num_splits``).
    Returns ``[B, 1, H, K]`` in q's dtype. Callers check ``supports`` first.
    """
    b, _, h, kd = q.shape
    z, n = key_pages.shape[1], key_pages.shape[2]
    g = h // n
    pages_per_block = BLOCK_KV // z
    r = page_table.shape[1]
    pad = -r % pages_per_block
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, pad)))
    segments = None, None
    if kv_segment_ids is not None:
        kseg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad * z)),
                       constant_values=jnp.iinfo(jnp.int32).min)
        segments = q_segment_ids.astype(jnp.int32)[:, 0], kseg
    qg = jnp.pad(q[:, 0].reshape(b, n, g, kd), ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))
    splits = splits or num_splits(b, n, table.shape[1] // pages_per_block)
    o, lse = _partials(qg, key_pages, value_pages, table, *segments, q_offset.astype(jnp.int32),
                       splits, interpret)
    o, lse = o[:, :, :, :g], lse[:, :, :, :g]  # [B, N, splits, G, K], [B, N, splits, G]
    top = jnp.max(lse, axis=2, keepdims=True)
    weight = jnp.where(lse == -jnp.inf, 0.0, jnp.exp2(lse - jnp.where(top == -jnp.inf, 0.0, top)))
    total = jnp.sum(weight, axis=2, keepdims=True)
    weight = weight / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bnsg,bnsgk->bngk", weight, o)
    return out.reshape(b, 1, h, kd).astype(q.dtype)
