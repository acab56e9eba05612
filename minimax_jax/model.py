"""MiniMax-01 causal language model: embeddings, the scanned stack of decoder blocks, final norm,
untied lm_head (spec §7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.cache import BlockCache, Cache
from minimax_jax.config import MiniMaxConfig
from minimax_jax.decoder import DecoderBlock
from minimax_jax.layout import TokenLayout, make_layout, zigzag_layout
from minimax_jax.norm import RMSNorm
from minimax_jax.params import param
from sharding.tokens import constrain_tokens, reorder_tokens, zigzag_shards


def _stacked_blocks(cfg: MiniMaxConfig, rngs: nnx.Rngs) -> DecoderBlock:
    """`cfg.num_blocks` DecoderBlocks with parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(cfg, rngs=r)

    return create(rngs)


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
    ) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
        """The full forward pass, optionally continuing from / writing to a cache.

        input_ids int32 `[B, T]`. With a cache, row b's chunk is appended after its `length[b]`
        slots (prefill, chunked prefill and decode are the same call); segment_ids need no cache.
        Returns (logits float32 `[B, T, V]`, the updated cache or None, router stats averaged
        over layers: {"aux_loss": float32 scalar, "expert_load": float32 `[E]`}).
        """
        h, cache, stats = self.hidden_states(input_ids, positions=positions, segment_ids=segment_ids,
                                             attention_mask=attention_mask, cache=cache)
        return self.logits(h), cache, stats

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
        """`forward` up to the final norm: (hidden states `[B, T, D]` in the compute dtype, the
        updated cache or None, router stats). `logits(h)` turns any slice of them into logits.

        Under a mesh whose sequence axis splits T into P > 1 shards (T a multiple of 2P, no
        cache) the blocks run in the zigzag token order, which balances the causal attention
        work over the shards: the tokens move into it once here and the hidden states back once
        at the end (`sharding.tokens.reorder_tokens`, each token crossing devices once).
        """
        b, t = input_ids.shape
        layout = make_layout(b, t, positions=positions, segment_ids=segment_ids,
                             attention_mask=attention_mask, cache=cache)
        if cache is not None or not zigzag_shards(t):
            return self.backbone(self.embed(input_ids), layout, cache)
        ids = reorder_tokens(input_ids, to_zigzag=True)
        h, _, stats = self.backbone(self.embed(ids), zigzag_layout(layout))
        return reorder_tokens(h, to_zigzag=False), None, stats

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids int32 `[B, T]` -> embeddings `[B, T, D]` in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.config.dtype)

    def backbone(self, h: jax.Array, layout: TokenLayout,
                 cache: Cache | None = None) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
        """The decoder stack and the final norm over embeddings h `[B, T, D]` laid out by `layout`
        (built with the same cache); under a mesh the blocks' inputs and outputs are held split
        over its batch and sequence axes. Returns (hidden states `[B, T, D]` in the compute dtype,
        the updated cache or None, router stats averaged over layers)."""
        cfg = self.config
        slopes = jnp.asarray(cfg.slopes()).reshape(cfg.num_blocks, len(cfg.block_pattern), -1)
        graphdef, block_params = nnx.split(self.blocks)

        def body(carry, xs):
            h, key, value = carry
            params, block_slopes, state, block = xs
            block_cache = None if cache is None else BlockCache(state, key, value, cache.page_table, block)
            h, block_cache, stats = nnx.merge(graphdef, params)(h, layout, block_cache,
                                                               slopes=block_slopes)
            h = constrain_tokens(h)
            if block_cache is None:
                return (h, None, None), (None, stats)
            return (h, block_cache.key, block_cache.value), (block_cache.lightning_state, stats)

        # the K/V pool rides in the carry, written in place; the lightning states are scanned
        pools = (None, None) if cache is None else (cache.key, cache.value)
        xs = (block_params, slopes, None if cache is None else cache.lightning_state,
              jnp.arange(cfg.num_blocks, dtype=jnp.int32))
        (h, key, value), (state, stats) = jax.lax.scan(body, (constrain_tokens(h), *pools), xs)
        new_cache = None
        if cache is not None:
            real = h.shape[1] if layout.valid is None else jnp.sum(layout.valid, axis=1, dtype=jnp.int32)
            new_cache = Cache(
                lightning_state=state, key=key, value=value, page_table=cache.page_table,
                kv_mask=layout.kv_valid, length=cache.length + h.shape[1],
                next_position=cache.next_position + real,
            )
        return self.norm(h), new_cache, jax.tree.map(lambda x: jnp.mean(x, axis=(0, 1)), stats)

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden states `[B, T, D]` (from `hidden_states`) -> float32 logits `[B, T, V]`."""
        return jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(self.config.dtype),
                          preferred_element_type=jnp.float32)
