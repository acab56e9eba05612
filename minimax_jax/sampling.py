"""Logit filtering shared by `generate` and the serving engine: temperature, top_k, top_p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                    top_k: jax.Array) -> jax.Array:
    """float32 logits `[B, V]` / temperature, outside each row's top_k and top_p set -> -inf-like.

    Per row: keep the top_k largest (0: all), then the smallest set whose probability reaches
    top_p (the top token always stays). temperature 0 rows are left unscaled (callers take argmax).
    """
    v = logits.shape[-1]
    neg = jnp.finfo(jnp.float32).min
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(jnp.arange(v)[None, :] < k[:, None], ordered, neg)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(mass_before < top_p[:, None], axis=-1, keepdims=True) - 1
    cutoff = jnp.maximum(jnp.take_along_axis(ordered, cutoff_idx, axis=-1), kth)
    return jnp.where(scaled < cutoff, neg, scaled)
