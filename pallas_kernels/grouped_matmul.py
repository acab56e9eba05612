"""Grouped (ragged) matmul for mixture-of-experts layers.

``grouped_matmul(x, w, group_sizes, *, impl="auto")``: rows of x sorted by group, row r of group g
multiplied by ``w[g]``. Implementations: "xla" (``jax.lax.ragged_dot``, everywhere; the oracle),
"pallas" (Mosaic GPU kernels for Hopper with a ``custom_vjp``: forward, d_x and d_w kernels; calls
the kernels do not support fall back to "xla") and "auto" ("pallas" on the device kinds in
``VERIFIED_DEVICES``, else "xla"). On TPU, "auto" and "pallas" run JAX's Pallas TPU megablox
kernels (``pallas_kernels.grouped_matmul_tpu``, bf16 / float32): the choice is made where the
program is lowered (``lax.platform_dependent``), so a program compiled ahead of time for a TPU
on a machine without one takes them too; under a mesh only where every axis not yet manual has
size 1 (a Mosaic kernel cannot be partitioned by the compiler: ``device.run_manual``).

Quantized weights (``QuantizedWeights``: int8 / fp8 values with a float32 scale per group and
output column) always take the XLA form, whatever ``impl`` says: ``ragged_dot`` on the values
upcast to x's dtype with float32 accumulation, each output row then scaled by its group's scale.
The Mosaic GPU kernels stage both operands through shared memory in x's 16-bit dtype for wgmma
and have no form that converts the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul_tpu
from pallas_kernels.device import can_run_mosaic, run_manual
from pallas_kernels.grouped_matmul_gpu import Tiles, ragged_matmul, transposed_ragged_matmul

IMPLS = ("auto", "pallas", "xla")

# Tiles per (kernel, contraction size, output width per weight): benchmarks/moe.py's sweep at
# E = 32, M = 16384 on an H200 and an H100 (benchmarks/RESULTS.md): bands of 4 column tiles for
# the row kernels and 2 for d_w are fastest or within 4% of it on both. Other shapes take the first
# candidate that divides them.
_ROWS = Tiles(128, 256, 64, 4, 4, True)  # row tiles aligned to 8 rows
_DW = Tiles(128, 256, 64, 4, 2)
TILE_TABLE: dict[tuple[str, int, int], Tiles] = {
    ("fwd", 6144, 9216): _ROWS, ("dx", 9216, 6144): _ROWS, ("dw", 6144, 9216): _DW,
    ("fwd", 9216, 6144): _ROWS, ("dx", 6144, 9216): _ROWS, ("dw", 9216, 6144): _DW,
}
CANDIDATES = (Tiles(128, 256, 64, 4, 1), Tiles(128, 128, 64, 4, 1), Tiles(128, 64, 64, 4, 1))
ROW_MULTIPLE = 8  # the kernels' row count must be a multiple of their 8-row TMA tiling
MIN_ROWS = 128  # the tallest tile (block_m, or block_k of the d_w kernel) in the table
# Device kinds on which the GPU check of benchmarks/moe.py passed: "auto" takes the kernels only
# there, "pallas" on any Hopper GPU.
VERIFIED_DEVICES: tuple[str, ...] = ("NVIDIA H200", "NVIDIA H100 80GB HBM3")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeights:
    """Grouped weights ``w[g] = values[g] * scale[g]``: values ``[G, K, N]`` (int8 or
    float8_e4m3fn), scale float32 ``[G, N]`` (per group and output column)."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The weights' shape ``[G, K, N]`` (that of ``values``)."""
        return self.values.shape


def pick_tiles(kernel: str, k: int, n: int) -> Tiles | None:
    """Tiles of ``kernel`` ("fwd", "dx", "dw") for contraction ``k`` and output width ``n``
    (for "dw": k is the weights' input dim, n their output dim), or None if none fits."""
    if (kernel, k, n) in TILE_TABLE:
        return TILE_TABLE[kernel, k, n]
    return next((t for t in CANDIDATES
                 if k % (t.block_m if kernel == "dw" else t.block_k) == 0 and n % t.block_n == 0),
                None)


def _kernel_tiles(ws: tuple[jax.Array, ...]) -> tuple[Tiles, Tiles, Tiles] | None:
    """(fwd, dx, dw) tiles for weights ws ``([G, K, N_j], ...)``; None if a kernel has none."""
    k, n = ws[0].shape[1], ws[0].shape[2]
    tiles = (pick_tiles("fwd", k, n), pick_tiles("dx", n, k), pick_tiles("dw", k, n))
    return None if None in tiles else tiles


def supports(x: jax.Array, ws: tuple[jax.Array, ...]) -> bool:
    """Whether the kernels handle this call on the default device: Hopper, x and every weight
    bf16 (or all f16), at least ``MIN_ROWS`` rows (no tile taller than the array), sizes the tiles
    divide."""
    if x.dtype not in (jnp.bfloat16, jnp.float16) or any(w.dtype != x.dtype for w in ws):
        return False
    if x.shape[0] < MIN_ROWS or _kernel_tiles(ws) is None:
        return False
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") in ("9.0", "9.0a")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas(x, ws, group_sizes, interpret):
    fwd_tiles = _kernel_tiles(ws)[0]
    return ragged_matmul(x, ws, group_sizes, transpose_rhs=False, tiles=fwd_tiles,
                         interpret=interpret)


