"""Softmax attention on TPU's path: JAX's splash attention kernels (forward and backward) in Pallas'
TPU interpret mode on the CPU against the all-scores reference, and the dispatch that takes them
where the program is lowered for a TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import softmax_attention
from pallas_kernels.reference import softmax_attention_reference
from pallas_kernels.softmax_tpu import block_length, splash_attention, supports


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_splash_interpret_value_and_gradients(rng):
    """GQA (4 query heads over 2 KV heads), causal, three packed documents whose boundaries fall
    inside the 256-token block; output and dq, dk, dv in float32 against the reference (both
    accumulate in float32 in different orders: 1e-5 relative)."""
    b, t, h, n, d = 1, 256, 4, 2, 64
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [70, 101, 85], axis=1), jnp.int32)
    dy = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)

    out, vjp = jax.vjp(lambda q, k, v: splash_attention(q, k, v, seg, seg, interpret=True), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: softmax_attention_reference(
        q, k, v, seg, seg, jnp.zeros((b,), jnp.int32)), q, k, v)
    assert out.shape == (b, t, h, d) and out.dtype == jnp.float32
    assert rel_err(out, ref) < 1e-5
    for got, want in zip(vjp(dy), ref_vjp(dy)):
        assert rel_err(got, want) < 1e-5


def test_splash_interpret_without_segments_bf16(rng):
    """No segment ids, two rows, bf16 in and out (1e-2: bf16 inputs and output)."""
    b, t, h, n, d = 2, 128, 2, 1, 128
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.bfloat16) for _ in range(2))
    out = splash_attention(q, k, v, None, None, interpret=True)
    ref = softmax_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), None, None,
                                      jnp.zeros((b,), jnp.int32))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_supports():
    x = lambda t, heads, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((1, t, heads, 128), dtype)  # noqa: E731
    assert supports(x(1024, 8), x(1024, 2), x(1024, 2), False)
    assert block_length(1024) == 512 and block_length(384) == 128
    assert not supports(x(1000, 8), x(1000, 2), x(1000, 2), False)  # T not a multiple of 128
    assert not supports(x(1024, 8), x(1024, 2), x(1024, 2), True)  # a query offset
    assert not supports(x(1024, 8), x(2048, 2), x(2048, 2), False)  # S != T
    assert not supports(*(x(1024, 2, jnp.float16),) * 3, False)  # a dtype splash does not take


def _lowered(platform: str, same_ids: bool, t: int = 256) -> str:
    q = jax.ShapeDtypeStruct((2, t, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, t, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, t), jnp.int32)

    def loss(q, k, v, qs, ks):
        ks = qs if same_ids else ks
        o = softmax_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, impl="auto")
        return jnp.sum(o.astype(jnp.float32) ** 2)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn.trace(q, kv, kv, seg, seg).lower(lowering_platforms=(platform,)).as_text()


def test_auto_takes_splash_when_lowered_for_tpu():
    """"auto" lowered for a TPU (no TPU needed to lower): splash's forward, dq and dkv kernels;
    with q and kv ids that may differ, a conditional that checks them and also holds the XLA form
    (a query seeing no key gets 0 there); lowered for the CPU, no kernel."""
    same = _lowered("tpu", same_ids=True)
    assert same.count("stablehlo.custom_call @tpu_custom_call") == 3
    differ = _lowered("tpu", same_ids=False)
    assert "stablehlo.custom_call @tpu_custom_call" in differ
    assert differ.count("stablehlo.case") > same.count("stablehlo.case")
    assert "tpu_custom_call" not in _lowered("cpu", same_ids=True)
    assert "tpu_custom_call" not in _lowered("tpu", same_ids=True, t=200)  # T not a multiple of 128
