"""Grouped matmul: the dispatch and the "xla" path against a per-group numpy oracle, and the Mosaic
GPU kernels (forward, d_x, d_w through the custom_vjp) in Pallas' GPU interpret mode on the CPU,
with its race detector on."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from pallas_kernels import grouped_matmul, grouped_matmul_gpu
from pallas_kernels.grouped_matmul import grouped_matmul_pallas, pick_tiles, supports

gmm_module = sys.modules["pallas_kernels.grouped_matmul"]  # the package exports the function

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_sizes(rng, g: int, total: int) -> np.ndarray:
    """g group sizes summing to total, group 1 always empty, others random (some may be empty)."""
    cuts = np.sort(rng.integers(0, total + 1, size=g - 2))
    sizes = np.diff(np.concatenate([[0], cuts, [total]]))
    return np.insert(sizes, 1, 0).astype(np.int32)


def numpy_oracle(x, ws, sizes) -> np.ndarray:
    """Per-group float64 products, weights side by side; rows past sum(sizes) zero."""
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], sum(w.shape[2] for w in ws)))
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        out[rows] = np.concatenate([x[rows] @ np.asarray(w[g], np.float64) for w in ws], axis=1)
        start += size
    return out


def make_inputs(rng, m, k, n, g, total, dtype, num_weights=1):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    ws = tuple(jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
               for _ in range(num_weights))
    return x, ws, random_sizes(rng, g, total)


def ragged_reference(x, ws, sizes):
    outs = [jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32) for w in ws]
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("m,total,num_weights", [(100, 100, 1), (77, 60, 2)])
def test_xla_matches_numpy_oracle(rng, m, total, num_weights):
    x, ws, sizes = make_inputs(rng, m, 16, 24, 5, total, jnp.float32, num_weights)
    out = grouped_matmul(x, ws if num_weights > 1 else ws[0], jnp.asarray(sizes), impl="xla")
    assert out.shape == (m, 24 * num_weights) and out.dtype == jnp.float32
    assert rel_err(out, numpy_oracle(x, ws, sizes)) < 1e-5


def test_dispatch_on_cpu(rng):
    x, ws, sizes = make_inputs(rng, 64, 64, 128, 4, 64, jnp.bfloat16)
    assert not supports(x, ws)  # no Hopper here: "auto" and "pallas" fall back to lax.ragged_dot
    want = grouped_matmul(x, ws[0], jnp.asarray(sizes), impl="xla")
    for impl in ("auto", "pallas"):
        np.testing.assert_array_equal(grouped_matmul(x, ws[0], jnp.asarray(sizes), impl=impl), want)
    with pytest.raises(ValueError, match="auto, pallas, xla"):
        grouped_matmul(x, ws[0], jnp.asarray(sizes), impl="triton")
    with pytest.raises(ValueError):
        grouped_matmul(x[:, :32], ws[0], jnp.asarray(sizes))
    with pytest.raises(ValueError):
        grouped_matmul(x, ws[0], jnp.asarray(sizes[:3]))


def test_pick_tiles():
    assert pick_tiles("fwd", 6144, 9216) == gmm_module.TILE_TABLE["fwd", 6144, 9216]
    assert pick_tiles("fwd", 128, 128).block_n == 128
    assert pick_tiles("fwd", 128, 32) is None  # output not a multiple of any tile's width
    assert pick_tiles("fwd", 96, 128) is None  # contraction not a multiple of block_k
    assert pick_tiles("dw", 100, 128) is None  # weight rows not a multiple of block_m


@pytest.mark.parametrize("dtype,aligned", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_pallas_interpret_value_and_gradients(rng, monkeypatch, dtype, aligned):
    """M = 203 (not a multiple of any tile), an empty group, 180 rows in groups (23 zero rows), two
    weights in one launch; value and gradients of x and both weights vs lax.ragged_dot. Row tiles
    in JAX's schedule, or aligned to 8 rows."""
    candidates = tuple(dataclasses.replace(t, aligned=aligned) for t in gmm_module.CANDIDATES)
    monkeypatch.setattr(gmm_module, "CANDIDATES", candidates)
    monkeypatch.setattr(grouped_matmul_gpu, "_interpret_params",
                        lambda interpret: InterpretGPUParams(detect_races=True))
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    x, ws, sizes = make_inputs(rng, 203, 128, 128, 4, 180, dtype, num_weights=2)
    sizes = jnp.asarray(sizes)
    dy = jnp.asarray(rng.standard_normal((203, 256)), dtype)

    out, vjp = jax.vjp(lambda x, ws: grouped_matmul_pallas(x, ws, sizes, interpret=True), x, ws)
    ref, ref_vjp = jax.vjp(lambda x, ws: ragged_reference(x, ws, sizes),
                           x.astype(jnp.float32), tuple(w.astype(jnp.float32) for w in ws))
    assert out.shape == (203, 256) and out.dtype == dtype
    assert np.all(np.asarray(out[180:]) == 0)
    assert rel_err(out, ref) < TOL[dtype]
    dx, (dw1, dw3) = vjp(dy)
    rdx, (rdw1, rdw3) = ref_vjp(dy.astype(jnp.float32))
    assert dx.dtype == dtype and dw1.dtype == dtype
    assert np.all(np.asarray(dx[180:]) == 0) and np.all(np.asarray(dw1[1]) == 0)
    for got, want in ((dx, rdx), (dw1, rdw1), (dw3, rdw3)):
        assert rel_err(got, want) < TOL[dtype]
    assert not interpret_pallas_call.get_races().races_found


def test_transposed_kernel_group_blocks(rng, monkeypatch):
    """d_w kernel alone: a group starting off the 8-row grid, an empty group, and a last block
    that would run past M (its start pulled back, the rows seen twice masked)."""
    monkeypatch.setattr(grouped_matmul_gpu, "_interpret_params",
                        lambda interpret: InterpretGPUParams(detect_races=True))
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    sizes = np.array([3, 0, 133], np.int32)
    x = jnp.asarray(rng.standard_normal((136, 128)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((136, 192)), jnp.float32)
    tiles = grouped_matmul_gpu.Tiles(128, 64, 64, 2)
    got = grouped_matmul_gpu.transposed_ragged_matmul(x, dy, jnp.asarray(sizes), col_start=64,
                                                      cols=128, tiles=tiles, interpret=True)
    ends = np.cumsum(sizes)
    want = np.stack([np.asarray(x[e - s:e], np.float64).T @ np.asarray(dy[e - s:e, 64:], np.float64)
                     for s, e in zip(sizes, ends)])
    assert np.all(np.asarray(got[1]) == 0)
    assert rel_err(got, want) < TOL[jnp.float32]
    assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("m", [256, 203])
def test_kernels_lower_for_cuda(m):
    """Forward and both gradients compile to Mosaic GPU for Hopper (lowered here on the CPU),
    also when M is not a multiple of the kernels' 8-row tiling (interpret mode does not check it)."""
    x = jax.ShapeDtypeStruct((m, 256), jnp.bfloat16)
    ws = (jax.ShapeDtypeStruct((4, 256, 128), jnp.bfloat16),) * 2
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
    dy = jax.ShapeDtypeStruct((m, 256), jnp.bfloat16)

    def fwd_bwd(x, ws, sizes, dy):
        out, vjp = jax.vjp(lambda x, ws: grouped_matmul_pallas(x, ws, sizes), x, ws)
        return out, vjp(dy)

    text = jax.jit(fwd_bwd).trace(x, ws, sizes, dy).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@mosaic_gpu_v2") == 4  # forward, d_x and one d_w kernel per weight
