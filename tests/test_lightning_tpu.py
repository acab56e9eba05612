"""Pallas TPU lightning-attention kernels in Pallas' interpret mode (CPU) against float64."""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_oracle import SLOPES, assert_errors_below, float64_errors
from pallas_kernels import lightning_attention, lightning_tpu

# TPU interpret mode: VMEM/SMEM buffers and block copies simulated, uninitialized memory read as
# NaN, out-of-bounds reads raise, the parallel grid axes visited in a shuffled order.
KERNEL = functools.partial(lightning_tpu.lightning_attention_tpu,
                           interpret=pltpu.InterpretParams(random_seed=0))

# float32 inputs, float32 MXU passes: an output element sums at most C + D = 256 products per chunk
# (intra-chunk keys, then the state's key dim), and the state carries sums of the same size; the
# worst-case rounding bound of such a sum is 256 * 2^-24 = 1.5e-5 of its magnitude and random-sign
# terms grow as sqrt(256) * 2^-24 = 1e-6. A wrong decay or mask is >= 1e-3 off.
F32_TOL = 1e-5


def test_float32_segments_initial_state_grid_steps(rng, monkeypatch):
    """T = 450 (not a multiple of the 128-token chunk: 4 chunks, the last with 66 real tokens), two
    chunks per grid step so the state crosses both an in-kernel chunk loop and grid steps. Row 0
    restarts at token 256 (a grid-step boundary) and at 300; row 1 at random places. D = 64: two
    heads (the fastest and the slowest decay) side by side in each 128-lane block."""
    monkeypatch.setattr(lightning_tpu, "BLOCK_CHUNKS", 2)
    errs = float64_errors(rng, KERNEL, b=2, t=450, slopes=SLOPES[[0, 3]], d=64, dtype=jnp.float32,
                          segments=True, initial_state=True, cuts=(256, 300))
    assert_errors_below(errs, F32_TOL, "float32 rounding of 256-term sums")


def test_float32_head_dim_128_zero_state(rng):
    """D = 128 (one head per block), no segments, no initial state, T = 200 (2 chunks)."""
    errs = float64_errors(rng, KERNEL, b=1, t=200, slopes=SLOPES[[0, 3]], d=128,
                          dtype=jnp.float32, segments=False, initial_state=False)
    assert_errors_below(errs, F32_TOL, "float32 rounding of 256-term sums")


def test_bfloat16_segments_initial_state(rng):
    """bf16 inputs at MiniMax's head dim 128 (the MXU operands, the state cast to bf16 for the
    products): 1e-2."""
    errs = float64_errors(rng, KERNEL, b=1, t=300, slopes=SLOPES[[1, 2]], d=128,
                          dtype=jnp.bfloat16, segments=True, initial_state=True)
    assert_errors_below(errs, 1e-2, "bf16 inputs")


def test_shorter_than_one_chunk(rng):
    """T = 5: one chunk of 5 real tokens and 123 padding tokens that must add no decay."""
    errs = float64_errors(rng, KERNEL, b=1, t=5, slopes=SLOPES[[0, 1]], d=64, dtype=jnp.float32,
                          segments=True, initial_state=True)
    assert_errors_below(errs, F32_TOL, "float32 rounding of 256-term sums")


@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_tpu(d):
    """Forward and backward lower to Mosaic for TPU on any machine (the lowering checks the TPU
    block tiling rules that interpret mode does not): three kernels, forward, dq and dk/dv."""
    b, t, h = 1, 1000, 2
    q = jnp.zeros((b, t, h, d), jnp.bfloat16)
    s0 = jnp.zeros((b, h, d, d), jnp.float32)
    seg = jnp.zeros((b, t), jnp.int32)

    def loss(q, k, v, s0):
        o, state = lightning_tpu.lightning_attention_tpu(q, k, v, jnp.full((h,), 0.1), s0, seg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    text = fn.trace(q, q, q, s0).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 3


def _lowered_auto(platform: str, dtype, d: int, h: int) -> str:
    q = jnp.zeros((1, 200, h, d), dtype)
    fn = jax.jit(lambda q: lightning_attention(q, q, q, jnp.full((h,), 0.1), impl="auto"))
    return fn.trace(q).lower(lowering_platforms=(platform,)).as_text()


def test_auto_takes_the_kernel_where_lowered_for_tpu(rng):
    """impl="auto" lowered for a TPU (no TPU needed to lower) runs the forward kernel; lowered for
    the CPU, or for float16 / an odd head count at D = 64 / D = 32, it takes the chunked form (and
    on the CPU gives exactly its numbers)."""
    kernel = "stablehlo.custom_call @tpu_custom_call"
    assert _lowered_auto("tpu", jnp.bfloat16, 64, 2).count(kernel) == 1
    assert _lowered_auto("tpu", jnp.float32, 128, 1).count(kernel) == 1
    assert kernel not in _lowered_auto("cpu", jnp.bfloat16, 64, 2)
    for dtype, d, h in ((jnp.float16, 64, 2), (jnp.bfloat16, 64, 3), (jnp.bfloat16, 32, 2)):
        assert kernel not in _lowered_auto("tpu", dtype, d, h)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 20, 2, 64)) * 0.5, jnp.float32) for _ in range(3))
    slopes = jnp.asarray(SLOPES[:2], jnp.float32)
    for got, want in zip(lightning_attention(q, k, v, slopes, impl="auto"),
                         lightning_attention(q, k, v, slopes, impl="chunked")):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("shape, dtype, match", [
    ((1, 8, 2, 32), jnp.float32, "head dim must be 64 or 128, got 32"),
    ((1, 8, 3, 64), jnp.float32, "3 heads of dim 64: the heads must be a multiple of 2"),
    ((1, 8, 2, 64), jnp.float16, "must all be bfloat16 or all float32, got float16"),
])
def test_bad_inputs_are_named(shape, dtype, match):
    x = jnp.zeros(shape, dtype)
    with pytest.raises(ValueError, match=match):
        lightning_tpu.lightning_attention_tpu(x, x, x, jnp.zeros(shape[2]), None, None,
                                              interpret=True)
