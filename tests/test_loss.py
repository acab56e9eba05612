"""Chunked cross-entropy: values and gradients against a float64 oracle, float32 accumulation of
d_lm_head, linear memory of the compiled gradient, masking, shape errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from minimax_jax.loss import _block_layout, chunked_cross_entropy


def oracle(h: np.ndarray, lm_head: np.ndarray, targets: np.ndarray, weights: np.ndarray):
    """Dense float64 numpy (loss, d_h, d_lm_head, d_weights) of sum(w * -log softmax(h @ lm_head)[t])."""
    h, lm_head, w = (np.asarray(x, np.float64) for x in (h, lm_head, weights))
    logits = np.einsum("btd,dv->btv", h, lm_head)
    m = logits.max(-1, keepdims=True)
    e = np.exp(logits - m)
    lse = m[..., 0] + np.log(e.sum(-1))
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    onehot = np.eye(lm_head.shape[1])[targets]
    d_logits = w[..., None] * (e / e.sum(-1, keepdims=True) - onehot)
    return (np.sum(w * nll), np.einsum("btv,dv->btd", d_logits, lm_head),
            np.einsum("btd,btv->dv", h, d_logits), nll)


def inputs(rng: np.random.Generator, b: int, t: int, d: int, v: int, dtype=np.float32):
    """h `[b, t, d]`, lm_head `[d, v]` in dtype; int32 targets and float32 weights `[b, t]`, ~30% weights 0."""
    h = rng.standard_normal((b, t, d)).astype(dtype)
    lm_head = (0.5 * rng.standard_normal((d, v))).astype(dtype)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, (b, t)).astype(np.float32)
    weights[rng.random((b, t)) < 0.3] = 0.0
    return h, lm_head, targets, weights


def grads(h, lm_head, targets, weights, block_size):
    """(loss, (d_h, d_lm_head, d_weights)) of chunked_cross_entropy under jit."""
    f = lambda h, w_out, wt: chunked_cross_entropy(h, w_out, jnp.asarray(targets), wt, block_size=block_size)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, lm_head, weights)


def max_rel(x, ref) -> float:
    """max |x - ref| / max |ref|."""
    return float(np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("block_size", [8, 74, 4096])
def test_float32_matches_float64_oracle(block_size):
    # B*T = 74: block 8 pads to 80 (10 blocks), 74 is one exact block, 4096 > N falls back to one block of 74.
    h, lm_head, targets, weights = inputs(np.random.default_rng(0), 2, 37, 16, 50)
    loss, (d_h, d_lm_head, d_w) = grads(h, lm_head, targets, weights, block_size)
    ref_loss, ref_dh, ref_dw, ref_nll = oracle(h, lm_head, targets, weights)
    # float32 rounding: a D=16 dot product, a V=50 log-sum-exp and an N=74 sum each carry errors of a
    # few to a few tens of float32 ulps (2^-24 ~ 6e-8) relative to their magnitude, far below 1e-5.
    assert loss.dtype == jnp.float32 and d_h.dtype == jnp.float32 and d_lm_head.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert max_rel(d_h, ref_dh) < 1e-5
    assert max_rel(d_lm_head, ref_dw) < 1e-5
    # d_weights is the per-token NLL on counted tokens, 0 on tokens of weight 0.
    np.testing.assert_allclose(d_w, np.where(weights != 0, ref_nll, 0.0), rtol=1e-5, atol=1e-5)
    # Tokens of weight 0 get no gradient.
    assert not np.any(np.asarray(d_h)[weights == 0])


def test_block_layout():
    assert _block_layout(74, 8) == (8, 10)
    assert _block_layout(80, 8) == (8, 10)
    assert _block_layout(74, 4096) == (74, 1)
    assert _block_layout(1, 1024) == (1, 1)


def test_bfloat16_accumulates_lm_head_gradient_in_float32():
    # 1024 blocks of one token: d_lm_head is a sum of 1024 per-block terms.
    h, lm_head, targets, _ = inputs(np.random.default_rng(1), 4, 256, 32, 64, ml_dtypes.bfloat16)
    weights = np.ones(targets.shape, np.float32)
    loss, (d_h, d_lm_head, _) = grads(h, lm_head, targets, weights, 1)
    ref_loss, ref_dh, ref_dw, _ = oracle(h, lm_head, targets, weights)
    assert loss.dtype == jnp.float32 and d_h.dtype == jnp.bfloat16 and d_lm_head.dtype == jnp.bfloat16
    # The logits of bfloat16 inputs are exact products summed in float32: the loss is float32-accurate.
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    # Gradients: d_logits rounded to bfloat16 (2^-9 relative per term) plus the final rounding to
    # bfloat16 (2^-9 of the result) stay within 2^-7 of max |ref|. Accumulating the 1024 blocks in a
    # bfloat16 carry instead rounds at every step and gives errors of several percent.
    assert max_rel(d_h, ref_dh) < 2**-7
    assert max_rel(d_lm_head, ref_dw) < 2**-7


def test_masked_targets_are_ignored_and_counted_bad_targets_give_nan():
    h, lm_head, targets, weights = inputs(np.random.default_rng(2), 2, 9, 8, 20)
    ref_loss = oracle(h, lm_head, targets, weights)[0]
    masked = np.where(weights == 0, -100, targets).astype(np.int32)
    loss, (d_h, d_lm_head, _) = grads(h, lm_head, masked, weights, 4)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert np.all(np.isfinite(d_h)) and np.all(np.isfinite(d_lm_head))
    counted = masked.copy()
    counted[tuple(np.argwhere(weights != 0)[0])] = 20  # V = 20: out of range on a counted token
    assert np.isnan(chunked_cross_entropy(h, lm_head, counted, weights, block_size=4))


def test_gradient_memory_is_linear_in_tokens():
    b, t, d, v = 1, 32768, 64, 4096
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))
    full_logits = t * v * 4  # 512 MiB of float32 logits

    def temp_bytes(loss) -> int:
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def dense(h, lm_head, targets, weights):
        logits = jnp.einsum("btd,dv->btv", h, lm_head, preferred_element_type=jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(weights * logp)

    chunked = temp_bytes(lambda *a: chunked_cross_entropy(*a, block_size=512))
    # One block's float32 logits are 512 * 4096 * 4 = 8 MiB; the backward holds a few such buffers,
    # d_h [T, D] (8 MiB) and the float32 d_lm_head carry (1 MiB).
    assert chunked < 128 * 2**20, chunked
    # The dense gradient keeps at least one full [T, V] float32 buffer.
    assert temp_bytes(dense) >= full_logits


@pytest.mark.parametrize("shapes, match", [
    (((2, 5), (4, 7), (2, 5), (2, 5)), r"h must be \[B, T, D\]; got h \(2, 5\)"),
    (((2, 5, 4), (3, 7), (2, 5), (2, 5)), r"h \(2, 5, 4\), lm_head \(3, 7\)"),
    (((2, 5, 4), (4,), (2, 5), (2, 5)), r"h \(2, 5, 4\), lm_head \(4,\)"),
    (((2, 5, 4), (4, 7), (2, 6), (2, 5)), r"h \(2, 5, 4\), targets \(2, 6\)"),
    (((2, 5, 4), (4, 7), (2, 5), (5, 2)), r"h \(2, 5, 4\), weights \(5, 2\)"),
])
def test_bad_shapes_raise(shapes, match):
    hs, ws, ts, wts = shapes
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(jnp.zeros(hs), jnp.zeros(ws), jnp.zeros(ts, jnp.int32), jnp.zeros(wts))


def test_bad_dtypes_and_block_size_raise():
    h, w, t, wt = jnp.zeros((1, 3, 4)), jnp.zeros((4, 7)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3))
    with pytest.raises(ValueError, match="h float32, lm_head bfloat16"):
        chunked_cross_entropy(h, w.astype(jnp.bfloat16), t, wt)
    with pytest.raises(ValueError, match="targets must be integer"):
        chunked_cross_entropy(h, w, t.astype(jnp.float32), wt)
    with pytest.raises(ValueError, match="block_size"):
        chunked_cross_entropy(h, w, t, wt, block_size=0)
