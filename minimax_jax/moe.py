"""The sparse mixture-of-experts block of MiniMax-01 (spec §6): fp32 softmax router, top-k with
renormalised weights, SwiGLU experts computed dropless and grouped by expert: tokens are gathered
into expert order, run through grouped matmuls (`pallas_kernels.grouped_matmul`) and gathered back
(gathers both ways, also in the gradient). Sequences longer than TOKEN_CHUNK tokens go through the
experts a chunk at a time, each chunk recomputed in the backward pass (memory O(TOKEN_CHUNK)).
Under a mesh, each device routes and computes its own tokens (`sharding.tokens`); with an
`expert` axis the experts are split over it and tokens travel to them by all-to-all
(`sharding.experts`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax import lora
from minimax_jax.config import MiniMaxConfig
from minimax_jax.lora import ExpertWeights
from minimax_jax.params import param
from sharding.experts import expert_shards, experts_parallel
from sharding.tokens import constrain_tokens, map_token_shards

TOKEN_CHUNK = 65536  # longer token sequences go through the experts this many tokens at a time


def route(router_logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """router_logits `[..., E]` -> (probs float32 `[..., E]`, weights float32 `[..., k]`,
    experts int32 `[..., k]`).

    probs = softmax in float32; the k largest are renormalised to sum to one.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_p, experts = jax.lax.top_k(probs, top_k)
    return probs, top_p / jnp.sum(top_p, axis=-1, keepdims=True), experts


def router_stats(probs: jax.Array, experts: jax.Array, mask: jax.Array | None) -> dict[str, jax.Array]:
    """Load-balancing loss and expert load of one MoE layer.

    probs `[..., E]`, experts `[..., k]` over the same token axes, mask (1 = real token) over
    those axes or None; padded tokens are left out. Returns {"aux_loss": float32 scalar, the
    Switch-style E * sum_e f_e * P_e with f_e the assignments to e per token (summing to k) and
    P_e the mean router probability of e; "expert_load": float32 `[E]`, the fraction of
    assignments that go to each expert}.
    """
    e, k = probs.shape[-1], experts.shape[-1]
    w = jnp.ones(probs.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    counts = _sum_tokens(jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=-2) * w[..., None])
    mean_prob = _sum_tokens(probs * w[..., None]) / denom
    return {"aux_loss": e * jnp.sum(counts / denom * mean_prob), "expert_load": counts / (denom * k)}


def _sum_tokens(x: jax.Array) -> jax.Array:
    """x `[..., E]` summed over its token axes one axis at a time (a sum over several axes at
    once may become a reshape that gathers token-sharded arrays)."""
    while x.ndim > 1:
        x = jnp.sum(x, axis=0)
    return x


