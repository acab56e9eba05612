"""Long contexts in serving: blockwise (online-softmax) attention equals the dense form, and the
engine answers a prompt whose cache spans several key blocks exactly like `generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, generate
from minimax_jax import attention
from minimax_jax.attention import grouped_attention
from minimax_jax.serving.engine import Engine, SamplingParams
from minimax_jax.tokenizer import ByteTokenizer


def test_blockwise_attention_equals_dense():
    b, t, s, h, n, d = 2, 5, 45, 4, 2, 8
    dtype, tol = jnp.float32, 2e-6
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, h, d), dtype)
    k = jax.random.normal(kk, (b, s, n, d), dtype)
    v = jax.random.normal(kv, (b, s, n, d), dtype)
    visible = jax.random.bernoulli(km, 0.5, (b, t, s)).at[:, :, 16:32].set(False)  # one empty block
    visible = visible.at[:, 0].set(False).at[:, 0, 40].set(True)  # a row seeing a single key
    attend = jax.jit(grouped_attention, static_argnames="key_block")
    dense = attend(q, k, v, visible, key_block=s)
    block = attend(q, k, v, visible, key_block=16)
    assert block.dtype == dtype and block.shape == dense.shape
    np.testing.assert_allclose(np.asarray(block, np.float32), np.asarray(dense, np.float32), atol=tol, rtol=tol)
    nothing = attend(q, k, v, jnp.zeros_like(visible), key_block=16)
    np.testing.assert_array_equal(nothing, 0)


def test_engine_matches_generate_beyond_one_key_block(monkeypatch):
    monkeypatch.setattr(attention, "KEY_BLOCK", 64)  # the cache below spans several key blocks
    model = MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(1))
    prompt = np.random.default_rng(0).integers(0, 256, 211).tolist()
    engine = Engine(model, ByteTokenizer(), max_batch=2, max_context=216, prefill_chunk=32, prefill_rows=1)
    engine.start()
    try:
        out = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0.0))
    finally:
        engine.stop()
    ref = np.asarray(generate(model, jnp.asarray([prompt]), 5, eos_token_id=ByteTokenizer.eos_token_id))[0]
    assert out.token_ids == ref[:len(out.token_ids)].tolist()
