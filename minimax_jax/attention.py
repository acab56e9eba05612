"""The softmax GQA attention block of MiniMax-01 (spec §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import MiniMaxConfig
from minimax_jax.params import param
from minimax_jax.rope import apply_rope


KEY_BLOCK = 2048  # longer key sequences are attended to block by block (online softmax)
NEG = float(jnp.finfo(jnp.float32).min)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
                      key_block: int | None = None) -> jax.Array:
    """Softmax attention with grouped KV heads.

    q `[B, T, H, K]`, k and v `[B, S, N, K]` (H a multiple of N; query head h uses kv head
    h // (H / N)), visible bool `[B, T, S]`. Scores scaled by 1/sqrt(K), softmax in float32,
    weights cast back to q's dtype. Returns `[B, T, H, K]` in q's dtype; a row with nothing
    visible gives finite (meaningless) output. With S > key_block (default KEY_BLOCK) the keys
    are taken key_block at a time (`blockwise_attention`): memory grows with T * key_block, not T * S.
    """
    key_block = KEY_BLOCK if key_block is None else key_block
    if k.shape[1] > key_block:
        return blockwise_attention(q, k, v, visible, key_block)
    b, t, h, kd = q.shape
    n = k.shape[2]
    qg = q.reshape(b, t, n, h // n, kd)
    scores = jnp.einsum("btngk,bsnk->bngts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (kd ** -0.5)
    scores = jnp.where(visible[:, None, None], scores, NEG)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bngts,bsnk->btngk", weights, v)
    return out.reshape(b, t, h, kd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                        key_block: int) -> jax.Array:
    """`grouped_attention` over blocks of `key_block` keys with a running (online) softmax in
    float32, `lax.scan` over the blocks; blocks with nothing visible are skipped. Same shapes
    and dtypes; a row with nothing visible gives zeros."""
    b, t, h, kd = q.shape
    s, n = k.shape[1], k.shape[2]
    g, nblk = h // n, -(-s // key_block)
    pad = nblk * key_block - s
    qg = q.reshape(b, t, n, g, kd)

    def blocks(x: jax.Array, axis: int) -> jax.Array:  # split the key axis, blocks first
        x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
        x = x.reshape(x.shape[:axis] + (nblk, key_block) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    def attend(carry, kb, vb, vis):
        m, l, acc = carry  # running max [B, N, G, T], sum [B, N, G, T], output [B, T, N, G, K]
        scores = jnp.einsum("btngk,bsnk->bngts", qg, kb, preferred_element_type=jnp.float32)
        scores = jnp.where(vis[:, None, None], scores * (kd ** -0.5), NEG)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.where(vis[:, None, None], jnp.exp(scores - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum("bngts,bsnk->btngk", p.astype(q.dtype), vb, preferred_element_type=jnp.float32)
        acc = acc * jnp.moveaxis(scale, 3, 1)[..., None] + pv
        return m_new, l * scale + jnp.sum(p, axis=-1), acc

    def step(carry, xs):
        kb, vb, vis = xs
        return jax.lax.cond(jnp.any(vis), lambda c: attend(c, kb, vb, vis), lambda c: c, carry), None

    init = (jnp.full((b, n, g, t), NEG, jnp.float32), jnp.zeros((b, n, g, t), jnp.float32),
            jnp.zeros((b, t, n, g, kd), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, (blocks(k, 1), blocks(v, 1), blocks(visible, 2)))
    denom = jnp.moveaxis(l, 3, 1)[..., None]
    out = jnp.where(denom > 0, acc / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.astype(q.dtype).reshape(b, t, h, kd)


def write_rows(buffer: jax.Array, chunk: jax.Array, start: jax.Array) -> jax.Array:
    """Write chunk `[B, T, ...]` into buffer `[B, S, ...]` at slots start[b]..start[b]+T-1 of row b."""
    return jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x, s, axis=0))(
        buffer, chunk, start
    )


class SoftmaxAttention(nnx.Module):
    """q/k/v projections, RoPE on the first `rotary_dim` dims of q and k, GQA, o_proj."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        d, h, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.dtype = jnp.dtype(cfg.dtype)
        self.theta, self.rotary_dim = cfg.rope_theta, cfg.rotary_dim
        self.q_proj = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), pd, stddev=std)
        self.k_proj = param(rngs, (d, n, k), ("embed", "kv_heads", "head_dim"), pd, stddev=std)
        self.v_proj = param(rngs, (d, n, k), ("embed", "kv_heads", "head_dim"), pd, stddev=std)
        self.o_proj = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), pd, stddev=std)

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        visible: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x `[B, T, D]`, positions int32 `[B, T]` (for RoPE).

        Without a cache, `visible` is bool `[B, T, T]` over this chunk's own keys. With
        kv_cache = (key `[B, S, N, K]`, value `[B, S, N, K]`, start int32 `[B]`), row b's keys are
        written at slots start[b]..start[b]+T-1 and `visible` is `[B, T, S]` over all slots.
        Returns (out `[B, T, D]`, updated (key, value) or None).
        """
        x = x.astype(self.dtype)
        q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(self.dtype))
        k = jnp.einsum("btd,dnk->btnk", x, self.k_proj[...].astype(self.dtype))
        v = jnp.einsum("btd,dnk->btnk", x, self.v_proj[...].astype(self.dtype))
        q = apply_rope(q, positions, theta=self.theta, rotary_dim=self.rotary_dim)
        k = apply_rope(k, positions, theta=self.theta, rotary_dim=self.rotary_dim)
        new_cache = None
        if kv_cache is not None:
            key, value, start = kv_cache
            key = write_rows(key, k.astype(key.dtype), start)
            value = write_rows(value, v.astype(value.dtype), start)
            new_cache = (key, value)
            k, v = key.astype(self.dtype), value.astype(self.dtype)
        o = grouped_attention(q, k, v, visible)
        out = jnp.einsum("bthk,hkd->btd", o, self.o_proj[...].astype(self.dtype))
        return out, new_cache
