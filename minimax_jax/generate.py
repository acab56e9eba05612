"""Sampling and the jitted prefill + decode loop (the oracle the server is tested against)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.cache import init_cache
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.sampling import filtered_logits
from minimax_jax.vision.model import MiniMaxVLForConditionalGeneration


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float,
                  top_k: int) -> jax.Array:
    """Pick one token per row from float32 logits `[B, V]` -> int32 `[B]`.

    temperature 0 is greedy (argmax). Otherwise logits / temperature, keep the top_k largest
    (top_k 0: all), keep the smallest set whose probability reaches top_p, then sample.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b = logits.shape[0]
    filtered = filtered_logits(logits, jnp.full((b,), temperature, jnp.float32),
                               jnp.full((b,), top_p, jnp.float32), jnp.full((b,), top_k, jnp.int32))
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "top_k")
)
def _generate(graphdef, state, input_ids, embeds, attention_mask, key, eos_token_id, *, max_new_tokens,
              temperature, top_p, top_k):
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    if embeds is None:
        h, text = input_ids, model
    else:  # a VL model: the prompt's embeddings hold the image tokens; decoding is the text model's
        h, text = embeds, model.language_model
    cache = init_cache(text.config, b, t + max_new_tokens)
    h, cache, _ = model.hidden_states(h, attention_mask=attention_mask, cache=cache)
    sample = functools.partial(sample_logits, temperature=temperature, top_p=top_p, top_k=top_k)

    def step(carry, step_key):
        logits, cache, done = carry
        token = sample(logits, step_key)
        token = jnp.where(done, eos_token_id, token)
        done = done | (token == eos_token_id)
        next_logits, cache, _ = text.forward(token[:, None], cache=cache)
        return (next_logits[:, -1], cache, done), token

    done = jnp.zeros((b,), jnp.bool_)
    keys = jax.random.split(key, max_new_tokens)
    _, tokens = jax.lax.scan(step, (text.logits(h[:, -1:])[:, 0], cache, done), keys)
    return tokens.T


def generate(
    model: MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | None = None,
    attention_mask: jax.Array | None = None,
    pixel_values: jax.Array | None = None,
    image_sizes: np.ndarray | None = None,
) -> jax.Array:
    """Generate `max_new_tokens` tokens after `input_ids` int32 `[B, T]` -> int32 `[B, max_new_tokens]`.

    Batches are left-padded: attention_mask `[B, T]` (1 = real token) marks padding on the left.
    After a row emits `eos_token_id`, the rest of that row is filled with `eos_token_id`.
    One jitted program: a prefill of the prompt, then a scanned single-token decode loop.
    A VL model takes images as its forward does (pixel_values float32 `[total crops, 3, S, S]`,
    host image_sizes `[n_images, 2]`, from `vision.preprocess`): their image tokens are computed
    first and written into the prompt's embeddings at its image-token positions.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
        )
    if isinstance(model, MiniMaxVLForConditionalGeneration):
        embeds = model.embed(input_ids, pixel_values, image_sizes)
    elif pixel_values is not None:
        raise ValueError("pixel_values need a VL model (MiniMaxVLForConditionalGeneration)")
    else:
        embeds = None
    graphdef, state = nnx.split(model)
    eos = jnp.int32(-1 if eos_token_id is None else eos_token_id)
    return _generate(
        graphdef, state, input_ids, embeds, jnp.asarray(attention_mask, jnp.int32), jax.random.key(seed),
        eos, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
        top_k=int(top_k),
    )
