"""The softmax GQA attention block of MiniMax-01 (spec §4)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from minimax_jax import lora
from minimax_jax.cache import PagedKV, write_pages
from minimax_jax.config import MiniMaxConfig
from minimax_jax.layout import PADDING, TokenLayout
from minimax_jax.params import param
from minimax_jax.rope import apply_rope


class SoftmaxAttention(nnx.Module):
    """q/k/v projections, RoPE on the first `rotary_dim` dims of q and k, causal GQA through
    `pallas_kernels.softmax_attention`, o_proj (the projections: params, or
    `quant.QuantizedWeight`s once quantized)."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        d, h, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.softmax_impl
        self.theta, self.rotary_dim = cfg.rope_theta, cfg.rotary_dim
        self.q_proj = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), pd, stddev=std)
        self.k_proj = param(rngs, (d, n, k), ("embed", "kv_heads", "head_dim"), pd, stddev=std)
        self.v_proj = param(rngs, (d, n, k), ("embed", "kv_heads", "head_dim"), pd, stddev=std)
        self.o_proj = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), pd, stddev=std)

    def __call__(self, x: jax.Array, layout: TokenLayout,
                 kv: PagedKV | None = None) -> tuple[jax.Array, PagedKV | None]:
        """x `[B, T, D]` -> (out `[B, T, D]` in the compute dtype, the updated K/V view or None).

        Without a cache the keys are this chunk's own. With kv, row b's keys and values are
        written at its slots cache_length[b] .. + T - 1 (see `write_pages`) and the queries attend
        to all of the row's slots, masked by the layout; when every row starts empty (a first
        prefill chunk) its keys are exactly the chunk's own, and the op runs as self-attention.
        """
        x = x.astype(self.dtype)
        q = lora.project("btd,dhk->bthk", x, self, "q_proj")
        k = lora.project("btd,dnk->btnk", x, self, "k_proj")
        v = lora.project("btd,dnk->btnk", x, self, "v_proj")
        q = apply_rope(q, layout.positions, theta=self.theta, rotary_dim=self.rotary_dim)
        k = apply_rope(k, layout.positions, theta=self.theta, rotary_dim=self.rotary_dim)
        segments = dict(q_segment_ids=layout.q_segment_ids, kv_segment_ids=layout.kv_segment_ids)
        if kv is None:
            o = pallas_kernels.softmax_attention(q, k, v, **segments, impl=self.impl,
                                                 zigzag=layout.zigzag)
        else:
            kv = dataclasses.replace(
                kv, key=write_pages(kv.key, kv.page_table, k, layout.cache_length),
                value=write_pages(kv.value, kv.page_table, v, layout.cache_length))
            own = {}
            if layout.valid is not None:
                own = dict(q_segment_ids=jnp.zeros_like(layout.positions),
                           kv_segment_ids=jnp.where(layout.valid, 0, PADDING))
            o = jax.lax.cond(
                jnp.all(layout.cache_length == 0),
                lambda: pallas_kernels.softmax_attention(q, k, v, **own, impl=self.impl),
                lambda: pallas_kernels.paged_softmax_attention(
                    q, kv.key, kv.value, kv.page_table, **segments, q_offset=layout.cache_length,
                    impl=self.impl))
        out = lora.project("bthk,hkd->btd", o, self, "o_proj")
        return out, kv
