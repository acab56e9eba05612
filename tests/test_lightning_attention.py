"""lightning_attention / lightning_decode against an independent float64 numpy token recurrence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lightning_attention, lightning_decode

LAYER0_SLOPES = np.array([0.9170132, 0.8409048, 0.0625006, 0.0039063])  # spec §3.3, layer 0
DEEP_SLOPES = np.array([1.161693e-02, 1.0e-4, 7.917721e-04, 4.948575e-05])  # layer 78 and deeper


def oracle(q, k, v, slopes, initial_state=None, segment_ids=None):
    """float64 token recurrence in numpy: S_t = exp(-s) S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    state = np.zeros((b, h, d, d)) if initial_state is None else np.array(initial_state, np.float64)
    decay = np.exp(-np.asarray(slopes, np.float64))
    seg = None if segment_ids is None else np.asarray(segment_ids)
    o = np.zeros((b, t, h, d))
    for i in range(t):
        for bi in range(b):
            if seg is not None and i > 0 and seg[bi, i] != seg[bi, i - 1]:
                state[bi] = 0.0
            for hi in range(h):
                state[bi, hi] = decay[hi] * state[bi, hi] + np.outer(k[bi, i, hi], v[bi, i, hi])
                o[bi, i, hi] = q[bi, i, hi] @ state[bi, hi]
    return o, state


def inputs(rng, b, t, h, d, dtype=np.float32, scale=0.5):
    return [jnp.asarray(rng.normal(size=(b, t, h, d)) * scale, dtype) for _ in range(3)]


def assert_close(actual, expected, rtol, what):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), what
    err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert err < rtol, f"{what}: max error {err:.3e} relative to max |oracle|, tolerance {rtol:.0e}"


def packed_segments(rng, b, t):
    """Segment ids with a repeated id (1, 2, 1, ...) and random boundaries in every row."""
    ids = np.zeros((b, t), np.int32)
    for bi in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
        for n, lo in enumerate(cuts):
            ids[bi, lo:] = [2, 1, 3][n]
        ids[bi, : cuts[0]] = 1
    return jnp.asarray(ids)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("slopes", [LAYER0_SLOPES, DEEP_SLOPES], ids=["layer0", "deep"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("with_segments", [False, True], ids=["one_segment", "segments"])
def test_matches_oracle_fp32(rng, impl, slopes, with_state, with_segments):
    b, t, h, d = 2, 45, 4, 8  # T not a multiple of the block (16)
    q, k, v = inputs(rng, b, t, h, d)
    s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32) if with_state else None
    seg = packed_segments(rng, b, t) if with_segments else None
    o, state = lightning_attention(
        q,
        k,
        v,
        jnp.asarray(slopes, jnp.float32),
        initial_state=s0,
        segment_ids=seg,
        impl=impl,
        block_size=16,
    )
    o_ref, state_ref = oracle(q, k, v, slopes, s0, seg)
    assert o.dtype == jnp.float32 and state.dtype == jnp.float32
    assert_close(o, o_ref, 1e-5, f"{impl} output")
    assert_close(state, state_ref, 1e-5, f"{impl} final state")


@pytest.mark.parametrize("block_size,t", [(64, 200), (128, 300), (256, 256)])
def test_chunked_large_blocks_fp32(rng, block_size, t):
    """Slope 0.917 over blocks of up to 256 tokens: no overflow, exact final state."""
    b, h, d = 1, 4, 16
    q, k, v = inputs(rng, b, t, h, d)
    s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32)
    seg = packed_segments(rng, b, t)
    o, state = lightning_attention(
        q,
        k,
        v,
        jnp.asarray(LAYER0_SLOPES, jnp.float32),
        initial_state=s0,
        segment_ids=seg,
        impl="chunked",
        block_size=block_size,
    )
    o_ref, state_ref = oracle(q, k, v, LAYER0_SLOPES, s0, seg)
    assert_close(o, o_ref, 1e-5, "chunked output")
    assert_close(state, state_ref, 1e-5, "chunked final state")


