"""Mosaic GPU lightning-attention kernels in Pallas' GPU interpret mode (CPU) against float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lightning_attention, lightning_gpu

# MiniMax slopes (spec §3.3): layer 0 head 0, layer 0 head 31, layer 78 head 0, layer 78 head 63
SLOPES = np.array([0.9170132, 0.0625006, 0.01161693, 4.948575e-05])


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_segments(rng, b, t, first_row_cuts=None):
    """Rows with boundaries at random places (row 0 at ``first_row_cuts`` when given), one of them
    reusing an earlier id (1, 2, 1)."""
    ids = np.ones((b, t), np.int32)
    for row in range(b):
        cut1, cut2 = np.sort(rng.choice(np.arange(1, t), size=2, replace=False))
        if row == 0 and first_row_cuts is not None:
            cut1, cut2 = first_row_cuts
        ids[row, cut1:] = 2
        ids[row, cut2:] = 1
    return jnp.asarray(ids)


def check_against_float64(rng, b, t, slopes, d, dtype, segments, initial_state, cuts=None):
    """Outputs, final state and gradients of q, k, v, initial_state vs the float64 recurrence
    (``cuts``: segment starts of row 0, see ``random_segments``)."""
    h = len(slopes)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)) * 0.5, dtype) for _ in range(3))
    slopes = jnp.asarray(slopes, jnp.float32)
    s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32) if initial_state else None
    seg = random_segments(rng, b, t, cuts) if segments else None
    w_o = rng.normal(size=(b, t, h, d))
    w_s = rng.normal(size=(b, h, d, d))

    def loss(fn, cast):
        def f(q, k, v, s0):
            o, state = fn(q, k, v, s0)
            return (
                jnp.sum(o.astype(cast) * jnp.asarray(w_o, cast))
                + jnp.sum(state * jnp.asarray(w_s, cast))
            ), (o, state)

        return jax.grad(f, argnums=(0, 1, 2, 3) if initial_state else (0, 1, 2), has_aux=True)

    def kernel(q, k, v, s0):
        return lightning_gpu.lightning_attention_pallas(q, k, v, slopes, s0, seg, interpret=True)

    grads, (o, state) = loss(kernel, jnp.float32)(q, k, v, s0)
    with jax.enable_x64(True):

        def reference(q, k, v, s0):
            return lightning_attention(
                q,
                k,
                v,
                slopes.astype(jnp.float64),
                initial_state=s0,
                segment_ids=seg,
                impl="reference",
            )

        up = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))
        grads_ref, (o_ref, state_ref) = loss(reference, jnp.float64)(up(q), up(k), up(v), up(s0))
        errs = {"o": rel_err(o, o_ref), "final_state": rel_err(state, state_ref)}
        for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_ref):
            errs[name] = rel_err(g, g_ref)
    assert o.dtype == dtype and state.dtype == jnp.float32
    bad = {n: e for n, e in errs.items() if not e < 1e-2}
    assert not bad, f"errors above 1e-2 (bf16 inputs): {errs}"


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
