"""MiniMax-01 causal language model: embeddings, the scanned stack of decoder blocks, final norm,
untied lm_head (spec §7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.cache import Cache, write_rows
from minimax_jax.config import MiniMaxConfig
from minimax_jax.decoder import DecoderBlock
from minimax_jax.norm import RMSNorm
from minimax_jax.params import param


def _stacked_blocks(cfg: MiniMaxConfig, rngs: nnx.Rngs) -> DecoderBlock:
    """`cfg.num_blocks` DecoderBlocks with parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(cfg, rngs=r)

    return create(rngs)


def default_positions(mask: jax.Array, segment_ids: jax.Array | None, start: jax.Array) -> jax.Array:
    """RoPE positions `[B, T]` int32: start `[B]` + the number of real tokens before each token.

    With segment_ids, positions restart at 0 at every segment boundary. Padding tokens
    (mask 0) repeat their neighbour's position; they are never attended to.
    """
    if segment_ids is not None:
        t = jnp.arange(segment_ids.shape[1])
        boundary = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        seg_start = jax.lax.cummax(jnp.where(boundary, t, 0), axis=1)
        return (t - seg_start).astype(jnp.int32) + start[:, None]
    return start[:, None] + jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class MiniMaxForCausalLM(nnx.Module):
    """The MiniMax-Text-01 language model. Call it as `model(input_ids)` for float32 logits."""

    def __init__(self, cfg: MiniMaxConfig, *, rngs: nnx.Rngs):
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.config = cfg
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, stddev=std)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.norm = RMSNorm((cfg.hidden_size,), ("embed",), eps=cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, stddev=std)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids int32 `[B, T]` -> float32 logits `[B, T, V]`.

        segment_ids int32 `[B, T]` (packed documents never see each other) and attention_mask
        `[B, T]` (0 = padding) are optional; positions default to counting real tokens (per segment).
        """
        logits, _, _ = self.forward(
            input_ids, positions=positions, segment_ids=segment_ids, attention_mask=attention_mask
        )
        return logits

    def forward(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None, jax.Array]:
        """The full forward pass, optionally continuing from / writing to a cache.

        input_ids int32 `[B, T]`. With a cache, row b's chunk is appended after its `length[b]`
        slots (prefill, chunked prefill and decode are the same call); segment_ids need no cache.
        Returns (logits float32 `[B, T, V]`, the updated cache or None, router stats averaged
        over layers: {"aux_loss": float32 scalar, "expert_load": float32 `[E]`}).
        """
        cfg = self.config
        b, t = input_ids.shape
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with a cache (packed rows are for training)")
        mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        start = jnp.zeros((b,), jnp.int32) if cache is None else cache.next_position
        if positions is None:
            positions = default_positions(mask, segment_ids, start)

        idx_q = jnp.arange(t)
        if cache is None:
            visible = (idx_q[None, :] <= idx_q[:, None])[None] & mask[:, None, :]
            if segment_ids is not None:
                visible &= segment_ids[:, :, None] == segment_ids[:, None, :]
            kv_mask = None
        else:
            kv_mask = write_rows(cache.kv_mask, mask, cache.length)
            slots = jnp.arange(cache.max_length)
            last_visible = cache.length[:, None] + idx_q[None, :]  # [B, T]
            visible = (slots[None, None, :] <= last_visible[:, :, None]) & kv_mask[:, None, :]

        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(cfg.dtype)
        slopes = jnp.asarray(cfg.slopes()).reshape(cfg.num_blocks, len(cfg.block_pattern), -1)
        lin_mask = None if attention_mask is None else mask
        graphdef, block_params = nnx.split(self.blocks)

        def body(h, xs):
            params, block_slopes, state, key, value = xs
            block = nnx.merge(graphdef, params)
            kv = None if cache is None else (key, value, cache.page_table, cache.length)
            h, state, new_kv, stats = block(
                h, slopes=block_slopes, positions=positions, visible=visible, mask=lin_mask,
                segment_ids=segment_ids, lightning_state=state, kv_cache=kv,
            )
            key, value = (None, None) if new_kv is None else new_kv
            return h, (state, key, value, stats)

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        xs = (block_params, slopes, *(
            (None, None, None) if cache is None else (cache.lightning_state, cache.key, cache.value)
        ))
        h, (state, key, value, stats) = jax.lax.scan(body, h, xs)

        h = self.norm(h)
        logits = jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(cfg.dtype),
                            preferred_element_type=jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = Cache(
                lightning_state=state, key=key, value=value, page_table=cache.page_table,
                kv_mask=kv_mask, length=cache.length + t,
                next_position=cache.next_position + jnp.sum(mask, axis=1, dtype=jnp.int32),
            )
        return logits, new_cache, jax.tree.map(lambda x: jnp.mean(x, axis=(0, 1)), stats)
