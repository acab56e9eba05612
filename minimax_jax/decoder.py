"""One decoder layer (post-norm / DeepNorm wiring, spec §5) and the repeating block of layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.attention import SoftmaxAttention
from minimax_jax.config import LINEAR, MiniMaxConfig
from minimax_jax.lightning import LightningAttention
from minimax_jax.moe import SparseMoE
from minimax_jax.norm import RMSNorm


class DecoderLayer(nnx.Module):
    """x^ = norm_in(h); h' = a * x^ + b * attn(x^); z^ = norm_post(h'); out = a' * z^ + b' * moe(z^)."""

    def __init__(self, cfg: MiniMaxConfig, layer_type: str, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.layer_type = layer_type
        self.alpha, self.beta = cfg.residual_factors(layer_type)
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha_factor, cfg.mlp_beta_factor
        self.input_layernorm = RMSNorm((cfg.hidden_size,), ("embed",), eps=cfg.rms_norm_eps, param_dtype=pd)
        attn_cls = LightningAttention if layer_type == LINEAR else SoftmaxAttention
        self.self_attn = attn_cls(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            (cfg.hidden_size,), ("embed",), eps=cfg.rms_norm_eps, param_dtype=pd
        )
        self.block_sparse_moe = SparseMoE(cfg, rngs=rngs)

    def __call__(
        self,
        h: jax.Array,
        *,
        slopes: jax.Array,
        positions: jax.Array,
        visible: jax.Array,
        mask: jax.Array | None,
        segment_ids: jax.Array | None,
        state: jax.Array | None,
        kv_cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None,
    ):
        """h `[B, T, D]` -> (h `[B, T, D]`, new lightning state, new K/V pages, router stats).

        Lightning layers use slopes `[H]`, mask, segment_ids and state; softmax layers use
        positions, visible and kv_cache (see `LightningAttention` / `SoftmaxAttention`).
        """
        xn = self.input_layernorm(h)
        if self.layer_type == LINEAR:
            a, state = self.self_attn(xn, slopes=slopes, mask=mask, segment_ids=segment_ids, state=state)
            new_kv = None
        else:
            a, new_kv = self.self_attn(xn, positions=positions, visible=visible, kv_cache=kv_cache)
        h = self.alpha * xn + self.beta * a
        zn = self.post_attention_layernorm(h)
        f, stats = self.block_sparse_moe(zn, mask)
        return self.mlp_alpha * zn + self.mlp_beta * f, state, new_kv, stats


class DecoderBlock(nnx.Module):
    """The repeating block of layer types (`cfg.block_pattern`), scanned `cfg.num_blocks` times."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs) for t in cfg.block_pattern])

    def __call__(
        self,
        h: jax.Array,
        *,
        slopes: jax.Array,
        positions: jax.Array,
        visible: jax.Array,
        mask: jax.Array | None,
        segment_ids: jax.Array | None,
        lightning_state: jax.Array | None,
        kv_cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None,
    ):
        """Run the block's layers in order.

        h `[B, T, D]`; slopes float32 `[P, H]` (one row per layer of the block, absolute-layer
        slopes); lightning_state float32 `[n_linear, B, H, K, K]` or None; kv_cache (key pages
        `[n_full, P, Z, N, K]`, value pages, page_table int32 `[B, R]`, start int32 `[B]`) or None.
        Returns (h, new lightning_state or None, (key, value) pages or None, router stats stacked
        over the P layers).
        """
        states, kvs, stats = [], [], []
        for i, layer in enumerate(self.layers):
            state = kv = None
            if layer.layer_type == LINEAR:
                state = None if lightning_state is None else lightning_state[len(states)]
            elif kv_cache is not None:
                kv = (kv_cache[0][len(kvs)], kv_cache[1][len(kvs)], *kv_cache[2:])
            h, state, new_kv, layer_stats = layer(
                h, slopes=slopes[i], positions=positions, visible=visible, mask=mask,
                segment_ids=segment_ids, state=state, kv_cache=kv,
            )
            stats.append(layer_stats)
            if layer.layer_type == LINEAR:
                states.append(state)
            elif new_kv is not None:
                kvs.append(new_kv)
        new_state = lightning_state
        if lightning_state is not None and states:
            new_state = jnp.stack(states)
        new_kv = None
        if kv_cache is not None:
            new_kv = tuple(jnp.stack(x) for x in zip(*kvs)) if kvs else kv_cache[:2]
        return h, new_state, new_kv, jax.tree.map(lambda *x: jnp.stack(x), *stats)
