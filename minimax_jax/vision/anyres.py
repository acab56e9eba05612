"""Dynamic-resolution tiling of MiniMax-VL-01 (spec minimax-vl-01 §4-§6): the best grid for an
image, the unpadding of the crops' patch grid, the packing of one image's features (thumbnail
first, then the unpadded grid with a learned newline after each row) and the token count.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from minimax_jax.vision.config import MiniMaxVLConfig, VisionConfig


def best_resolution(cfg: VisionConfig, height: int, width: int) -> tuple[int, int]:
    """The grid (W, H) in pixels among `cfg.image_grid_pinpoints` for an image of (height, width):
    the largest effective resolution min(int(w s) int(h s), w h), s = min(W / w, H / h), ties to
    the least wasted area W H - effective, remaining ties to the first in list order."""
    _check_size(height, width)
    best, best_key = None, None
    for grid_w, grid_h in cfg.image_grid_pinpoints:
        s = min(grid_w / width, grid_h / height)
        effective = min(int(width * s) * int(height * s), width * height)
        key = (effective, -(grid_w * grid_h - effective))
        if best_key is None or key > best_key:
            best, best_key = (grid_w, grid_h), key
    return best


def crop_grid(cfg: VisionConfig, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of image_size crops the image of (height, width) is tiled into."""
    grid_w, grid_h = best_resolution(cfg, height, width)
    return grid_h // cfg.image_size, grid_w // cfg.image_size


def num_crops(cfg: VisionConfig, height: int, width: int) -> int:
    """Crops of one image in `pixel_values`: the thumbnail plus rows x columns."""
    rows, cols = crop_grid(cfg, height, width)
    return 1 + rows * cols


def unpad_window(cfg: VisionConfig, height: int, width: int) -> tuple[slice, slice]:
    """(rows, columns) of the crops' joint patch grid that hold the image rather than its black
    padding (the released floor rule: nh = int(h * cw) // w, pad = (ch - nh) // 2 on each side)."""
    rows, cols = crop_grid(cfg, height, width)
    ch, cw = rows * cfg.patches_per_side, cols * cfg.patches_per_side
    if width / height > cw / ch:
        pad = (ch - int(height * cw) // width) // 2
        return slice(pad, ch - pad), slice(0, cw)
    pad = (cw - int(width * ch) // height) // 2
    return slice(0, ch), slice(pad, cw - pad)


def image_token_count(config: MiniMaxVLConfig | VisionConfig, height: int, width: int) -> int:
    """The number of image tokens (id `image_token_index`) an image of (height, width) pixels
    becomes: 576 thumbnail tokens + h_num * (w_num + 1) for the unpadded grid and its newlines
    (spec minimax-vl-01 §6)."""
    cfg = config.vision if isinstance(config, MiniMaxVLConfig) else config
    grid_w, grid_h = best_resolution(cfg, height, width)
    cw, ch = grid_w // cfg.patch_size, grid_h // cfg.patch_size
    if width / height > cw / ch:
        w_num, h_num = cw, ch - 2 * ((ch - int(height * cw / width)) // 2)
    else:
        h_num, w_num = ch, cw - 2 * ((cw - int(width * ch / height)) // 2)
    return cfg.patches_per_side ** 2 + h_num * (w_num + 1)


def pack_image(cfg: VisionConfig, features: jax.Array, newline: jax.Array, height: int, width: int) -> jax.Array:
    """One image's projected crop features `[1 + rows * cols, P, D]` (thumbnail first, crops row
    major, P = patches_per_side^2) and the newline vector `[D]` -> its image tokens
    `[image_token_count, D]`: the thumbnail's P tokens, then the unpadded patch grid row by row,
    each row followed by the newline."""
    rows, cols = crop_grid(cfg, height, width)
    g, d = cfg.patches_per_side, features.shape[-1]
    if features.shape[:2] != (1 + rows * cols, g * g):
        raise ValueError(f"an image of {height}x{width} needs features [{1 + rows * cols}, {g * g}, D], "
                         f"got {tuple(features.shape)}")
    grid = features[1:].reshape(rows, cols, g, g, d).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    row_window, col_window = unpad_window(cfg, height, width)
    grid = grid[row_window, col_window]
    lines = jnp.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, d))
    grid = jnp.concatenate([grid, lines], axis=1).reshape(-1, d)
    return jnp.concatenate([features[0], grid], axis=0)


def _check_size(height: int, width: int) -> None:
    """Raise a ValueError unless (height, width) are positive integers."""
    ints = all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (height, width))
    if not ints or height < 1 or width < 1:
        raise ValueError(f"image size must be positive integers (height, width), got ({height!r}, {width!r})")
