"""The sparse mixture-of-experts block of MiniMax-01 (spec §6): fp32 softmax router, top-k with
renormalised weights, SwiGLU experts computed dropless and grouped by expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import MiniMaxConfig
from minimax_jax.params import param


def route(router_logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """router_logits `[N, E]` -> (probs float32 `[N, E]`, weights float32 `[N, k]`, experts int32 `[N, k]`).

    probs = softmax in float32; the k largest are renormalised to sum to one.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_p, experts = jax.lax.top_k(probs, top_k)
    return probs, top_p / jnp.sum(top_p, axis=-1, keepdims=True), experts


def router_stats(probs: jax.Array, experts: jax.Array, mask: jax.Array | None) -> dict[str, jax.Array]:
    """Load-balancing loss and expert load of one MoE layer.

    probs `[N, E]`, experts `[N, k]`, mask `[N]` (1 = real token) or None; padded tokens are
    left out. Returns {"aux_loss": float32 scalar, the Switch-style E * sum_e f_e * P_e with f_e
    the assignments to e per token (summing to k) and P_e the mean router probability of e;
    "expert_load": float32 `[E]`, the fraction of assignments that go to each expert}.
    """
    n, e = probs.shape
    k = experts.shape[1]
    w = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    counts = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * w[:, None, None], axis=(0, 1))
    mean_prob = jnp.sum(probs * w[:, None], axis=0) / denom
    return {"aux_loss": e * jnp.sum(counts / denom * mean_prob), "expert_load": counts / (denom * k)}


def expert_ffn(x: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array,
               w2: jax.Array) -> jax.Array:
    """SwiGLU experts on rows sorted by expert: W2(SiLU(W1 x) * W3 x).

    x `[M, D]` (rows of expert e contiguous, in expert order), group_sizes int32 `[E]` summing to M,
    w1/w3 `[E, D, F]`, w2 `[E, F, D]`. Returns `[M, D]` in x's dtype.
    """
    h1 = jax.lax.ragged_dot(x, w1, group_sizes)
    h3 = jax.lax.ragged_dot(x, w3, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(h1) * h3, w2, group_sizes)


class SparseMoE(nnx.Module):
    """`block_sparse_moe`: router `gate` `[D, E]` and experts `w1`, `w3` `[E, D, F]`, `w2` `[E, F, D]`."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        d, e, f = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.dtype = jnp.dtype(cfg.dtype)
        self.top_k = cfg.num_experts_per_tok
        self.gate = param(rngs, (d, e), ("embed", None), pd, stddev=std)
        self.w1 = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd, stddev=std)
        self.w3 = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd, stddev=std)
        self.w2 = param(rngs, (e, f, d), ("expert", "mlp", "embed"), pd, stddev=std)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x `[B, T, D]`, mask `[B, T]` or None -> (out `[B, T, D]` in the compute dtype,
        `router_stats`)."""
        b, t, d = x.shape
        e = self.gate.shape[1]
        xf = x.astype(self.dtype).reshape(b * t, d)
        logits = xf @ self.gate[...].astype(self.dtype)
        probs, weights, experts = route(logits, self.top_k)
        stats = router_stats(probs, experts, None if mask is None else mask.reshape(-1))

        flat = experts.reshape(-1)  # [N * k], assignment a belongs to token a // k
        order = jnp.argsort(flat, stable=True)
        group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        y_sorted = expert_ffn(
            xf[order // self.top_k], group_sizes,
            self.w1[...].astype(self.dtype), self.w3[...].astype(self.dtype),
            self.w2[...].astype(self.dtype),
        )
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(b * t, self.top_k, d)
        out = jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights)
        return out.astype(self.dtype).reshape(b, t, d), stats
