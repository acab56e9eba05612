"""MiniMax-VL-01: the vision tower and projector turn each image's crops into image tokens
(`anyres.pack_image`), which replace the embeddings at the image-token positions of the text;
the MiniMax-Text-01 language model runs on the result (spec minimax-vl-01)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.cache import Cache
from minimax_jax.layout import make_layout
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.params import param
from minimax_jax.vision.anyres import image_token_count, num_crops, pack_image
from minimax_jax.vision.config import MiniMaxVLConfig
from minimax_jax.vision.projector import Projector
from minimax_jax.vision.vit import VisionTower


def image_sizes_list(image_sizes: np.ndarray | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Host image sizes `[n_images, 2]` (height, width) -> a list of int pairs; another shape is a
    ValueError."""
    sizes = np.asarray(image_sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"image_sizes must be integers [n_images, 2] (height, width), got "
                         f"{sizes.dtype}{list(sizes.shape)}")
    return [(int(h), int(w)) for h, w in sizes]


class MiniMaxVLForConditionalGeneration(nnx.Module):
    """MiniMax-VL-01. Call it as `model(input_ids, pixel_values=..., image_sizes=...)` for float32
    logits; `vision_tower`, `multi_modal_projector`, `image_newline` and `language_model` (a
    `MiniMaxForCausalLM`) mirror the checkpoint's names."""

    def __init__(self, cfg: MiniMaxVLConfig, *, rngs: nnx.Rngs):
        text = cfg.text
        pd, dt, std = jnp.dtype(text.param_dtype), jnp.dtype(text.dtype), text.initializer_range
        self.config = cfg
        self.vision_tower = VisionTower(cfg.vision, param_dtype=pd, dtype=dt, stddev=std, rngs=rngs)
        self.multi_modal_projector = Projector(cfg.vision.hidden_size, text.hidden_size, param_dtype=pd,
                                               stddev=std, rngs=rngs)
        self.image_newline = param(rngs, (text.hidden_size,), ("embed",), pd, stddev=std)
        self.language_model = MiniMaxForCausalLM(text, rngs=rngs)

    def crop_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float32 `[N, 3, S, S]` -> projected features `[N, P, Dt]` in the compute
        dtype (P = patches per crop)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def image_features(self, pixel_values: jax.Array, image_sizes: np.ndarray | Sequence[Sequence[int]], *,
                       crop_features: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """pixel_values `[total crops, 3, S, S]` (from `preprocess`) and host image_sizes
        `[n_images, 2]` (height, width) -> the image tokens of all images in order
        `[sum of image_token_count, Dt]` in the compute dtype. `crop_features` computes
        `self.crop_features` (e.g. a compiled form of it; default the method itself)."""
        vcfg = self.config.vision
        sizes = image_sizes_list(image_sizes)
        counts = [num_crops(vcfg, h, w) for h, w in sizes]
        if pixel_values.ndim != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, but image_sizes {sizes} "
                             f"need {sum(counts)} crops [N, 3, {vcfg.image_size}, {vcfg.image_size}]")
        feats = (crop_features or self.crop_features)(pixel_values)
        starts = np.cumsum([0] + counts)
        return jnp.concatenate([
            pack_image(vcfg, feats[starts[i]:starts[i + 1]], self.image_newline[...], h, w)
            for i, (h, w) in enumerate(sizes)
        ])

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              image_sizes: np.ndarray | Sequence[Sequence[int]] | None = None) -> jax.Array:
        """input_ids int32 `[B, T]` -> embeddings `[B, T, Dt]` in the compute dtype, with the image
        tokens of `pixel_values` / `image_sizes` (see `image_features`) written in order at the
        positions holding `image_token_index` (row-major over the batch). The number of such
        positions must equal the images' token count."""
        h = self.language_model.embed(input_ids)
        is_image = input_ids == self.config.vision.image_token_index
        want = int(jnp.sum(is_image))
        if pixel_values is None:
            if want:
                raise ValueError(f"input_ids hold {want} image token(s) but no pixel_values were given")
            return h
        if image_sizes is None:
            raise ValueError("pixel_values need image_sizes [n_images, 2] (height, width)")
        sizes = image_sizes_list(image_sizes)
        have = sum(image_token_count(self.config, hh, ww) for hh, ww in sizes)
        if want != have:
            raise ValueError(f"input_ids hold {want} image token(s) (id {self.config.vision.image_token_index}) "
                             f"but the images {sizes} (height, width) make {have}")
        return scatter_image_tokens(h, is_image, self.image_features(pixel_values, sizes))

    def __call__(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                 image_sizes: np.ndarray | Sequence[Sequence[int]] | None = None,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids int32 `[B, T]`, optional pixel_values float32 `[total crops, 3, S, S]` and
        image_sizes int `[n_images, 2]` (from `preprocess`), attention_mask `[B, T]` (0 = padding)
        -> float32 logits `[B, T, V]`."""
        logits, _, _ = self.forward(input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                                    attention_mask=attention_mask)
        return logits

    def forward(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                image_sizes: np.ndarray | Sequence[Sequence[int]] | None = None,
                attention_mask: jax.Array | None = None,
                cache: Cache | None = None) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
        """As `MiniMaxForCausalLM.forward`, with images: (logits float32 `[B, T, V]`, the updated
        cache or None, router stats)."""
        h, cache, stats = self.hidden_states(self.embed(input_ids, pixel_values, image_sizes),
                                             attention_mask=attention_mask, cache=cache)
        return self.language_model.logits(h), cache, stats

    def hidden_states(self, h: jax.Array, *, attention_mask: jax.Array | None = None,
                      cache: Cache | None = None) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
        """The language model over embeddings h `[B, T, Dt]` (from `embed`), the tokens in their
        contiguous order: (hidden states after the final norm `[B, T, Dt]`, the updated cache or
        None, router stats)."""
        layout = make_layout(*h.shape[:2], attention_mask=attention_mask, cache=cache)
        return self.language_model.backbone(h, layout, cache)


def scatter_image_tokens(h: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """h `[B, T, D]` with the rows of features `[N, D]` written in order (row-major over B, T) at
    the N positions where is_image `[B, T]` is True."""
    b, t, d = h.shape
    flat = is_image.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    return jnp.where(flat[:, None], features.astype(h.dtype)[index], h.reshape(-1, d)).reshape(b, t, d)


def text_model(model: MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration) -> MiniMaxForCausalLM:
    """The language model of a VL model, or the text model itself."""
    return model.language_model if isinstance(model, MiniMaxVLForConditionalGeneration) else model
