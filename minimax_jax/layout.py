"""The token layout of one forward pass: where every token sits and what it may see.

Built once per forward from the call's positions, segment ids, attention mask and cache; every
attention op derives its own mask per block from it. No `[T, S]` array exists anywhere.

Documents are maximal runs of equal segment ids: the lightning state resets where the id changes,
and a softmax query sees only earlier keys of its own run. Padding keys (attention_mask 0) are
seen by no query.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from minimax_jax.cache import Cache, write_rows
from pallas_kernels.reference import segment_starts
from sharding.tokens import reorder_tokens

PADDING = -1  # the segment id of a key no query sees


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenLayout:
    """positions int32 `[B, T]`: RoPE positions. valid bool `[B, T]` or None (all real): False on
    padding. segment_ids int32 `[B, T]` or None (one document per row): the run index of each
    token's document, non-decreasing along a row (the lightning layers reset there).
    q_segment_ids `[B, T]` and kv_segment_ids int32 `[B, S]`, or both None (every key before a
    query is visible): the softmax layers' segment ids of queries and key slots (PADDING where no
    query may see the key); S = T without a cache, the cache's slots with one. cache_length int32
    `[B]` or None (no cache): slots of the row written before this chunk; query i sits at key slot
    cache_length + i. kv_valid bool `[B, S]` or None: the cache's slots that hold a real token once
    this chunk is written. zigzag: the tokens (and every `[B, T]` field) are in the current mesh's
    zigzag order (`sharding.tokens`), which the attention ops are told.
    """

    positions: jax.Array
    valid: jax.Array | None
    segment_ids: jax.Array | None
    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None
    cache_length: jax.Array | None
    kv_valid: jax.Array | None
    zigzag: bool = dataclasses.field(default=False, metadata=dict(static=True))


def document_runs(segment_ids: jax.Array) -> jax.Array:
    """int32 `[B, T]`: 0, 1, 2, ... counting the runs of equal ids along each row."""
    return jnp.cumsum(segment_starts(segment_ids, *segment_ids.shape), axis=1, dtype=jnp.int32)


def default_positions(valid: jax.Array, runs: jax.Array | None, start: jax.Array) -> jax.Array:
    """RoPE positions `[B, T]` int32: start `[B]` + the number of real tokens before each token.

    With document runs `[B, T]`, positions restart at 0 at every run. Padding tokens repeat their
    neighbour's position; they are never attended to.
    """
    if runs is not None:
        t = jnp.arange(runs.shape[1])
        seg_start = jax.lax.cummax(jnp.where(segment_starts(runs, *runs.shape), t, 0), axis=1)
        return (t - seg_start).astype(jnp.int32) + start[:, None]
    return start[:, None] + jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def make_layout(batch: int, length: int, *, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                cache: Cache | None = None) -> TokenLayout:
    """The layout of a `[batch, length]` chunk of tokens.

    segment_ids int `[B, T]` (packed documents) cannot be combined with a cache; attention_mask
    `[B, T]` (0 = padding); positions int `[B, T]` default to counting real tokens (per document),
    continuing from the cache's next position.
    """
    for name, x in (("positions", positions), ("segment_ids", segment_ids),
                    ("attention_mask", attention_mask)):
        if x is not None and tuple(x.shape) != (batch, length):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({batch}, {length})")
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids cannot be combined with a cache (packed rows are for training)")
    valid = None if attention_mask is None else attention_mask.astype(jnp.bool_)
    runs = None if segment_ids is None else document_runs(segment_ids)
    if positions is None:
        start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.next_position
        ones = jnp.ones((batch, length), jnp.bool_)
        positions = default_positions(ones if valid is None else valid, runs, start)
    positions = positions.astype(jnp.int32)
    if cache is None:
        if valid is None:
            return TokenLayout(positions, valid, runs, runs, runs, None, None)
        q_seg = jnp.zeros((batch, length), jnp.int32) if runs is None else runs
        return TokenLayout(positions, valid, runs, q_seg, jnp.where(valid, q_seg, PADDING), None, None)
    chunk_valid = jnp.ones((batch, length), jnp.bool_) if valid is None else valid
    kv_valid = write_rows(cache.kv_mask, chunk_valid, cache.length)
    return TokenLayout(
        positions, valid, None, jnp.zeros((batch, length), jnp.int32),
        jnp.where(kv_valid, 0, PADDING).astype(jnp.int32), cache.length, kv_valid)


def zigzag_layout(layout: TokenLayout) -> TokenLayout:
    """A layout without a cache, its `[B, T]` fields moved into the current mesh's zigzag order
    (`sharding.tokens.reorder_tokens`)."""
    if layout.cache_length is not None:
        raise ValueError("the zigzag token order is for chunks without a cache")
    move = lambda x: None if x is None else reorder_tokens(x, to_zigzag=True)
    return TokenLayout(move(layout.positions), move(layout.valid), move(layout.segment_ids),
                       move(layout.q_segment_ids), move(layout.kv_segment_ids), None, None,
                       zigzag=True)