def test_chunked_bf16_inputs(rng):
    b, t, h, d = 2, 70, 4, 16
    q, k, v = inputs(rng, b, t, h, d, jnp.bfloat16)
    o, state = lightning_attention(
        q, k, v, jnp.asarray(DEEP_SLOPES, jnp.float32), impl="chunked", block_size=32
    )
    o_ref, state_ref = oracle(q, k, v, DEEP_SLOPES)
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert_close(o, o_ref, 1e-2, "bf16 output")
    assert_close(state, state_ref, 1e-5, "bf16-input final state")


def test_reference_float64(rng):
    with jax.enable_x64(True):
        b, t, h, d = 1, 20, 4, 8
        q, k, v = inputs(rng, b, t, h, d, np.float64)
        seg = packed_segments(rng, b, t)
        o, state = lightning_attention(
            q, k, v, jnp.asarray(LAYER0_SLOPES), segment_ids=seg, impl="reference"
        )
        o_ref, state_ref = oracle(q, k, v, LAYER0_SLOPES, None, seg)
        assert o.dtype == jnp.float64 and state.dtype == jnp.float64
        assert_close(o, o_ref, 1e-12, "float64 output")
        assert_close(state, state_ref, 1e-12, "float64 final state")


def test_gradients_chunked_match_reference(rng):
    b, t, h, d = 2, 37, 4, 8
    q, k, v = inputs(rng, b, t, h, d)
    s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32)
    seg = packed_segments(rng, b, t)
    slopes = jnp.asarray(np.concatenate([LAYER0_SLOPES[:2], DEEP_SLOPES[:2]]), jnp.float32)
    w_o = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    w_s = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32)

    def loss(impl):
        def f(q, k, v, s0):
            o, state = lightning_attention(
                q, k, v, slopes, initial_state=s0, segment_ids=seg, impl=impl, block_size=16
            )
            return jnp.sum(o * w_o) + jnp.sum(state * w_s)

        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, s0)

    for name, g, g_ref in zip(
        ("dq", "dk", "dv", "d_initial_state"), loss("chunked"), loss("reference")
    ):
        assert_close(g, np.asarray(g_ref, np.float64), 1e-5, name)


def test_decode_chain_equals_full_sequence(rng):
    b, t, h, d = 3, 12, 4, 8
    q, k, v = inputs(rng, b, t, h, d)
    slopes = jnp.asarray(LAYER0_SLOPES, jnp.float32)
    s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32)
    state = s0
    outs = []
    for i in range(t):
        o_i, state = lightning_decode(q[:, i], k[:, i], v[:, i], slopes, state)
        assert o_i.shape == (b, h, d) and state.dtype == jnp.float32
        outs.append(o_i)
    o_ref, state_ref = oracle(q, k, v, LAYER0_SLOPES, s0)
    assert_close(jnp.stack(outs, axis=1), o_ref, 1e-5, "chained decode output")
    assert_close(state, state_ref, 1e-5, "chained decode state")
    o_full, state_full = lightning_attention(
        q, k, v, slopes, initial_state=s0, impl="chunked", block_size=8
    )
    assert_close(jnp.stack(outs, axis=1), np.asarray(o_full, np.float64), 1e-5, "decode vs chunked")
    assert_close(state, np.asarray(state_full, np.float64), 1e-5, "decode vs chunked state")


def test_bad_impl_and_shapes_raise(rng):
    q, k, v = inputs(rng, 1, 8, 2, 4)
    slopes = jnp.ones((2,), jnp.float32)
    with pytest.raises(ValueError, match="reference"):
        lightning_attention(q, k, v, slopes, impl="triton")
    with pytest.raises(ValueError, match=r"k has shape \(1, 8, 2, 3\), expected \(1, 8, 2, 4\)"):
        lightning_attention(q, k[..., :3], v, slopes)
    with pytest.raises(ValueError, match="slopes has shape"):
        lightning_attention(q, k, v, jnp.ones((3,), jnp.float32))
    with pytest.raises(ValueError, match="initial_state has shape"):
        lightning_attention(q, k, v, slopes, initial_state=jnp.zeros((1, 2, 4, 5), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        lightning_attention(q, k, v, slopes, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="state has shape"):
        lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, jnp.zeros((2, 2, 4, 4), jnp.float32))
    with pytest.raises(ValueError, match="v has shape"):
        lightning_decode(
            q[:, 0], k[:, 0], v[:, 0, :1], slopes, jnp.zeros((1, 2, 4, 4), jnp.float32)
        )
