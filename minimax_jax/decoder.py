"""One decoder layer (post-norm / DeepNorm wiring, spec §5) and the repeating block of layers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.attention import SoftmaxAttention
from minimax_jax.cache import BlockCache, PagedKV
from minimax_jax.config import LINEAR, MiniMaxConfig
from minimax_jax.layout import TokenLayout
from minimax_jax.lightning import LightningAttention
from minimax_jax.moe import SparseMoE
from minimax_jax.norm import RMSNorm

CacheView = jax.Array | PagedKV | None  # a lightning state `[B, H, K, K]`, a softmax layer's pages


@jax.custom_vjp
def grads_in_order(h: jax.Array, params: nnx.State) -> tuple[jax.Array, nnx.State]:
    """Identity on (a layer's input h, the layer's parameters). In the backward pass the gradient
    for h leaves only together with the layer's parameter gradients, so each layer's weight
    gradients are computed (and its recomputed activations freed) before the layer below runs
    its backward pass, rather than all of a scanned block's at its end."""
    return h, params


def _grads_in_order_fwd(h, params):
    return (h, params), None


def _grads_in_order_bwd(_, cotangents):
    return jax.lax.optimization_barrier(cotangents)


grads_in_order.defvjp(_grads_in_order_fwd, _grads_in_order_bwd)


class DecoderLayer(nnx.Module):
    """x^ = norm_in(h); h' = a * x^ + b * attn(x^); z^ = norm_post(h'); out = a' * z^ + b' * moe(z^)."""

    def __init__(self, cfg: MiniMaxConfig, layer_type: str, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.layer_type = layer_type
        self.remat = cfg.remat
        self.alpha, self.beta = cfg.residual_factors(layer_type)
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha_factor, cfg.mlp_beta_factor
        self.input_layernorm = RMSNorm((cfg.hidden_size,), ("embed",), eps=cfg.rms_norm_eps, param_dtype=pd)
        attn_cls = LightningAttention if layer_type == LINEAR else SoftmaxAttention
        self.self_attn = attn_cls(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            (cfg.hidden_size,), ("embed",), eps=cfg.rms_norm_eps, param_dtype=pd
        )
        self.block_sparse_moe = SparseMoE(cfg, rngs=rngs)

    def __call__(self, h: jax.Array, layout: TokenLayout, view: CacheView, *,
                 slopes: jax.Array) -> tuple[jax.Array, CacheView, dict[str, jax.Array]]:
        """h `[B, T, D]` -> (h `[B, T, D]`, the updated cache view, router stats).

        view: a lightning layer's state float32 `[B, H, K, K]` (None: zeros; the new state is
        returned either way), a softmax layer's `PagedKV` or None (no cache). slopes float32 `[H]`
        (lightning layers only). With remat, only the layer's input is kept for the backward
        pass; the layer's activations are recomputed there.
        """
        if self.remat:
            return nnx.remat(DecoderLayer.layer_body)(self, h, layout, view, slopes)
        return self.layer_body(h, layout, view, slopes)

    def layer_body(self, h: jax.Array, layout: TokenLayout, view: CacheView,
                   slopes: jax.Array) -> tuple[jax.Array, CacheView, dict[str, jax.Array]]:
        """The layer without remat: the attention sublayer, then the MoE sublayer."""
        h, view = self.attention_sublayer(h, layout, view, slopes)
        h, stats = self.moe_sublayer(h, layout.valid)
        return h, view, stats

    def attention_sublayer(self, h: jax.Array, layout: TokenLayout, view: CacheView,
                           slopes: jax.Array) -> tuple[jax.Array, CacheView]:
        """h `[B, T, D]` -> (a * x^ + b * attn(x^) `[B, T, D]`, the updated cache view)."""
        xn = self.input_layernorm(h)
        if self.layer_type == LINEAR:
            a, view = self.self_attn(xn, layout, view, slopes=slopes)
        else:
            a, view = self.self_attn(xn, layout, view)
        return self.alpha * xn + self.beta * a, view

    def moe_sublayer(self, h: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """h `[B, T, D]`, valid bool `[B, T]` or None -> (a' * z^ + b' * moe(z^), router stats)."""
        zn = self.post_attention_layernorm(h)
        f, stats = self.block_sparse_moe(zn, valid)
        return self.mlp_alpha * zn + self.mlp_beta * f, stats


class DecoderBlock(nnx.Module):
    """The repeating block of layer types (`cfg.block_pattern`), scanned `cfg.num_blocks` times."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs) for t in cfg.block_pattern])

    def __call__(self, h: jax.Array, layout: TokenLayout, cache: BlockCache | None, *,
                 slopes: jax.Array) -> tuple[jax.Array, BlockCache | None, dict[str, jax.Array]]:
        """Run the block's layers in order: h `[B, T, D]`, slopes float32 `[P, H]` (one row per
        layer of the block). Returns (h, the updated block cache or None, router stats stacked
        over the P layers)."""
        states, stats, n_full = [], [], 0
        for i, layer in enumerate(self.layers):
            if layer.layer_type == LINEAR:
                view = None if cache is None else cache.lightning_state[len(states)]
            else:
                view = None if cache is None else cache.pages(n_full)
            graphdef, params = nnx.split(layer)
            h, params = grads_in_order(h, params)
            h, view, layer_stats = nnx.merge(graphdef, params)(h, layout, view, slopes=slopes[i])
            stats.append(layer_stats)
            if layer.layer_type == LINEAR:
                states.append(view)
            else:
                n_full += 1
                cache = None if cache is None else cache.with_pages(view)
        new_cache = None
        if cache is not None:
            new_cache = dataclasses.replace(
                cache, lightning_state=jnp.stack(states) if states else cache.lightning_state)
        return h, new_cache, jax.tree.map(lambda *x: jnp.stack(x), *stats)