def _pallas_fwd(x, ws, group_sizes, interpret):
    return _pallas(x, ws, group_sizes, interpret), (x, ws, group_sizes)


def _pallas_bwd(interpret, residuals, dy):
    x, ws, group_sizes = residuals
    _, dx_tiles, dw_tiles = _kernel_tiles(ws)
    dy = dy.astype(x.dtype)
    dx = ragged_matmul(dy, ws, group_sizes, transpose_rhs=True, tiles=dx_tiles,
                       interpret=interpret)
    n = ws[0].shape[2]
    dws = tuple(
        transposed_ragged_matmul(x, dy, group_sizes, col_start=j * n, cols=n, tiles=dw_tiles,
                                 interpret=interpret).astype(w.dtype)
        for j, w in enumerate(ws))
    return dx, dws, None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def grouped_matmul_pallas(x: jax.Array, ws: tuple[jax.Array, ...], group_sizes: jax.Array,
                          interpret: bool = False) -> jax.Array:
    """Kernel path of ``grouped_matmul`` (differentiable; ``supports`` says which calls; in
    ``interpret`` mode any float dtype on the CPU). Same arguments, weights as a tuple. The
    kernels' row tiling needs M a multiple of 8: other M get zero rows appended (past every
    group) and cut off again."""
    if _kernel_tiles(ws) is None:
        raise ValueError(f"no tiles fit weights {[w.shape for w in ws]}")
    m = x.shape[0]
    x = jnp.pad(x, ((0, -m % ROW_MULTIPLE), (0, 0)))
    return _pallas(x, ws, group_sizes.astype(jnp.int32), interpret)[:m]


def row_groups(group_sizes: jax.Array, m: int) -> jax.Array:
    """int32 ``[m]``: the group of each row (rows past ``sum(group_sizes)`` get the last group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")
    return jnp.minimum(rows, group_sizes.shape[0] - 1).astype(jnp.int32)


def _xla(x: jax.Array, ws: tuple[jax.Array | QuantizedWeights, ...], group_sizes: jax.Array) -> jax.Array:
    if isinstance(ws[0], QuantizedWeights):
        groups = row_groups(group_sizes, x.shape[0])
        outs = [(jax.lax.ragged_dot(x, w.values.astype(x.dtype), group_sizes,
                                    preferred_element_type=jnp.float32) * w.scale[groups]).astype(x.dtype)
                for w in ws]
    else:
        outs = [jax.lax.ragged_dot(x, w, group_sizes) for w in ws]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


Weights = jax.Array | QuantizedWeights


def grouped_matmul(x: jax.Array, w: Weights | Sequence[Weights], group_sizes: jax.Array, *,
                   impl: str = "auto") -> jax.Array:
    """Rows of x grouped by expert times that expert's weights.

    Args:
      x: ``[M, K]``; group g owns rows ``[sum(group_sizes[:g]), sum(group_sizes[:g + 1]))``.
      w: ``[G, K, N]``, or a sequence of such weights of equal shape (e.g. w1 and w3), computed
        in one launch with their outputs side by side. Either all arrays or all
        ``QuantizedWeights`` (which take the XLA form, see the module docstring).
      group_sizes: int ``[G]``, non-negative, sum at most M (empty groups allowed).
      impl: one of ``IMPLS``.

    Returns:
      ``[M, N * len(w)]`` in x's dtype (float32 accumulation); rows past ``sum(group_sizes)`` are
      zero.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    ws = tuple(w) if isinstance(w, Sequence) else (w,)
    quantized = [isinstance(v, QuantizedWeights) for v in ws]
    if any(quantized) and not all(quantized):
        raise ValueError("weights must be all arrays or all QuantizedWeights")
    if x.ndim != 2 or any(len(v.shape) != 3 or v.shape != ws[0].shape for v in ws):
        raise ValueError(f"x {x.shape} must be [M, K] and w {[v.shape for v in ws]} equal [G, K, N]")
    if ws[0].shape[1] != x.shape[1] or group_sizes.shape != (ws[0].shape[0],):
        raise ValueError(f"x {x.shape}, w {ws[0].shape}, group_sizes {group_sizes.shape} disagree")
    if any(quantized):
        g, _, n = ws[0].shape
        if any(v.scale.shape != (g, n) for v in ws):
            raise ValueError(f"scales {[v.scale.shape for v in ws]} must be [G, N] = {[g, n]}")
        return _xla(x, ws, group_sizes)
    if impl == "xla":
        return _xla(x, ws, group_sizes)
    verified = impl == "pallas" or jax.devices()[0].device_kind in VERIFIED_DEVICES
    if verified and supports(x, ws):
        return grouped_matmul_pallas(x, ws, group_sizes)
    if grouped_matmul_tpu.supports(x, ws) and can_run_mosaic():
        tpu = lambda *args: run_manual(grouped_matmul_tpu.grouped_matmul_tpu, args)  # noqa: E731
        return jax.lax.platform_dependent(x, ws, group_sizes, default=_xla, tpu=tpu)
    return _xla(x, ws, group_sizes)
