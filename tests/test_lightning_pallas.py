"""Mosaic GPU lightning-attention kernels in Pallas' GPU interpret mode (CPU) against float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_oracle import SLOPES, assert_errors_below, float64_errors, rel_err
from pallas_kernels import lightning_attention, lightning_gpu


def check_against_float64(rng, **shape):
    """The kernels in interpret mode vs the float64 recurrence at 1e-2 (bf16/f16 inputs)."""
    kernel = functools.partial(lightning_gpu.lightning_attention_pallas, interpret=True)
    assert_errors_below(float64_errors(rng, kernel, **shape), 1e-2, "bf16/f16 inputs")


@pytest.mark.parametrize("d", [64, 128])
def test_segments_initial_state_pieces(rng, monkeypatch, d):
    """T = 520 (not a multiple of the 64-token chunk): three pieces of three chunks per row. Row 0
    restarts at the first token of piece 1 (a piece and chunk boundary) and inside piece 1, a
    segment that runs on through piece 2; row 1 at random places. D = 128 runs two compute
    warpgroups (one per 64 value columns), D = 64 one."""
    monkeypatch.setattr(lightning_gpu, "TARGET_PROGRAMS", 12)
    assert lightning_gpu.num_pieces(2, 3, 9, lightning_gpu.TARGET_PROGRAMS) == 3
    check_against_float64(
        rng,
        b=2,
        t=520,
        slopes=SLOPES[[0, 1, 2]],
        d=d,
        dtype=jnp.bfloat16,
        segments=True,
        initial_state=True,
        cuts=(192, 300),
    )


def test_head_dim_128_one_piece(rng, monkeypatch):
    """Two compute warpgroups (D = 128), one piece per row, no segments, zero initial state."""
    monkeypatch.setattr(lightning_gpu, "TARGET_PROGRAMS", 1)
    check_against_float64(
        rng,
        b=1,
        t=150,
        slopes=SLOPES[[0, 2]],
        d=128,
        dtype=jnp.float16,
        segments=False,
        initial_state=False,
    )


@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_cuda(monkeypatch, d):
    """Forward and backward kernels lower for CUDA on any machine (Mosaic GPU checks layouts and the
    227 KB shared-memory budget while lowering), with pipelines at full depth (four chunks per
    piece)."""
    monkeypatch.setattr(lightning_gpu, "TARGET_PROGRAMS", 6)
    configs = []
    scan_call = lightning_gpu._scan_call

    def recording(*args):
        configs.append(args[-1])
        return scan_call(*args)

    monkeypatch.setattr(lightning_gpu, "_scan_call", recording)
    b, t, h = 2, 12 * lightning_gpu.CHUNK, 1
    q = jnp.zeros((b, t, h, d), jnp.bfloat16)
    s0 = jnp.zeros((b, h, d, d), jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2]], t // 2, axis=1).repeat(b, axis=0), jnp.int32)

    def loss(q, k, v, s0):
        o, state = lightning_gpu.lightning_attention_pallas(
            q, k, v, jnp.full((h,), 0.1, jnp.float32), s0, seg
        )
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    fn.trace(q, q, q, s0).lower(lowering_platforms=("cuda",))
    kinds = sorted((c.reverse, c.state_only) for c in configs)
    # forward: state-only + full; dq: full (forward's states); dv: state-only + full; dk: full
    # (dv's states transposed)
    assert kinds == [(False, False), (False, False), (False, True), (True, False), (True, False),
                     (True, True)]


@pytest.mark.parametrize("reverse", [False, True])
def test_segment_limits(rng, reverse):
    c = lightning_gpu.CHUNK
    b, t = 2, 3 * c
    resets = rng.random((b, t + 1)) < 0.05
    resets[:, 0] = resets[:, t] = False
    lim = np.asarray(lightning_gpu.segment_limits(jnp.asarray(resets), reverse))
    none = lightning_gpu.no_reset(reverse)
    for row in range(b):
        for pos in range(t):
            start = pos - pos % c
            if reverse:
                after = [u for u in range(pos % c + 1, c + 1) if resets[row, start + u]]
                expected = after[0] if after else none
            else:
                before = [u for u in range(0, pos % c + 1) if resets[row, start + u]]
                expected = before[-1] if before else none
            assert lim[row, pos] == expected, (row, pos)


def test_pallas_falls_back_for_unsupported_calls(rng):
    """float32 inputs (and any call on a machine without Hopper) take the chunked path, exactly."""
    q, k, v = (jnp.asarray(rng.normal(size=(1, 70, 4, 64)), jnp.float32) for _ in range(3))
    slopes = jnp.asarray(SLOPES, jnp.float32)
    assert not lightning_gpu.supports(q, k, v)
    o, state = lightning_attention(q, k, v, slopes, impl="pallas")
    o_c, state_c = lightning_attention(q, k, v, slopes, impl="chunked")
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_c))
    np.testing.assert_array_equal(np.asarray(state), np.asarray(state_c))


def test_combine_pieces_matches_sequential_recurrence(rng):
    """The matrix form of the piece combination equals S_{p+1} = [no cut] lam^n_p S_p + delta_p."""
    b, p, h, d = 2, 5, 3, 4
    deltas = rng.normal(size=(b, p, h, d, d))
    n_real = np.array([7, 7, 7, 7, 3])
    cut = rng.random((b, p)) < 0.3
    slopes = np.array([0.9, 0.05, 1e-4])
    s0 = rng.normal(size=(b, h, d, d))
    got = lightning_gpu.combine_pieces(
        jnp.asarray(deltas, jnp.float32),
        jnp.asarray(n_real),
        jnp.asarray(cut),
        jnp.asarray(slopes, jnp.float32),
        jnp.asarray(s0, jnp.float32),
    )
    expected = np.zeros_like(deltas)
    for row in range(b):
        state = s0[row]
        for piece in range(p):
            expected[row, piece] = state
            keep = 0.0 if cut[row, piece] else 1.0
            state = (
                keep * np.exp(-slopes * n_real[piece])[:, None, None] * state + deltas[row, piece]
            )
    assert rel_err(got, expected) < 1e-6


def test_shorter_than_one_chunk(rng):
    """T = 5: one partly padded chunk, one pipeline stage."""
    check_against_float64(
        rng,
        b=1,
        t=5,
        slopes=SLOPES[[1]],
        d=64,
        dtype=jnp.bfloat16,
        segments=True,
        initial_state=True,
    )
