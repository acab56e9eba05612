"""Pallas Mosaic GPU (Hopper) grouped matmul kernels: forward / d_x and d_w.

Rows of ``x`` are sorted by group: group g owns rows ``[start_g, start_g + group_sizes[g])``.

- ``ragged_matmul``: ``out[r] = x[r] @ w[g(r)]`` for several weights sharing the contraction
  (outputs side by side along the columns, e.g. w1 | w3 in one launch), or, with
  ``transpose_rhs``, ``out[r] = x[r] @ w[g(r)]^T`` with the weights splitting the contraction
  (the d_x of the former, accumulated in one float32 tile). A persistent grid walks the output
  tiles; a group's row tiles start at its first row rounded down to ``block_m`` (JAX's schedule)
  or to 8 (``Tiles.aligned``), a tile straddling a group boundary is computed once per group and
  each pass stores only its group's rows. Tiles holding no row of their group skip the matmul, and
  rows past ``sum(group_sizes)`` are written as zeros.
- ``transposed_ragged_matmul``: ``dw[g] = x[rows of g]^T @ dy[rows of g]`` for a column range of
  ``dy``; rows of a block that belong to another group are masked to zero before the wgmma.

Adapted from JAX's ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` and
``transposed_ragged_dot_mgpu`` (Apache License 2.0). bf16/f16 operands, float32 accumulation; also
runs on the CPU in Pallas' GPU interpret mode (any float dtype there).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

DEFAULT_NUM_SMS = 132  # H100 SXM and H200


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of one kernel launch: output tile ``block_m x block_n``, contraction step
    ``block_k``, ``stages`` tiles in flight, ``grid_block_n`` column tiles per snake band.
    ``aligned`` (``ragged_matmul``): a group's row tiles start at its first row rounded down to 8
    instead of to ``block_m`` (fewer tiles straddle two groups)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 4
    grid_block_n: int = 1
    aligned: bool = False


def num_sms() -> int:
    """Multiprocessors of the default device (132 where the device does not say)."""
    return getattr(jax.devices()[0], "core_count", None) or DEFAULT_NUM_SMS


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def _row_table(group_sizes: jax.Array, m: int, block_m: int, align: int) -> jax.Array:
    """int32 ``[5, G + 1]`` per group: first tile, end tile, first row, end row, first tile row.

    Group g (rows ``[s_g, e_g)``) owns row tiles ``block_m`` high starting at ``s_g`` rounded down
    to ``align``, none when empty. A last virtual group holds the rows past the real ones.
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    sizes = jnp.append(sizes, jnp.maximum(m - jnp.sum(sizes), 0))
    ends = jnp.cumsum(sizes, dtype=jnp.int32)
    starts = ends - sizes
    first_rows = starts // align * align
    tiles = jnp.where(sizes == 0, 0, (ends - first_rows + block_m - 1) // block_m)
    tile_ends = jnp.cumsum(tiles, dtype=jnp.int32)
    return jnp.stack([tile_ends - tiles, tile_ends, starts, ends, first_rows]).astype(jnp.int32)


def _tile_rows(table_ref, num_groups: int, block_m: int, tid):
    """(group, first row of the tile, first row to store, rows to store) of row tile ``tid``;
    tiles past the last group's get no rows."""
    group = jnp.int32(0)
    for i in range(num_groups):
        group = group + (table_ref[1, i] <= tid).astype(jnp.int32)
    row0 = table_ref[4, group] + (tid - table_ref[0, group]) * block_m
    lo = jnp.maximum(row0, table_ref[2, group])
    hi = jnp.minimum(row0 + block_m, table_ref[3, group])
    return group, row0, lo, jnp.maximum(hi - lo, 0)


def _store_rows(acc, o_gmem, row0, lo, size, col0: int | jax.Array, block_m: int, block_n: int,
                m: int):
    """Stores rows ``[lo, lo + size)`` of the tile at row ``row0`` (at most ``block_m``) through
    a ladder of power-of-two TMA copies (their row counts must be static)."""

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), dtype=o_gmem.dtype))
    def _(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        offset = lo - row0
        rows = min(block_m, m)
        while rows > 0:
            chunk = 1 << int(math.log2(rows))
            rows //= 2

            @pl.when(size & chunk != 0)
            def _():
                plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(offset, chunk)],
                    o_gmem.at[pl.ds(row0 + offset, chunk), pl.ds(col0, block_n)])

            offset += size & chunk
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def ragged_matmul(x: jax.Array, ws: tuple[jax.Array, ...], group_sizes: jax.Array, *,
                  transpose_rhs: bool, tiles: Tiles,
                  interpret: bool = False) -> jax.Array:
    """Grouped matmul over row groups of ``x``.

    Without ``transpose_rhs``: x ``[M, K]``, ws ``([G, K, N_j], ...)`` -> ``[M, sum_j N_j]``,
    columns of weight j side by side; every N_j a multiple of ``block_n``.
    With ``transpose_rhs``: x ``[M, sum_j K_j]``, ws ``([G, N, K_j], ...)`` ->
    ``[M, N] = sum_j x[:, K_j cols] @ w_j[g]^T``; every K_j a multiple of ``block_k``.
    group_sizes int32 ``[G]`` with ``sum <= M``; rows past the sum are zero. Output in x's dtype,
    float32 accumulation.
    """
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    m = x.shape[0]
    g = ws[0].shape[0]
    if transpose_rhs:
        n = ws[0].shape[1]
        k_sizes = [w.shape[2] for w in ws]
        n_sizes = [n]
    else:
        k_sizes = [ws[0].shape[1]]
        n_sizes = [w.shape[2] for w in ws]
        n = sum(n_sizes)
    shared = {w.shape[:2] for w in ws}
    if len(shared) != 1 or x.shape[1] != sum(k_sizes):
        raise ValueError(f"weights {[w.shape for w in ws]} do not fit x {x.shape}")
    if any(s % bk for s in k_sizes) or any(s % bn for s in n_sizes):
        raise ValueError(f"contraction {k_sizes} and output {n_sizes} sizes must be multiples of "
                         f"block_k={bk} and block_n={bn}")
    k_offsets = [sum(k_sizes[:j]) // bk for j in range(len(k_sizes))]
    n_offsets = [sum(n_sizes[:j]) // bn for j in range(len(n_sizes))]

    align = 8 if tiles.aligned and m % 8 == 0 else bm
    if align == bm:
        grid_m = pl.cdiv(m, bm) + g
    else:  # a group's tiles cover at most its rows + 7 more, plus a partial tile
        grid_m = pl.cdiv(m + (align - 1) * (g + 1), bm) + g + 1

    def body(table_gmem, x_gmem, *refs):
        w_gmems, o_gmem = refs[:-1], refs[-1]
        grid_n = n // bn

        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _(loop_info: plgpu.NDLoopInfo):
            mi, ni = plgpu.planar_snake(loop_info.index[0], (grid_m, grid_n), 1,
                                        tiles.grid_block_n)
            group, row0, lo, size = _tile_rows(table_gmem, g, bm, mi)
            row0 = pl.multiple_of(row0, align)

            def pipeline(acc_ref, w_gmem, k_steps: int, k_offset: int, n_tile):
                def step(_, x_smem, w_smem):
                    plgpu.wgmma(acc_ref, x_smem, w_smem.T if transpose_rhs else w_smem)

                w_block = (bn, bk) if transpose_rhs else (bk, bn)
                w_index = (lambda k: (n_tile, k)) if transpose_rhs else (lambda k: (k, n_tile))
                plgpu.emit_pipeline(
                    step,
                    grid=(k_steps,),
                    in_specs=[
                        plgpu.BlockSpec((pl.Element(bm), bk), lambda k: (row0, k + k_offset),
                                        delay_release=1),
                        plgpu.BlockSpec(w_block, w_index, delay_release=1),
                    ],
                    max_concurrent_steps=tiles.stages,
                )(x_gmem, w_gmem.at[group])

            def acc_scope(acc_ref):
                @pl.when(group < g)  # the virtual group past the real ones stores zeros
                def _():
                    if transpose_rhs:  # the weights split the contraction: one accumulation
                        for j, w_gmem in enumerate(w_gmems):
                            pipeline(acc_ref, w_gmem, k_sizes[j] // bk, k_offsets[j], ni)
                            plgpu.wgmma_wait(0)
                    else:  # the weights split the output columns: one weight per tile
                        for j, w_gmem in enumerate(w_gmems):
                            first, count = n_offsets[j], n_sizes[j] // bn

                            @pl.when((ni >= first) & (ni < first + count))
                            def _():
                                pipeline(acc_ref, w_gmem, k_sizes[0] // bk, 0, ni - first)

                return acc_ref[...]

            @pl.when(size > 0)
            def _():
                acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))
                _store_rows(acc, o_gmem, row0, lo, size, ni * bn, bm, bn, m)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )
    return kernel(_row_table(group_sizes, m, bm, align), x, *ws)


def transposed_ragged_matmul(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
                             col_start: int, cols: int, tiles: Tiles,
                             interpret: bool = False) -> jax.Array:
    """Per-group ``x^T @ dy``: x ``[M, K]``, dy ``[M, N_all]``, group_sizes int32 ``[G]`` ->
    ``[G, K, cols]`` with ``out[g] = x[rows of g]^T @ dy[rows of g, col_start:col_start + cols]``
    (zeros for empty groups). K a multiple of ``block_m``; col_start and cols of ``block_n``.
    Output in x's dtype, float32 accumulation. Here ``block_m`` tiles K and ``block_k`` the rows M.
    """
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    m, kdim = x.shape
    g = group_sizes.shape[0]
    if kdim % bm or col_start % bn or cols % bn:
        raise ValueError(f"K={kdim}, col_start={col_start}, cols={cols} must be multiples of "
                         f"block_m={bm}, block_n={bn}")
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_blocks = starts // bk
    num_blocks = jnp.where(sizes > 0, (ends + bk - 1) // bk - first_blocks, 0)

    swizzle = plgpu.find_swizzle(bk * jnp.dtype(x.dtype).itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(x.dtype).itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    n_offset = col_start // bn

    def body(starts_gmem, ends_gmem, first_gmem, nblocks_gmem, x_gmem, dy_gmem, o_gmem):
        grid_m, grid_n = kdim // bm, cols // bn

        @plgpu.nd_loop((g, grid_m * grid_n), collective_axes="sm")
        def _(loop_info: plgpu.NDLoopInfo):
            gi = loop_info.index[0]
            mi, ni = plgpu.planar_snake(loop_info.index[1], (grid_m, grid_n), 1,
                                        tiles.grid_block_n)
            first_block = first_gmem[gi]
            nblocks = nblocks_gmem[gi]

            def mask_rows(x_smem, keep):
                rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (bk, bm), 0),
                                         plgpu.Layout.WGMMA)
                x_smem[...] = x_smem[...] * keep(rows).astype(x_smem.dtype)
                plgpu.commit_smem()

            def acc_scope(acc_ref):
                def step(idx, x_smem, dy_smem):
                    step_i = idx[0]

                    @pl.when(step_i == 0)
                    def _():
                        mask_rows(x_smem, lambda r: r >= lax.rem(starts_gmem[gi], bk))

                    @pl.when(step_i == nblocks - 1)
                    def _():
                        mask_rows(x_smem, lambda r: r <= lax.rem(ends_gmem[gi] - 1, bk))

                    plgpu.wgmma(acc_ref, x_smem.T, dy_smem)
                    if tiles.stages == 1:
                        plgpu.wgmma_wait(0)

                release = 1 if tiles.stages > 1 else 0

                @pl.when(nblocks > 0)
                def _():
                    plgpu.emit_pipeline(
                        step,
                        grid=(nblocks,),
                        in_specs=[
                            plgpu.BlockSpec((bk, bm), lambda k: (k + first_block, mi),
                                            delay_release=release, transforms=transforms),
                            plgpu.BlockSpec((bk, bn), lambda k: (k + first_block, ni + n_offset),
                                            delay_release=release, transforms=transforms),
                        ],
                        max_concurrent_steps=tiles.stages,
                    )(x_gmem, dy_gmem)

                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

            @functools.partial(pl.run_scoped,
                               o_smem=plgpu.SMEM((bm, bn), dtype=o_gmem.dtype,
                                                 transforms=transforms))
            def _(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o_smem, o_gmem.at[gi, pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((g, kdim, cols), x.dtype),
        grid=(num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )
    return kernel(starts, ends, first_blocks, num_blocks, x, dy)
