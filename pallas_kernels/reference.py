"""Token-by-token lightning-attention recurrence (spec §3.4) and the one-token decode step (§8.1).

Per head, with decay ``lam = exp(-slope)`` and rows of the state indexed by the key dim:

    S_t = lam * S_{t-1} + k_t^T v_t,    o_t = q_t S_t.

The state is reset to zero before position t whenever ``segment_ids[t] != segment_ids[t-1]``.
This is the ground truth the block form and the kernels are tested against; it is O(T) sequential.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def state_dtype(*arrays: jax.Array) -> jnp.dtype:
    """float64 when any input is float64 (oracle runs), else float32."""
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def segment_starts(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """bool ``[B, T]``: True where the state is reset before the token (never at position 0)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.bool_)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), jnp.bool_), change], axis=1)


def decode_step(
    q: jax.Array, k: jax.Array, v: jax.Array, decay: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One recurrence step in the state's dtype.

    q, k, v ``[B, H, D]``; decay ``[H]`` (= exp(-slope)); state ``[B, H, D, D]``.
    Returns o ``[B, H, D]`` and the new state, both in the state's dtype.
    """
    dt = state.dtype
    k, v, q = k.astype(dt), v.astype(dt), q.astype(dt)
    new_state = decay[None, :, None, None].astype(dt) * state + jnp.einsum("bhk,bhv->bhkv", k, v)
    o = jnp.einsum("bhk,bhkv->bhv", q, new_state)
    return o, new_state


def lightning_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Recurrence with ``lax.scan`` over tokens.

    q, k, v ``[B, T, H, D]``; slopes ``[H]``; initial_state ``[B, H, D, D]``; segment_ids int ``[B, T]``
    or None. Returns o ``[B, T, H, D]`` in q's dtype and the final state ``[B, H, D, D]`` (float32, or
    float64 when an input is float64).
    """
    b, t = q.shape[:2]
    dt = state_dtype(q, k, v, initial_state)
    decay = jnp.exp(-slopes.astype(dt))
    starts = segment_starts(segment_ids, b, t)

    def step(state, xs):
        q_t, k_t, v_t, start_t = xs
        state = jnp.where(start_t[:, None, None, None], jnp.zeros_like(state), state)
        o_t, state = decode_step(q_t, k_t, v_t, decay, state)
        return state, o_t

    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), starts.T)
    final_state, o = lax.scan(step, initial_state.astype(dt), xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), final_state


def lightning_decode_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One decode token: q, k, v ``[B, H, D]``, slopes ``[H]``, state float32 ``[B, H, D, D]``.

    Returns o ``[B, H, D]`` in q's dtype and the new state float32 ``[B, H, D, D]`` (float64 when an
    input is float64).
    """
    dt = state_dtype(q, k, v, state)
    o, new_state = decode_step(q, k, v, jnp.exp(-slopes.astype(dt)), state.astype(dt))
    return o.astype(q.dtype), new_state


def softmax_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                                q_offset: jax.Array) -> jax.Array:
    """Causal GQA softmax attention with every score at once (the oracle; memory O(T * S)).

    q ``[B, T, H, K]``, k and v ``[B, S, N, K]``; key j is visible to query i of row b iff
    ``j <= i + q_offset[b]`` and the segment ids match. Scores scaled by 1/sqrt(K), softmax in
    float32 (float64 for float64 inputs). Returns ``[B, T, H, K]`` in q's dtype; 0 for a query
    that sees nothing.
    """
    b, t, h, kd = q.shape
    s, n = k.shape[1], k.shape[2]
    dt = state_dtype(q, k, v)
    vis = jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None] + q_offset[:, None, None]
    if q_segment_ids is not None:
        vis &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    qg = q.astype(dt).reshape(b, t, n, h // n, kd)
    scores = jnp.einsum("btngk,bsnk->bngts", qg, k.astype(dt)) * (kd ** -0.5)
    scores = jnp.where(vis[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(vis[:, None, None], jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0)), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1)
    out = jnp.einsum("bngts,bsnk->btngk", p, v.astype(dt))
    return out.reshape(b, t, h, kd).astype(q.dtype)
