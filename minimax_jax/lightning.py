"""The lightning (linear) attention block of MiniMax-01 (spec §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from minimax_jax import lora
from minimax_jax.config import MiniMaxConfig
from minimax_jax.layout import TokenLayout
from minimax_jax.params import param
from minimax_jax.norm import RMSNorm


class LightningAttention(nnx.Module):
    """qkv_proj (per-head [q|k|v]) -> SiLU -> decayed linear attention -> RMSNorm over all heads
    (eps 1e-6) -> times sigmoid(output_gate(x)) -> out_proj. No biases, no 1/sqrt(d) scaling.
    The projections are params, or `quant.QuantizedWeight`s once quantized."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        d, h, k = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.lightning_impl
        self.qkv_proj = param(rngs, (d, h, 3, k), ("embed", "heads", "qkv", "head_dim"), pd, stddev=std)
        self.output_gate = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), pd, stddev=std)
        self.norm = RMSNorm((h, k), ("heads", "head_dim"), eps=cfg.lightning_norm_eps, param_dtype=pd)
        self.out_proj = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), pd, stddev=std)

    def __call__(self, x: jax.Array, layout: TokenLayout, state: jax.Array | None = None, *,
                 slopes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x `[B, T, D]` (the normed layer input), the layout (padding contributes nothing, the
        state resets at document starts), state float32 `[B, H, K, K]` or None (zeros), slopes
        float32 `[H]`.

        Returns (out `[B, T, D]` in the compute dtype, new state float32 `[B, H, K, K]`).
        """
        x = x.astype(self.dtype)
        qkv = lora.project("btd,dhjk->bthjk", x, self, "qkv_proj")
        qkv = jax.nn.silu(qkv)
        if layout.valid is not None:
            qkv = qkv * layout.valid.astype(qkv.dtype)[:, :, None, None, None]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        o, state = pallas_kernels.lightning_attention(
            q, k, v, slopes, initial_state=state, segment_ids=layout.segment_ids, impl=self.impl,
            zigzag=layout.zigzag)
        o = self.norm(o.astype(self.dtype))
        gate = jax.nn.sigmoid(lora.project("btd,dhk->bthk", x, self, "output_gate"))
        out = lora.project("bthk,hkd->btd", o * gate, self, "out_proj")
        return out, state