def dispatch_order(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """experts int `[N, k]` -> (order, inverse int32 `[N * k]`, group_sizes int32 `[E]`).

    Assignment a (token a // k) is the a-th of the flattened experts; `order` lists assignments by
    expert (stable), `inverse` is its inverse permutation (`order[inverse[a]] == a`).
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    return order, inverse, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array, fan_out: int) -> jax.Array:
    """x `[N, D]` -> `[N * fan_out, D]`, row i = `x[index[i] // fan_out]`.

    `index` int32 `[N * fan_out]` is a permutation with inverse `inverse`; the gradient is a
    gather too (`dx[n] = sum_j g[inverse[n * fan_out + j]]`) rather than a scatter-add.
    """
    return x[index // fan_out]


def _gather_rows_fwd(x, index, inverse, fan_out):
    return gather_rows(x, index, inverse, fan_out), (index, inverse)


def _gather_rows_bwd(fan_out, residuals, g):
    index, inverse = residuals
    n = g.shape[0] // fan_out
    dx = g[inverse].reshape(n, fan_out, g.shape[1])
    dx = dx[:, 0] if fan_out == 1 else jnp.sum(dx.astype(jnp.float32), axis=1).astype(g.dtype)
    return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def expert_ffn(x: jax.Array, group_sizes: jax.Array, w1: ExpertWeights, w3: ExpertWeights,
               w2: ExpertWeights, impl: str = "auto") -> jax.Array:
    """SwiGLU experts on rows sorted by expert: W2(SiLU(W1 x) * W3 x).

    x `[M, D]` (rows of expert e contiguous, in expert order), group_sizes int32 `[E]` summing to M,
    w1/w3 `[E, D, F]`, w2 `[E, F, D]` (arrays in x's dtype, or int8 / fp8 `QuantizedWeights`, either with
    per-expert LoRA factors as `lora.AdaptedExperts`);
    w1 and w3 run as one grouped matmul. `impl` as in `pallas_kernels.grouped_matmul`. Returns
    `[M, D]` in x's dtype.
    """
    h1, h3 = jnp.split(lora.grouped_matmul(x, (w1, w3), group_sizes, impl=impl), 2, axis=1)
    return lora.grouped_matmul(jax.nn.silu(h1) * h3, w2, group_sizes, impl=impl)


class SparseMoE(nnx.Module):
    """`block_sparse_moe`: router `gate` `[D, E]` and experts `w1`, `w3` `[E, D, F]`, `w2` `[E, F, D]`
    (params, or `quant.QuantizedWeight`s once quantized; the router never is)."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        d, e, f = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.dtype = jnp.dtype(cfg.dtype)
        self.top_k = cfg.num_experts_per_tok
        self.impl = cfg.moe_impl  # grouped matmul implementation
        self.gate = param(rngs, (d, e), ("embed", None), pd, stddev=std)
        self.w1 = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd, stddev=std)
        self.w3 = param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd, stddev=std)
        self.w2 = param(rngs, (e, f, d), ("expert", "mlp", "embed"), pd, stddev=std)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x `[B, T, D]`, mask `[B, T]` or None -> (out `[B, T, D]` in the compute dtype,
        `router_stats`)."""
        x = x.astype(self.dtype)
        logits = lora.project("btd,de->bte", x, self, "gate")
        probs, weights, experts = route(constrain_tokens(logits), self.top_k)
        stats = router_stats(probs, experts, mask)
        ws = tuple(lora.expert_operand(self, name, self.dtype) for name in ("w1", "w3", "w2"))
        if expert_shards() > 1:
            ffn = functools.partial(_experts_by_id, impl=self.impl)
            return experts_parallel(x, weights, experts, *ws, ffn), stats
        local = functools.partial(_experts_on_tokens, num_experts=self.gate.shape[1], impl=self.impl)
        return map_token_shards(local, (x, weights, experts), ws), stats


def _experts_by_id(rows: jax.Array, ids: jax.Array, w1: ExpertWeights, w3: ExpertWeights, w2: ExpertWeights, *,
                   impl: str) -> jax.Array:
    """SwiGLU expert ids[m] of (w1, w3, w2) `[E, ...]` on row m of rows `[M, D]`; id E marks an
    empty row (its output is 0). Returns `[M, D]`."""
    empty = ids == w1.shape[0]
    order, inverse, group_sizes = dispatch_order(jnp.where(empty, 0, ids)[:, None], w1.shape[0])
    y = expert_ffn(gather_rows(rows, order, inverse, 1), group_sizes, w1, w3, w2, impl)
    return jnp.where(empty[:, None], 0, gather_rows(y, inverse, order, 1))


def _experts_on_tokens(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: ExpertWeights,
                       w3: ExpertWeights, w2: ExpertWeights, *, num_experts: int, impl: str) -> jax.Array:
    """`combine_experts` over tokens x `[B, T, D]` routed to experts `[B, T, k]` with weights
    `[B, T, k]`; more than TOKEN_CHUNK tokens go a chunk at a time, each chunk recomputed in the
    backward pass (the experts' activations of one chunk are alive at a time). Returns `[B, T, D]`."""
    b, t, d = x.shape
    n, ws = b * t, (w1, w3, w2)
    xf, weights, experts = x.reshape(n, d), weights.reshape(n, -1), experts.reshape(n, -1)
    if n <= TOKEN_CHUNK:
        return combine_experts(xf, weights, experts, ws, num_experts, impl).reshape(b, t, d)
    c = -(-n // TOKEN_CHUNK)
    pad = c * TOKEN_CHUNK - n
    chunks = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(  # noqa: E731
        c, TOKEN_CHUNK, *a.shape[1:])
    one = jax.checkpoint(lambda a: combine_experts(*a, ws, num_experts, impl))
    out = jax.lax.map(one, (chunks(xf), chunks(weights), chunks(experts)))
    return out.reshape(c * TOKEN_CHUNK, d)[:n].reshape(b, t, d)


def combine_experts(xf: jax.Array, weights: jax.Array, experts: jax.Array,
                    ws: tuple[ExpertWeights, ExpertWeights, ExpertWeights], num_experts: int,
                    impl: str) -> jax.Array:
    """The experts' weighted sum for tokens xf `[N, D]` routed to experts int32 `[N, k]` with
    weights float32 `[N, k]`; ws = (w1, w3, w2) in the compute dtype (or `QuantizedWeights`). Returns `[N, D]` in xf's
    dtype (a token of weight 0 adds nothing)."""
    n, d = xf.shape
    k = experts.shape[1]
    order, inverse, group_sizes = dispatch_order(experts, num_experts)
    y_sorted = expert_ffn(gather_rows(xf, order, inverse, k), group_sizes, *ws, impl)
    y = gather_rows(y_sorted, inverse, order, 1).reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(xf.dtype)
