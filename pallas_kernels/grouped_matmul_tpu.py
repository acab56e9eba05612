"""The grouped matmul on TPU: JAX's Pallas TPU megablox kernels (``gmm``, ``tgmm``).

``grouped_matmul_tpu(x, ws, group_sizes)``: ``out[r] = x[r] @ w[g(r)]`` for each weight of ``ws``
(outputs side by side), differentiable through a ``custom_vjp`` whose backward runs the kernels
too: d_x = ``gmm(dy_j, w_j, transpose_rhs=True)`` summed over the weights, d_w_j =
``tgmm(x^T, dy_j)`` (empty groups get zero). The kernels tile the rows by ``tm``: x gets zero
rows appended up to a multiple of it (past every group) and the output is cut back; rows past
``sum(group_sizes)``, which the kernels leave unwritten, are set to zero. bf16 or float32 operands
(the kernels' dtypes), float32 accumulation.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

# the module (the package's attribute `gmm` is the differentiable function of that name)
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

# Largest (rows, contraction, output columns) tile: 0.5 + 1 + 1 MiB of bf16 operand blocks and a
# 2 MiB float32 accumulator per step, double-buffered well inside a v5p's 16 MiB of scoped VMEM.
MAX_TILE = (512, 512, 1024)
LANE = 128  # a tile narrower than its array must be a multiple of the 128-wide lane dimension
DTYPES = (jnp.bfloat16, jnp.float32)


def tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for M rows (already padded to a multiple of tm), contraction K, N columns: each
    side whole where it fits in ``MAX_TILE``, else that tile."""
    return (min(MAX_TILE[0], m), min(k, MAX_TILE[1]), min(n, MAX_TILE[2]))


def row_tile(m: int) -> int:
    """The row tile for M rows: the largest, or M rounded up to a multiple of 128 if smaller."""
    return min(MAX_TILE[0], -(-m // LANE) * LANE)


def supports(x: jax.Array, ws: tuple[jax.Array, ...]) -> bool:
    """Whether the kernels take this call: x and every weight in one dtype of ``DTYPES``."""
    return x.dtype in DTYPES and all(w.dtype == x.dtype for w in ws)


def _filled(rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows ``[M, N]`` with those past ``sum(group_sizes)`` (which no kernel writes) set to 0."""
    inside = jnp.arange(rows.shape[0], dtype=jnp.int32) < jnp.sum(group_sizes)
    return jnp.where(inside[:, None], rows, jnp.zeros((), rows.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, ws, group_sizes, interpret):
    m, k = x.shape
    outs = [megablox.gmm(x, w, group_sizes, x.dtype, tiling(m, k, w.shape[2]), interpret=interpret)
            for w in ws]
    return _filled(jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], group_sizes)


def _gmm_fwd(x, ws, group_sizes, interpret):
    return _gmm(x, ws, group_sizes, interpret), (x, ws, group_sizes)


def _gmm_bwd(interpret, residuals, dy):
    x, ws, group_sizes = residuals
    m, k = x.shape
    n = ws[0].shape[2]
    dy = dy.astype(x.dtype)
    parts = [dy[:, j * n:(j + 1) * n] for j in range(len(ws))]
    dx = sum(megablox.gmm(p, w, group_sizes, jnp.float32, tiling(m, n, k), transpose_rhs=True,
                          interpret=interpret)
             for p, w in zip(parts, ws))
    dx = _filled(dx, group_sizes)
    x_t = x.swapaxes(0, 1)
    dws = tuple(megablox.tgmm(x_t, p, group_sizes, w.dtype, tiling(m, k, n), interpret=interpret)
                for p, w in zip(parts, ws))
    return dx.astype(x.dtype), dws, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul_tpu(x: jax.Array, ws: tuple[jax.Array, ...], group_sizes: jax.Array, *,
                       interpret: bool = False) -> jax.Array:
    """The megablox path of ``grouped_matmul`` (differentiable in x and ws).

    x ``[M, K]``, ws a tuple of ``[G, K, N]`` weights (dtype of x, bf16 or float32; ``supports``),
    group_sizes int ``[G]`` (sum at most M). Returns ``[M, N * len(ws)]`` in x's dtype, rows past
    ``sum(group_sizes)`` zero. ``interpret`` runs the kernels in Pallas' interpreter (any backend).
    """
    if not supports(x, ws):
        raise ValueError(f"the megablox kernels take x and weights in one of bf16 / float32, got "
                         f"x {x.dtype} and weights {[w.dtype for w in ws]}")
    m = x.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    padded = jnp.pad(x, ((0, -m % row_tile(m)), (0, 0)))
    return _gmm(padded, tuple(ws), group_sizes, interpret)[:m]
