"""Pallas Mosaic GPU (Hopper) grouped matmul kernels: forward / d_x and d_w.

Rows of ``x`` are sorted by group: group g owns rows ``[start_g, start_g + group_sizes[g])``.

- ``ragged_matmul``: ``out[r] = x[r] @ w[g(r)]`` for several weights sharing the contraction
  (outputs side by side along the columns, e.g. w1 | w3 in one launch), or, with
  ``transpose_rhs``, ``out[r] = x[r] @ w[g(r)]^T`` with the weights splitting the contraction
  (the d_x of the former, accumulated in one float32 tile). A group's row tiles start at its
  first row rounded down to ``block_m`` or to 8 (``Tiles.aligned``); a tile straddling a group
  boundary is computed once per group and each pass stores only its group's rows. Tiles holding
  no row of their group are skipped, and rows past ``sum(group_sizes)`` are written as zeros.
- ``transposed_ragged_matmul``: ``dw[g] = x[rows of g]^T @ dy[rows of g]`` for a column range of
  ``dy``; rows of a block that belong to another group are masked to zero before the wgmma.

Both are persistent and warp-specialized (``_persistent_matmul``): each of ``num_sms()`` programs
walks its output tiles; a memory warpgroup streams the operand blocks of all its tiles through
``stages`` shared-memory slots without stopping between tiles, while two compute warpgroups
accumulate the upper and lower halves of a ``block_m x block_n`` tile in registers (wgmmas 64
rows high and ``block_n`` wide) and store them, so one tile's epilogue overlaps the next tile's
loads. bf16/f16 operands, float32 accumulation; also runs on the CPU in Pallas' GPU interpret
mode (any float dtype there).
Quantized (int8 / fp8) weights are not handled here: both operands are staged in one 16-bit
dtype for wgmma, and ``grouped_matmul`` sends ``QuantizedWeights`` to its XLA form instead.

The row schedule of ``ragged_matmul`` (tiles per group, the straddling tiles, the ladder of row
stores) follows JAX's ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` (Apache License 2.0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

DEFAULT_NUM_SMS = 132  # H100 SXM and H200
COMPUTE_WGS = 2  # compute warpgroups per program, one per half of a tile
EPILOGUE = (64, 128)  # rows x columns of a warpgroup's accumulator stored per round
MEMORY_REGISTERS = 40  # per thread of the memory warpgroup; the compute ones get the rest


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of one kernel launch: output tile ``block_m x block_n`` (``block_m / 2`` rows
    per compute warpgroup, so ``block_m`` 128), contraction step ``block_k``, ``stages`` operand
    slots in flight, ``grid_block_n`` column tiles per snake band. ``aligned``
    (``ragged_matmul``): a group's row tiles start at its first row rounded down to 8 instead of
    to ``block_m`` (fewer tiles straddle two groups)."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    stages: int = 4
    grid_block_n: int = 1
    aligned: bool = False

    @property
    def wg_m(self) -> int:
        """Accumulator rows of one compute warpgroup."""
        return self.block_m // COMPUTE_WGS


def num_sms() -> int:
    """Multiprocessors of the default device (132 where the device does not say)."""
    return getattr(jax.devices()[0], "core_count", None) or DEFAULT_NUM_SMS


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def _swizzled(dtype, minor: int) -> tuple:
    """Shared-memory transforms (8-row tiling, widest swizzle) for blocks ``minor`` wide."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


@dataclasses.dataclass(frozen=True)
class _Work:
    """One output tile of a program: ``steps`` contraction steps (traced int32; 0 skips the
    matmul) and the tile's coordinates, whatever the kernel needs."""

    steps: jax.Array
    coords: dict


