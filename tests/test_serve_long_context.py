"""Long contexts in serving: the engine answers a prompt whose cache spans several key blocks
exactly like `generate`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, generate
from pallas_kernels import softmax
from minimax_jax.serving.engine import Engine, SamplingParams
from minimax_jax.tokenizer import ByteTokenizer


def test_engine_matches_generate_beyond_one_key_block(monkeypatch):
    monkeypatch.setattr(softmax, "BLOCK_K", 64)  # the cache spans several key blocks
    monkeypatch.setattr(softmax, "BLOCK_Q", 16)  # and the prefill chunk two query blocks
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
