"""The MoE layer against a per-token dense oracle (values and gradients), the gather permutation's
gradient, and the whole layer through the grouped-matmul kernels in Pallas' GPU interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config
from flax import nnx

from minimax_jax import lora, moe
from minimax_jax.moe import SparseMoE, gather_rows, route
from pallas_kernels.grouped_matmul import grouped_matmul_pallas

EPS32 = float(np.finfo(np.float32).eps)


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def dense_moe(x, gate, w1, w3, w2, top_k):
    """Every expert on every token, mixed by the renormalised top-k weights: `[N, D]`."""
    _, weights, experts = route(x @ gate, top_k)
    mix = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, gate.shape[1]))
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w1)) * jnp.einsum("nd,edf->enf", x, w3)
    return jnp.einsum("ne,enf,efd->nd", mix, h, w2)


def params(layer: SparseMoE):
    return {name: getattr(layer, name)[...] for name in ("gate", "w1", "w3", "w2")}


def test_forward_matches_numpy_oracle(rng):
    cfg = tiny_config()
    layer = SparseMoE(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = rng.standard_normal((2, 37, cfg.hidden_size)).astype(np.float32)
    out, stats = layer(jnp.asarray(x))
    p = {k: np.asarray(v, np.float64) for k, v in params(layer).items()}
    xf = x.reshape(-1, cfg.hidden_size).astype(np.float64)
    logits = xf @ p["gate"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros_like(xf)
    for n in range(xf.shape[0]):
        top = np.argsort(-probs[n])[:cfg.num_experts_per_tok]
        for e in top:
            h = xf[n] @ p["w1"][e]
            y = ((h / (1 + np.exp(-h))) * (xf[n] @ p["w3"][e])) @ p["w2"][e]
            want[n] += probs[n, e] / probs[n, top].sum() * y
    assert out.shape == x.shape and stats["expert_load"].shape == (cfg.num_local_experts,)
    assert rel_err(out.reshape(-1, cfg.hidden_size), want) < 1e-5


def test_gradients_match_dense(rng):
    cfg = tiny_config()
    layer = SparseMoE(cfg.replace(moe_impl="xla"), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((2, 29, cfg.hidden_size)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    graphdef, state = nnx.split(layer)

    def ours(state, x):
        return jnp.vdot(nnx.merge(graphdef, state)(x)[0], dy)

    def ref(p, x):
        out = dense_moe(x.reshape(-1, cfg.hidden_size), p["gate"], p["w1"], p["w3"], p["w2"],
                        cfg.num_experts_per_tok)
        return jnp.vdot(out.reshape(x.shape), dy)

    g_state, g_x = jax.grad(ours, argnums=(0, 1))(state, x)
    r_p, r_x = jax.grad(ref, argnums=(0, 1))(params(layer), x)
    assert rel_err(g_x, r_x) < 1e-5
    for name in ("gate", "w1", "w3", "w2"):
        assert rel_err(g_state[name][...], r_p[name]) < 1e-5, name


def test_gather_rows_gradient(rng):
    n, k, d = 11, 3, 5
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    index = jnp.asarray(rng.permutation(n * k), jnp.int32)
    inverse = jnp.argsort(index).astype(jnp.int32)
    g = jnp.asarray(rng.standard_normal((n * k, d)), jnp.float32)
    out, vjp = jax.vjp(lambda x: gather_rows(x, index, inverse, k), x)
    want, want_vjp = jax.vjp(lambda x: x[index // k], x)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(vjp(g)[0], want_vjp(g)[0], rtol=1e-6, atol=1e-6)


def test_layer_through_kernels_interpret(rng, monkeypatch):
    """The layer with its grouped matmuls on the Mosaic GPU kernels (interpret mode) equals the
    lax.ragged_dot layer, gradients included (hidden 128: the d_w kernel's smallest tile)."""
    cfg = tiny_config(hidden_size=128, intermediate_size=128)
    layer = SparseMoE(cfg.replace(moe_impl="xla"), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((1, 45, cfg.hidden_size)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        return jnp.vdot(nnx.merge(graphdef, state)(x)[0], dy)

    want = jax.value_and_grad(loss, argnums=(0, 1))(state, x)
    terms = float(jnp.sum(jnp.abs(nnx.merge(graphdef, state)(x)[0] * dy)))
    monkeypatch.setattr(lora, "_grouped_matmul", lambda x, w, sizes, impl: grouped_matmul_pallas(
        x, tuple(w) if isinstance(w, (tuple, list)) else (w,), sizes, interpret=True))
    got = jax.value_and_grad(loss, argnums=(0, 1))(state, x)
    # 4 chained float32 matmuls, each summing <= n = 128 terms in another order: ~sqrt(n)*eps each
    tol = 4 * np.sqrt(max(cfg.hidden_size, cfg.intermediate_size)) * EPS32
    # the loss sums N*D products out*dy of either sign: bounded relative to sum |out*dy|, not |loss|
    assert abs(float(got[0]) - float(want[0])) < tol * terms
    assert rel_err(got[1][1], want[1][1]) < tol
    for name in ("gate", "w1", "w3", "w2"):
        assert rel_err(got[1][0][name][...], want[1][0][name][...]) < tol, name


def test_token_chunks_equal_one_pass(rng, monkeypatch):
    cfg = tiny_config()
    layer = SparseMoE(cfg.replace(moe_impl="xla"), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((2, 29, cfg.hidden_size)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 29)) < 0.9)
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        out, stats = nnx.merge(graphdef, state)(x, mask)
        return jnp.vdot(out, dy) + stats["aux_loss"], (out, stats)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (g_state, g_x), (out, stats) = grad(state, x)
    monkeypatch.setattr(moe, "TOKEN_CHUNK", 16)  # 58 tokens: four chunks, the last padded
    (c_state, c_x), (c_out, c_stats) = grad(state, x)
    # each token's output is the same arithmetic; parameter gradients sum the chunks in another
    # order (float32 over <= 58 tokens)
    np.testing.assert_array_equal(c_out, out)
    np.testing.assert_array_equal(c_stats["aux_loss"], stats["aux_loss"])
    assert rel_err(c_x, g_x) < 1e-6
    for a, b in zip(jax.tree.leaves(c_state), jax.tree.leaves(g_state)):
        assert rel_err(a, b) < 1e-6
