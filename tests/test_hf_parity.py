"""Parity with transformers' MiniMaxForCausalLM (the oracle) on tiny random weights, loaded
through `load_model` from what HF's own `save_pretrained` writes.

HF's native class rotates the whole head (spec §12), so these configs use rotary_dim = head_dim;
partial RoPE is checked against an independent implementation in test_model.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import FULL, LIN, node_seed
from minimax_jax import load_model
from minimax_jax.generate import generate

LAYER_TYPES = [LIN, LIN, LIN, FULL] * 2
BLOCK = 16


@pytest.fixture(scope="module")
def hf_model_dir(request, tmp_path_factory):
    seed = node_seed(request)
    print(f"torch seed: {seed}")
    torch.manual_seed(seed)
    config = transformers.MiniMaxConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=len(LAYER_TYPES), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, num_local_experts=4,
        num_experts_per_tok=2, layer_types=LAYER_TYPES, block_size=BLOCK,
        rope_parameters={"rope_theta": 1e4, "rope_type": "default"},
        linear_attn_alpha_factor=1.3, linear_attn_beta_factor=1.1,
        full_attn_alpha_factor=1.7, full_attn_beta_factor=0.9,
        mlp_alpha_factor=1.5, mlp_beta_factor=0.8, tie_word_embeddings=False,
        initializer_range=0.05,
    )
    model = transformers.MiniMaxForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm weights make a wrong wiring visible
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:  # sharp softmax attention exposes RoPE errors
                p.mul_(6.0)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def torch_gen(request) -> torch.Generator:
    """A torch generator seeded from the test's node id (printed)."""
    seed = node_seed(request)
    print(f"torch generator seed: {seed}")
    return torch.Generator().manual_seed(seed)


def test_logits_match_hf_fp32(hf_model_dir, torch_gen):
    path, hf = hf_model_dir
    model = load_model(path, dtype="float32")
    assert model.config.rotary_dim == model.config.head_dim
    # 301 = 18 full lightning blocks of 16 + 13
    ids = torch.randint(0, 128, (2, 301), generator=torch_gen)
    with torch.no_grad():
        want = hf(ids).logits.float().numpy()
    got = np.asarray(model(jnp.asarray(ids.numpy(), jnp.int32)))
    diff = np.abs(got - want).max()
    print(f"fp32 logits max |diff| = {diff:.3e} (max |logit| {np.abs(want).max():.2f})")
    assert np.abs(want).max() > 1.0  # the comparison is on logits of a meaningful scale
    assert diff <= 1e-4


def test_greedy_generation_matches_hf(hf_model_dir, torch_gen):
    path, hf = hf_model_dir
    model = load_model(path, dtype="float32")
    prompt = torch.randint(0, 128, (2, 37), generator=torch_gen)
    with torch.no_grad():
        # an explicit all-ones mask: without it HF would take prompt tokens equal to pad_token_id
        # for padding
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                           do_sample=False, min_new_tokens=16, pad_token_id=0, eos_token_id=None)[:, 37:].numpy()
    got = np.asarray(generate(model, jnp.asarray(prompt.numpy(), jnp.int32), 16))
    np.testing.assert_array_equal(got, want)
