"""Images in chat requests for a VL model: data URLs decoded and checked (the server fetches
nothing), and the prompt's `<image>` placeholders expanded into the image tokens of each image
(spec minimax-vl-01 §6-§7)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
import warnings

import numpy as np
from PIL import Image

from minimax_jax.vision import MiniMaxVLConfig, image_token_count, preprocess

IMAGE_PLACEHOLDER = "<image>"  # an image part in the rendered chat prompt
MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused (decompression bombs included)
MAX_IMAGE_BYTES = 32 << 20  # of one decoded data URL
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.S)


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """The images of one prompt, preprocessed: pixel_values float32 `[total crops, 3, S, S]` and
    image_sizes int32 `[n_images, 2]` (height, width), as `vision.preprocess` gives them."""

    pixel_values: np.ndarray
    image_sizes: np.ndarray


def decode_data_url(url: str) -> Image.Image:
    """A `data:image/...;base64,...` URL -> the decoded RGB-convertible PIL image, fully loaded.
    Anything else (an http(s) URL, bad base64, not an image, a truncated or empty image, more than
    MAX_IMAGE_PIXELS pixels) is a ValueError saying why."""
    if re.match(r"(?i)^(https?|ftp|file):", url):
        raise ValueError("image URLs are not fetched; send the image inline as a data URL "
                         "(data:image/png;base64,...)")
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ValueError("is not a base64 data URL (data:image/<type>;base64,<data>)")
    if match["mime"] and not match["mime"].lower().startswith("image/"):
        raise ValueError(f"has media type {match['mime']!r}, not an image")
    if len(match["data"]) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        raw = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("holds invalid base64 data") from None
    return open_image(raw)


def open_image(raw: bytes) -> Image.Image:
    """Image file bytes -> the loaded PIL image; not an image, truncated, empty or more than
    MAX_IMAGE_PIXELS pixels is a ValueError saying which."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            w, h = image.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"has {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"has more pixels than the {MAX_IMAGE_PIXELS:,} allowed") from None
    except Image.UnidentifiedImageError:
        raise ValueError("is not an image in a format this server reads (PNG, JPEG, GIF, WebP, ...)") from None
    except OSError as e:  # truncated or corrupt data
        raise ValueError(f"could not be decoded: {e}") from None
    if min(image.size) < 1:
        raise ValueError(f"is empty ({image.size[0]}x{image.size[1]} pixels)")
    return image


def expand_prompt(config: MiniMaxVLConfig, pieces: list[list[int]], images: list[Image.Image]
                  ) -> tuple[list[int], ImageInput | None]:
    """The token ids of the rendered prompt's text between its image placeholders (`pieces`,
    one more than `images`) -> (the prompt ids with each image's `image_token_count` image tokens
    in its place, the preprocessed images or None without any). A placeholder count that does not
    match the images, or an image `preprocess` refuses, is a ValueError."""
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) for "
                         f"{len(images)} image(s)")
    if not images:
        return pieces[0], None
    pixel_values, image_sizes = preprocess(config, images)
    ids = list(pieces[0])
    for (h, w), piece in zip(image_sizes.tolist(), pieces[1:]):
        ids += [config.vision.image_token_index] * image_token_count(config, h, w) + piece
    return ids, ImageInput(pixel_values, image_sizes)
