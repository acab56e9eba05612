"""The softmax GQA attention block of MiniMax-01 (spec §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.cache import write_pages
from minimax_jax.config import MiniMaxConfig
from minimax_jax.params import param
from minimax_jax.rope import apply_rope


KEY_BLOCK = 2048  # longer key sequences are attended to block by block (online softmax)
NEG = float(jnp.finfo(jnp.float32).min)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
                      key_block: int | None = None) -> jax.Array:
    """Softmax attention with grouped KV heads over contiguous keys.

    q `[B, T, H, K]`, k and v `[B, S, N, K]` (H a multiple of N; query head h uses kv head
    h // (H / N)), visible bool `[B, T, S]`. Scores scaled by 1/sqrt(K), softmax in float32,
    weights cast back to q's dtype. Returns `[B, T, H, K]` in q's dtype; a row with nothing
    visible gives finite (meaningless) output. With S > key_block (default KEY_BLOCK) the keys
    are taken key_block at a time with a running (online) softmax: memory grows with
    T * key_block, not T * S.
    """
    key_block = KEY_BLOCK if key_block is None else key_block
    s = k.shape[1]
    if s <= key_block:
        return _dense_attention(q, k, v, visible)
    nblk = -(-s // key_block)

    def blocks(x: jax.Array, axis: int) -> jax.Array:  # split the key axis, blocks first
        x = jnp.pad(x, [(0, nblk * key_block - s) if a == axis else (0, 0) for a in range(x.ndim)])
        x = x.reshape(x.shape[:axis] + (nblk, key_block) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    kv_blocks = (blocks(k, 1), blocks(v, 1))
    return _online_softmax(q, k.shape[2], kv_blocks, blocks(visible, 2), lambda kv, vis: kv)


def paged_attention(q: jax.Array, key_pages: jax.Array, value_pages: jax.Array,
                    page_table: jax.Array, visible: jax.Array, *,
                    key_block: int | None = None) -> jax.Array:
    """`grouped_attention` over keys kept in a pool of pages.

    q `[B, T, H, K]`; key_pages, value_pages `[P, Z, N, K]` (P pages of Z tokens); page_table
    int32 `[B, R]`: row b's keys are the pages page_table[b] in order (S = R * Z slots; entries
    out of range read some page, which `visible` must hide); visible bool `[B, T, S]`. Returns
    `[B, T, H, K]` in q's dtype, equal to `grouped_attention` on the gathered keys. Values that
    no query sees are zeroed (stale pages may hold anything). With S > key_block (default
    KEY_BLOCK) the pages are gathered max(1, key_block // Z) at a time, online softmax.
    """
    key_block = KEY_BLOCK if key_block is None else key_block
    z, n, kd = key_pages.shape[1:]
    b, r = page_table.shape
    per_block = max(1, key_block // z)

    def gather(table: jax.Array, vis: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The keys and values of pages table `[B, r]` -> `[B, r * Z, N, K]` each."""
        k, v = (jnp.take(x, table, axis=0, mode="clip").reshape(b, -1, n, kd).astype(q.dtype)
                for x in (key_pages, value_pages))
        return k, jnp.where(jnp.any(vis, axis=1)[:, :, None, None], v, 0)

    if r <= per_block:
        return _dense_attention(q, *gather(page_table, visible), visible)
    nblk = -(-r // per_block)
    tables = jnp.pad(page_table, ((0, 0), (0, nblk * per_block - r))).reshape(b, nblk, per_block)
    t = visible.shape[1]
    vis = jnp.pad(visible, ((0, 0), (0, 0), (0, (nblk * per_block - r) * z)))
    vis = jnp.moveaxis(vis.reshape(b, t, nblk, per_block * z), 2, 0)
    return _online_softmax(q, n, jnp.moveaxis(tables, 1, 0), vis, gather)


def _dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """`grouped_attention` in one piece: scores `[B, N, G, T, S]` at once."""
    b, t, h, kd = q.shape
    n = k.shape[2]
    qg = q.reshape(b, t, n, h // n, kd)
    scores = jnp.einsum("btngk,bsnk->bngts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (kd ** -0.5)
    scores = jnp.where(visible[:, None, None], scores, NEG)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bngts,bsnk->btngk", weights, v)
    return out.reshape(b, t, h, kd)


def _online_softmax(q: jax.Array, n: int, blocks, visible: jax.Array, fetch) -> jax.Array:
    """Attention over key blocks with a running softmax in float32, `lax.scan` over the blocks.

    q `[B, T, H, K]`, n kv heads; `blocks`: arrays with a leading block axis, fetch(block,
    visible block) -> (keys, values) `[B, Sb, N, K]`; visible bool `[nblk, B, T, Sb]`. Blocks
    with nothing visible are skipped (not fetched). Returns `[B, T, H, K]` in q's dtype; a row
    with nothing visible gives zeros.
    """
    b, t, h, kd = q.shape
    g = h // n
    qg = q.reshape(b, t, n, g, kd)

    def attend(carry, block, vis):
        m, l, acc = carry  # running max [B, N, G, T], sum [B, N, G, T], output [B, T, N, G, K]
        kb, vb = fetch(block, vis)
        scores = jnp.einsum("btngk,bsnk->bngts", qg, kb, preferred_element_type=jnp.float32)
        scores = jnp.where(vis[:, None, None], scores * (kd ** -0.5), NEG)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.where(vis[:, None, None], jnp.exp(scores - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum("bngts,bsnk->btngk", p.astype(q.dtype), vb, preferred_element_type=jnp.float32)
        acc = acc * jnp.moveaxis(scale, 3, 1)[..., None] + pv
        return m_new, l * scale + jnp.sum(p, axis=-1), acc

    def step(carry, xs):
        block, vis = xs
        return jax.lax.cond(jnp.any(vis), lambda c: attend(c, block, vis), lambda c: c, carry), None

    init = (jnp.full((b, n, g, t), NEG, jnp.float32), jnp.zeros((b, n, g, t), jnp.float32),
            jnp.zeros((b, t, n, g, kd), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(step, init, (blocks, visible))
    denom = jnp.moveaxis(l, 3, 1)[..., None]
    out = jnp.where(denom > 0, acc / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out.astype(q.dtype).reshape(b, t, h, kd)


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
        kv_cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x `[B, T, D]`, positions int32 `[B, T]` (for RoPE).

        Without a cache, `visible` is bool `[B, T, T]` over this chunk's own keys. With
        kv_cache = (key pages `[P, Z, N, K]`, value pages, page_table int32 `[B, R]`, start int32
        `[B]`), row b's keys are written at its slots start[b]..start[b]+T-1 (see `write_pages`)
        and `visible` is `[B, T, R * Z]` over all of its slots.
        Returns (out `[B, T, D]`, updated (key pages, value pages) or None).
        """
        x = x.astype(self.dtype)
        q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(self.dtype))
        k = jnp.einsum("btd,dnk->btnk", x, self.k_proj[...].astype(self.dtype))
        v = jnp.einsum("btd,dnk->btnk", x, self.v_proj[...].astype(self.dtype))
        q = apply_rope(q, positions, theta=self.theta, rotary_dim=self.rotary_dim)
        k = apply_rope(k, positions, theta=self.theta, rotary_dim=self.rotary_dim)
        if kv_cache is None:
            o, new_cache = grouped_attention(q, k, v, visible), None
        else:
            key_pages, value_pages, page_table, start = kv_cache
            key_pages = write_pages(key_pages, page_table, k, start)
            value_pages = write_pages(value_pages, page_table, v, start)
            o = paged_attention(q, key_pages, value_pages, page_table, visible)
            new_cache = (key_pages, value_pages)
        out = jnp.einsum("bthk,hkd->btd", o, self.o_proj[...].astype(self.dtype))
        return out, new_cache