def _persistent_matmul(produced, consumed, *, grid: tuple[int, ...],
                       schedule: Callable[[tuple], _Work],
                       load: Callable[[_Work, jax.Array, jax.Array, object], None],
                       mma: Callable[[_Work, jax.Array, jax.Array, object, jax.Array], None],
                       store: Callable[[_Work, jax.Array, jax.Array], None],
                       acc_shape: tuple[int, int], stages: int) -> None:
    """Body of a warp-specialized persistent matmul kernel (threads "wg", programs "sm").

    The programs split the tiles of ``grid`` (``plgpu.nd_loop``); ``schedule(index)`` gives a
    tile's ``_Work``. The memory warpgroup calls ``load(work, k, slot, barrier)`` for step k of
    every tile in turn (copies into shared-memory slot ``slot``, each arriving on ``barrier``),
    waiting only until the slot's previous contents are consumed (``consumed``). Each compute
    warpgroup wg takes a fresh float32 accumulator ``acc_shape`` per tile, calls ``mma(work, k,
    slot, acc_ref, wg)`` once the slot has landed (``produced``), frees a slot once the wgmma that
    read it has finished, and passes the accumulator's value to ``store(work, acc, wg)``. (No
    wgmma sits under a condition: a conditional wgmma measured 25-30% slower on the H200.)
    """
    wg = lax.axis_index("wg")

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

        @plgpu.nd_loop(grid, collective_axes="sm", init_carry=jnp.int32(0))
        def total(loop_info, carry):
            work = schedule(loop_info.index)

            @pl.loop(0, work.steps)
            def _(k):
                step = carry + k
                slot = lax.rem(step, stages)

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                load(work, k, slot, produced.at[slot])

            return carry + work.steps

        @pl.loop(jnp.maximum(total - stages, 0), total)
        def _(step):  # observe the last slots' consumption before the barriers go away
            plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        registers = min(256, (512 - MEMORY_REGISTERS) // COMPUTE_WGS) // 8 * 8
        plgpu.set_max_registers(registers, action="increase")

        @plgpu.nd_loop(grid, collective_axes="sm", init_carry=jnp.int32(0))
        def _(loop_info, carry):
            work = schedule(loop_info.index)

            def acc_scope(acc_ref):
                @pl.loop(0, work.steps)
                def _(k):
                    step = carry + k
                    slot = lax.rem(step, stages)
                    plgpu.barrier_wait(produced.at[slot])
                    mma(work, k, slot, acc_ref, wg)
                    plgpu.wgmma_wait(1)  # the previous step's wgmma has read its slot

                    @pl.when(k > 0)
                    def _():
                        plgpu.barrier_arrive(consumed.at[lax.rem(step - 1, stages)])

                plgpu.wgmma_wait(0)

                @pl.when(work.steps > 0)
                def _():
                    plgpu.barrier_arrive(consumed.at[lax.rem(carry + work.steps - 1, stages)])

                return acc_ref[...]

            store(work, pl.run_scoped(acc_scope, plgpu.ACC(acc_shape)), wg)
            return carry + work.steps

        plgpu.wait_smem_to_gmem(0)


def _launch(body, out_type, scratch: list, stages: int, loads_per_step: int, interpret: bool,
            *args):
    """Runs ``body(*inputs, out, *scratch, produced, consumed)``: one program per SM with
    ``COMPUTE_WGS`` compute warpgroups and a memory one sharing ``scratch`` and the barriers of
    ``stages`` slots (``loads_per_step`` copies land in a slot per step)."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=[*scratch,
                       plgpu.Barrier(num_arrivals=loads_per_step, num_barriers=stages),
                       plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)],
        grid=(num_sms(),),
        grid_names=("sm",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )(*args)


def _store_rows(acc, o_smem, o_gmem, row0, col0, rows: tuple | None = None) -> None:
    """Stores an accumulator ``acc [h, w]`` to ``o_gmem`` at row ``row0``, column ``col0``,
    through ``o_smem`` one round of at most ``EPILOGUE`` rows x columns at a time.
    ``rows = (first, count)`` stores only rows ``[first, first + count)`` of ``acc``, each round's
    share as a ladder of power-of-two TMA copies (their row counts must be static); None stores
    every row. The copies are left in flight: the next round (or the kernel's end) waits for them
    to have read ``o_smem``."""
    height, width = acc.shape
    per_round = min(EPILOGUE[0], height), min(EPILOGUE[1], width)
    o_smem = o_smem.at[pl.ds(0, per_round[0]), pl.ds(0, per_round[1])]
    for r0 in range(0, height, per_round[0]):
        for c0 in range(0, width, per_round[1]):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[...] = acc[r0:r0 + per_round[0], c0:c0 + per_round[1]].astype(o_smem.dtype)
            plgpu.commit_smem()
            cols = pl.ds(col0 + c0, per_round[1])
            if rows is None:
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(row0 + r0, per_round[0]), cols])
                continue
            start = jnp.clip(rows[0], r0, r0 + per_round[0])
            size = jnp.clip(rows[0] + rows[1], r0, r0 + per_round[0]) - start
            offset = start - r0
            ladder = min(per_round[0], o_gmem.shape[0])
            while ladder > 0:
                chunk = 1 << int(math.log2(ladder))
                ladder //= 2

                @pl.when(size & chunk != 0)
                def _():
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, chunk)],
                                            o_gmem.at[pl.ds(row0 + r0 + offset, chunk), cols])

                offset += size & chunk


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


def ragged_matmul(x: jax.Array, ws: tuple[jax.Array, ...], group_sizes: jax.Array, *,
                  transpose_rhs: bool, tiles: Tiles,
                  interpret: bool = False) -> jax.Array:
    """Grouped matmul over row groups of ``x``.

    Without ``transpose_rhs``: x ``[M, K]``, ws ``([G, K, N_j], ...)`` -> ``[M, sum_j N_j]``,
    columns of weight j side by side; every N_j a multiple of ``block_n``.
    With ``transpose_rhs``: x ``[M, sum_j K_j]``, ws ``([G, N, K_j], ...)`` ->
    ``[M, N] = sum_j x[:, K_j cols] @ w_j[g]^T``; every K_j a multiple of ``block_k``, N of
    ``block_n``. group_sizes int32 ``[G]`` with ``sum <= M``; M a multiple of 8; rows past
    the sum are zero. Output in x's dtype, float32 accumulation.
    """
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    m = x.shape[0]
    g = ws[0].shape[0]
    if transpose_rhs:
        n = ws[0].shape[1]
        k_sizes, n_sizes = [w.shape[2] for w in ws], [n]
    else:
        k_sizes, n_sizes = [ws[0].shape[1]], [w.shape[2] for w in ws]
        n = sum(n_sizes)
    if len({w.shape[:2] for w in ws}) != 1 or x.shape[1] != sum(k_sizes):
        raise ValueError(f"weights {[w.shape for w in ws]} do not fit x {x.shape}")
    if any(s % bk for s in k_sizes) or any(s % bn for s in n_sizes) or m % 8:
        raise ValueError(f"contraction {k_sizes}, output {n_sizes} and M={m} must be multiples "
                         f"of block_k={bk}, block_n={bn} and 8")
    k_firsts = [sum(k_sizes[:j]) // bk for j in range(len(ws))]  # first step of weight j
    n_firsts = [sum(n_sizes[:j]) // bn for j in range(len(ws))]  # first column tile of weight j
    k_steps = sum(k_sizes) // bk

    align = 8 if tiles.aligned else bm
    if align == bm:
        grid_m = pl.cdiv(m, bm) + g
    else:  # a group's tiles cover at most its rows + 7 more, plus a partial tile
        grid_m = pl.cdiv(m + (align - 1) * (g + 1), bm) + g + 1
    grid_n = n // bn
    dtype = x.dtype
    w_block = (bn, bk) if transpose_rhs else (bk, bn)
    wg_m = tiles.wg_m

    def body(table_gmem, x_gmem, *refs):
        w_gmems, (o_gmem, x_smem, w_smem, o_smem, produced, consumed) = refs[:-6], refs[-6:]

        def schedule(index):
            mi, ni = plgpu.planar_snake(index[0], (grid_m, grid_n), 1, tiles.grid_block_n)
            group, row0, lo, size = _tile_rows(table_gmem, g, bm, mi)
            steps = jnp.where((size > 0) & (group < g), k_steps, 0)
            return _Work(steps, dict(ni=ni, group=group, row0=pl.multiple_of(row0, align),
                                     lo=lo, size=size))

        def load(work, k, slot, barrier):
            c = work.coords
            plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(c["row0"], bm), pl.ds(k * bk, bk)],
                                    x_smem.at[slot], barrier)
            for j, w_gmem in enumerate(w_gmems):
                if transpose_rhs:  # the weights split the contraction
                    first, count, local = k_firsts[j], k_sizes[j] // bk, k - k_firsts[j]
                    mine = (k >= first) & (k < first + count)
                    src = w_gmem.at[c["group"], pl.ds(c["ni"] * bn, bn), pl.ds(local * bk, bk)]
                else:  # the weights split the output columns
                    first, count, local = n_firsts[j], n_sizes[j] // bn, c["ni"] - n_firsts[j]
                    mine = (c["ni"] >= first) & (c["ni"] < first + count)
                    src = w_gmem.at[c["group"], pl.ds(k * bk, bk), pl.ds(local * bn, bn)]
                if len(w_gmems) == 1:
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot], barrier)
                else:
                    @pl.when(mine)
                    def _():
                        plgpu.copy_gmem_to_smem(src, w_smem.at[slot], barrier)

        def mma(work, k, slot, acc_ref, wg):
            rhs = w_smem.at[slot].T if transpose_rhs else w_smem.at[slot]
            plgpu.wgmma(acc_ref, x_smem.at[slot, pl.ds(wg * wg_m, wg_m)], rhs)

        def store(work, acc, wg):
            c = work.coords
            first = c["lo"] - c["row0"] - wg * wg_m  # in the warpgroup's rows

            @pl.when((first < wg_m) & (first + c["size"] > 0))  # also the rows past the groups
            def _():
                _store_rows(acc, o_smem.at[wg], o_gmem, c["row0"] + wg * wg_m, c["ni"] * bn,
                            rows=(first, c["size"]))

        _persistent_matmul(produced, consumed, grid=(grid_m * grid_n,), schedule=schedule,
                           load=load, mma=mma, store=store, acc_shape=(wg_m, bn),
                           stages=tiles.stages)

    scratch = [
        plgpu.SMEM((tiles.stages, bm, bk), dtype, transforms=_swizzled(dtype, bk)),
        plgpu.SMEM((tiles.stages, *w_block), dtype, transforms=_swizzled(dtype, w_block[1])),
        plgpu.SMEM((COMPUTE_WGS, *EPILOGUE), dtype),
    ]
    return _launch(body, jax.ShapeDtypeStruct((m, n), dtype), scratch, tiles.stages, 2,
                   interpret, _row_table(group_sizes, m, bm, align), x, *ws)


def transposed_ragged_matmul(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
                             col_start: int, cols: int, tiles: Tiles,
                             interpret: bool = False) -> jax.Array:
    """Per-group ``x^T @ dy``: x ``[M, K]``, dy ``[M, N_all]``, group_sizes int32 ``[G]`` ->
    ``[G, K, cols]`` with ``out[g] = x[rows of g]^T @ dy[rows of g, col_start:col_start + cols]``
    (zeros for empty groups). K a multiple of ``block_m``; col_start and cols of ``block_n``.
    M at least ``block_k``. Output in x's dtype, float32 accumulation. Here ``block_m`` tiles K
    and ``block_k`` the rows M; a group's row blocks start at its first row rounded down to 8, so
    only its first (up to 7 rows) and its last hold other rows (masked to zero).
    """
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    m, kdim = x.shape
    g = group_sizes.shape[0]
    if kdim % bm or col_start % bn or cols % bn:
        raise ValueError(f"K={kdim}, col_start={col_start}, cols={cols} must be multiples of "
                         f"block_m={bm}, block_n={bn}")
    if m < bk:
        raise ValueError(f"M={m} must be at least block_k={bk}")
    # group g's row blocks start at its first row rounded down to 8 (the tiling of TMA's rows);
    # the last one ends at most at row M
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    firsts = starts // 8 * 8
    steps = jnp.where(sizes > 0, (ends - firsts + bk - 1) // bk, 0)
    bounds = jnp.stack([starts, ends, steps, firsts]).astype(jnp.int32)
    grid_m, grid_n = kdim // bm, cols // bn
    dtype = x.dtype
    wg_m = tiles.wg_m

    def body(bounds_gmem, x_gmem, dy_gmem, o_gmem, x_smem, dy_smem, o_smem, produced, consumed):
        def schedule(index):
            gi = index[0]
            mi, ni = plgpu.planar_snake(index[1], (grid_m, grid_n), 1, tiles.grid_block_n)
            return _Work(bounds_gmem[2, gi], dict(gi=gi, mi=mi, ni=ni))

        def block_row(work, k):  # (unclamped, clamped) first row of block k
            row = bounds_gmem[3, work.coords["gi"]] + k * bk
            return row, pl.multiple_of(jnp.minimum(row, m - bk), 8)

        def load(work, k, slot, barrier):
            c = work.coords
            rows = pl.ds(block_row(work, k)[1], bk)
            plgpu.copy_gmem_to_smem(x_gmem.at[rows, pl.ds(c["mi"] * bm, bm)], x_smem.at[slot],
                                    barrier)
            plgpu.copy_gmem_to_smem(dy_gmem.at[rows, pl.ds(col_start + c["ni"] * bn, bn)],
                                    dy_smem.at[slot], barrier)

        def mma(work, k, slot, acc_ref, wg):
            gi = work.coords["gi"]
            x_t = x_smem.at[slot, :, pl.ds(wg * wg_m, wg_m)]  # no other warpgroup reads it
            # rows [first, end) of the block are this step's rows of the group
            unclamped, row = block_row(work, k)
            first = jnp.maximum(bounds_gmem[0, gi], unclamped) - row
            end = jnp.minimum(bounds_gmem[1, gi] - row, bk)

            @pl.when((first > 0) | (end < bk))  # zero the other rows
            def _():
                rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, x_t.shape, 0),
                                         plgpu.Layout.WGMMA)
                x_t[...] = x_t[...] * ((rows >= first) & (rows < end)).astype(dtype)
                plgpu.commit_smem()

            plgpu.wgmma(acc_ref, x_t.T, dy_smem.at[slot])

        def store(work, acc, wg):
            c = work.coords
            _store_rows(acc, o_smem.at[wg], o_gmem.at[c["gi"]], c["mi"] * bm + wg * wg_m,
                        c["ni"] * bn)

        _persistent_matmul(produced, consumed, grid=(g, grid_m * grid_n), schedule=schedule,
                           load=load, mma=mma, store=store, acc_shape=(wg_m, bn),
                           stages=tiles.stages)

    scratch = [
        plgpu.SMEM((tiles.stages, bk, bm), dtype, transforms=_swizzled(dtype, bm)),
        plgpu.SMEM((tiles.stages, bk, bn), dtype, transforms=_swizzled(dtype, bn)),
        plgpu.SMEM((COMPUTE_WGS, *EPILOGUE), dtype),
    ]
    return _launch(body, jax.ShapeDtypeStruct((g, kdim, cols), dtype), scratch, tiles.stages, 2,
                   interpret, bounds, x, dy)
