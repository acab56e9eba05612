"""Grouped matmul on TPU's path: JAX's megablox kernels (forward, d_x, d_w through the custom_vjp)
in Pallas' TPU interpret mode on the CPU against lax.ragged_dot, and the dispatch that picks them
where the program is lowered for a TPU."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul
from pallas_kernels.grouped_matmul_tpu import grouped_matmul_tpu, row_tile, tiling

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # bf16: the inputs' and output's rounding


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def ragged_reference(x, ws, sizes):
    outs = [jax.lax.ragged_dot(x, w, sizes, precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32) for w in ws]
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("dtype,m,k,n,sizes", [
    # 300 rows (not a multiple of the 384-row tile), groups starting inside tiles, two empty
    # groups, 23 rows past the groups
    (jnp.float32, 300, 64, 96, [37, 0, 150, 0, 90]),
    # contraction 640 (a 512 tile and a part-filled one), an empty first and last group
    (jnp.bfloat16, 200, 640, 128, [0, 130, 70, 0]),
])
def test_megablox_interpret_value_and_gradients(rng, dtype, m, k, n, sizes):
    """Value and gradients of x and both weights (two weights in one call, outputs side by side)
    against lax.ragged_dot in float32; rows past the groups and empty groups' weight gradients
    are exactly zero."""
    g = len(sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    ws = tuple(jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype) for _ in range(2))
    sizes = jnp.asarray(sizes, jnp.int32)
    total = int(sizes.sum())
    dy = jnp.asarray(rng.standard_normal((m, 2 * n)), dtype)

    out, vjp = jax.vjp(lambda x, ws: grouped_matmul_tpu(x, ws, sizes, interpret=True), x, ws)
    ref, ref_vjp = jax.vjp(lambda x, ws: ragged_reference(x, ws, sizes),
                           x.astype(jnp.float32), tuple(w.astype(jnp.float32) for w in ws))
    assert out.shape == (m, 2 * n) and out.dtype == dtype
    assert np.all(np.asarray(out[total:]) == 0)
    assert rel_err(out, ref) < TOL[dtype]
    dx, dws = vjp(dy)
    rdx, rdws = ref_vjp(dy.astype(jnp.float32))
    assert dx.dtype == dtype and all(d.dtype == dtype for d in dws)
    assert np.all(np.asarray(dx[total:]) == 0)
    for e in np.flatnonzero(np.asarray(sizes) == 0):
        assert all(np.all(np.asarray(d[e]) == 0) for d in dws)
    for got, want in ((dx, rdx), *zip(dws, rdws)):
        assert rel_err(got, want) < TOL[dtype]


def test_tiling():
    assert row_tile(300) == 384 and row_tile(5000) == 512
    assert tiling(384, 64, 96) == (384, 64, 96)  # small sides: whole
    assert tiling(16384, 6144, 9216) == (512, 512, 1024)  # MiniMax-Text-01's experts


def _lowered_text(platform: str, dtype) -> str:
    x = jax.ShapeDtypeStruct((256, 128), dtype)
    w = jax.ShapeDtypeStruct((4, 128, 256), dtype)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

    def loss(x, w, sizes):
        return jnp.sum(grouped_matmul(x, (w, w), sizes, impl="auto").astype(jnp.float32) ** 2)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return fn.trace(x, w, sizes).lower(lowering_platforms=(platform,)).as_text()


def test_auto_takes_megablox_when_lowered_for_tpu():
    """"auto" lowered for a TPU (no TPU needed to lower): the forward's two gmm calls, the
    backward's two d_x gmm and two tgmm, all Mosaic; lowered for the CPU, none; float16 (which
    the kernels do not take) stays on lax.ragged_dot."""
    text = _lowered_text("tpu", jnp.bfloat16)
    assert len(re.findall(r"call @gmm\w*\(", text)) == 4
    assert len(re.findall(r"call @tgmm\w*\(", text)) == 2
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 3  # gmm, its transpose, tgmm
    assert "tpu_custom_call" not in _lowered_text("cpu", jnp.bfloat16)
    assert "tpu_custom_call" not in _lowered_text("tpu", jnp.float16)


def test_auto_on_cpu_is_xla(rng):
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 32, 16)), jnp.float32)
    sizes = jnp.asarray([20, 0, 30], jnp.int32)
    np.testing.assert_array_equal(grouped_matmul(x, w, sizes, impl="auto"),
                                  grouped_matmul(x, w, sizes, impl="xla"))
