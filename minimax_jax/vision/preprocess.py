"""Image preprocessing of MiniMax-VL-01, as the released image processor does it (spec
minimax-vl-01 §4): PIL bicubic resizes with floor rounding, black padding, 336 x 336 crops in
row-major order after a squashed 336 x 336 thumbnail, CLIP mean and std."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from minimax_jax.vision.anyres import best_resolution
from minimax_jax.vision.config import MiniMaxVLConfig

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def fitted_size(width: int, height: int, grid_w: int, grid_h: int) -> tuple[int, int]:
    """(width, height) of an image of (width, height) resized to fit (grid_w, grid_h) with its
    aspect kept, the side that does not fill the grid floored."""
    if width / height > grid_w / grid_h:
        return grid_w, int(grid_w * height / width)
    return int(grid_h * width / height), grid_h


def resize_and_pad(image: Image.Image, grid_w: int, grid_h: int) -> Image.Image:
    """`image` resized (bicubic, `fitted_size`) into a black RGB canvas of (grid_w, grid_h),
    centred along the padded side."""
    new_w, new_h = fitted_size(*image.size, grid_w, grid_h)
    canvas = Image.new("RGB", (grid_w, grid_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((grid_w - new_w) // 2, (grid_h - new_h) // 2))
    return canvas


def normalize(crop: Image.Image) -> np.ndarray:
    """A crop -> float32 `[3, S, S]`: RGB / 255, minus the CLIP mean, over the CLIP std."""
    x = np.asarray(crop.convert("RGB"), np.float32) / np.float32(255.0)
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def image_crops(config: MiniMaxVLConfig, image: Image.Image) -> np.ndarray:
    """One PIL image -> float32 `[1 + rows * cols, 3, S, S]`: the thumbnail, then the crops of its
    best grid in row-major order (S = image_size)."""
    cfg, s = config.vision, config.vision.image_size
    w, h = image.size
    grid_w, grid_h = best_resolution(cfg, h, w)
    canvas = np.asarray(resize_and_pad(image, grid_w, grid_h))
    crops = [normalize(image.resize((s, s), Image.BICUBIC))]
    for top in range(0, grid_h, s):
        for left in range(0, grid_w, s):
            crops.append(normalize(Image.fromarray(canvas[top:top + s, left:left + s])))
    return np.stack(crops)


def preprocess(config: MiniMaxVLConfig, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """PIL images (any sizes, any mode PIL converts to RGB) -> (pixel_values float32
    `[total crops, 3, S, S]`, each image's thumbnail then crops in order; image_sizes int32
    `[n_images, 2]` as (height, width)). `config` is the VL model's `model.config`. An empty
    image, one so elongated that its short side would fit its grid in 0 pixels, or something
    that is not a PIL image, is a ValueError naming its index."""
    if not isinstance(config, MiniMaxVLConfig):
        raise TypeError(f"preprocess needs the VL model's config (MiniMaxVLConfig), got {type(config).__name__}")
    crops, sizes = [], []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {i} is a {type(image).__name__}, not a PIL image")
        w, h = image.size
        if w < 1 or h < 1:
            raise ValueError(f"image {i} has size {w}x{h} (width x height): it is empty")
        grid_w, grid_h = best_resolution(config.vision, h, w)
        if min(fitted_size(w, h, grid_w, grid_h)) < 1:
            raise ValueError(f"image {i} of {w}x{h} (width x height) is too elongated: fitted to its "
                             f"{grid_w}x{grid_h} grid, its short side would be 0 pixels")
        crops.append(image_crops(config, image))
        sizes.append((h, w))
    if not crops:
        raise ValueError("preprocess needs at least one image")
    return np.concatenate(crops), np.asarray(sizes, np.int32)
