"""MiniMax-VL-01 tiling and preprocessing on the released configuration: the grid choice against
transformers' `select_best_resolution`, the token count against the packed feature count (ours
and LLaVA-NeXT's packing with the released unpadding) over many sizes, and `preprocess` against
a direct PIL implementation of the released processor on real photographs (scikit-image's
bundled images) and synthetic odd sizes and modes; the full-size model checked abstractly."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import node_seed
from minimax_jax.checkpoint import param_shapes
from minimax_jax.config import MiniMaxConfig
from minimax_jax.hf_names import REMOTE
from minimax_jax.vision import MiniMaxVLConfig, image_token_count, preprocess
from minimax_jax.vision.anyres import best_resolution, num_crops, pack_image
from minimax_jax.vision.hf_names import vl_entries
from test_vision import floor_unpad

torch = pytest.importorskip("torch")
image_processing_utils = pytest.importorskip("transformers.image_processing_utils")
llava_next = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
skimage_data = pytest.importorskip("skimage.data")

ROOT = Path(__file__).resolve().parents[1]
CFG = MiniMaxVLConfig()
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# (height, width): tiny, thin, tall, wide, huge, exactly a grid, one pixel off a grid
SIZES = [(1, 1), (1, 5000), (5000, 1), (14, 14), (335, 337), (336, 336), (337, 335), (336, 672), (672, 336),
         (1008, 2016), (2016, 1008), (2015, 1009), (1080, 1920), (1920, 1080), (480, 640), (600, 800),
         (720, 1280), (2048, 2048), (2000, 300), (200, 3000), (10000, 10000), (99, 100), (100, 99),
         (1344, 1344), (1680, 1008), (3, 7000), (7000, 3)]


def random_sizes(rng: np.random.Generator, n: int, tileable: bool = False) -> list[tuple[int, int]]:
    """n sizes (height, width) with log-uniform sides in [1, 6000]; with `tileable`, only those
    whose short side stays >= 1 pixel when fitted to their grid."""
    out = []
    while len(out) < n:
        h, w = (int(x) for x in np.exp(rng.uniform(0, np.log(6000), 2)))
        gw, gh = best_resolution(CFG.vision, h, w)
        if not tileable or min(gw, int(gw * h / w)) >= 1 and min(gh, int(gh * w / h)) >= 1:
            out.append((h, w))
    return out


def test_token_count_of_released_examples():
    # spec minimax-vl-01 §6 (width x height -> tokens), and the largest: 1008 wide, 2016 tall
    examples = {(336, 336): 1176, (640, 480): 2340, (800, 600): 3696, (1000, 1000): 5832, (1280, 720): 5814,
                (1920, 1080): 9864, (1080, 1920): 9920, (2048, 2048): 9888, (300, 2000): 3888,
                (3000, 200): 2026, (1008, 2016): 11088}
    assert {wh: image_token_count(CFG, wh[1], wh[0]) for wh in examples} == examples


def test_best_grid_matches_transformers(rng):
    hw_pinpoints = [[h, w] for w, h in CFG.vision.image_grid_pinpoints]  # transformers reads (height, width)
    for h, w in SIZES + random_sizes(rng, 300):
        want_h, want_w = image_processing_utils.select_best_resolution((h, w), hw_pinpoints)
        assert best_resolution(CFG.vision, h, w) == (want_w, want_h), (h, w)


def test_token_count_equals_packed_features(rng):
    """image_token_count == our packed length == LLaVA-NeXT's packed length (released unpadding)."""
    packer = type("Packer", (), {})()
    packer.config = type("C", (), {"vision_config": CFG.vision, "image_grid_pinpoints":
                                   [[h, w] for w, h in CFG.vision.image_grid_pinpoints]})()
    original, llava_next.unpad_image = llava_next.unpad_image, floor_unpad
    counts = []
    try:
        for h, w in SIZES + random_sizes(rng, 60):
            n = num_crops(CFG.vision, h, w)
            ours = jax.eval_shape(lambda f, nl: pack_image(CFG.vision, f, nl, h, w), jax.ShapeDtypeStruct(
                (n, 576, 8), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.float32)).shape[0]
            theirs, _ = llava_next.LlavaNextModel.pack_image_features(
                packer, [torch.zeros(n, 576, 1)], torch.tensor([[h, w]]), "default", torch.zeros(1))
            counts.append(image_token_count(CFG, h, w))
            assert counts[-1] == ours == theirs[0].shape[0], (h, w)
    finally:
        llava_next.unpad_image = original
    assert max(counts) <= 11088  # an image 1 pixel high (1 x 5000) keeps no grid row: 576 tokens
    assert image_token_count(CFG, 1, 5000) == 576


def reference_preprocess(image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """The released processor written out directly (spec minimax-vl-01 §4), float64 arithmetic."""
    w, h = image.size
    best = None
    for gw, gh in CFG.vision.image_grid_pinpoints:
        s = min(gw / w, gh / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = gw * gh - eff
        if best is None or eff > best[0] or (eff == best[0] and waste < best[1]):
            best = (eff, waste, gw, gh)
    _, _, gw, gh = best
    canvas = Image.new("RGB", (gw, gh), (0, 0, 0))
    if w / h > gw / gh:
        nh = int(gw * h / w)
        canvas.paste(image.resize((gw, nh), resample=Image.BICUBIC), (0, (gh - nh) // 2))
    else:
        nw = int(gh * w / h)
        canvas.paste(image.resize((nw, gh), resample=Image.BICUBIC), ((gw - nw) // 2, 0))
    patches = [canvas.crop((x, y, x + 336, y + 336)) for y in range(0, gh, 336) for x in range(0, gw, 336)]
    patches.insert(0, image.resize((336, 336), resample=Image.BICUBIC))
    out = []
    for p in patches:
        x = np.array(p.convert("RGB"), np.float64) / 255.0
        out.append(np.stack([(x[..., c] - MEAN[c]) / STD[c] for c in range(3)]))
    return np.stack(out).astype(np.float32), (h, w)


def check_against_reference(images: list[Image.Image]) -> None:
    pixel_values, image_sizes = preprocess(CFG, images)
    refs = [reference_preprocess(im) for im in images]
    want = np.concatenate([r[0] for r in refs])
    assert pixel_values.dtype == np.float32 and image_sizes.dtype == np.int32
    assert image_sizes.tolist() == [list(r[1]) for r in refs]
    assert pixel_values.shape == want.shape
    # float32 (ours) against float64 arithmetic rounded once: |x| < 2.2, so a few float32 ulps
    np.testing.assert_allclose(pixel_values, want, rtol=0, atol=2e-6)


def test_preprocess_matches_released_processor_on_photographs():
    names = ["astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "page"]
    images = [Image.fromarray(getattr(skimage_data, n)()) for n in names]  # camera, page: mode L
    assert {im.mode for im in images} == {"RGB", "L"}
    check_against_reference(images)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_preprocess_matches_released_processor_on_odd_sizes(request, mode):
    rng = np.random.default_rng(node_seed(request))
    sizes = [(1, 1), (1, 700), (700, 1), (337, 335), (1009, 2017), (13, 999), *random_sizes(rng, 2, tileable=True)]
    images = []
    for h, w in sizes:
        pixels = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), np.uint8)
        im = Image.fromarray(pixels)
        images.append(im.convert(mode) if mode != "RGBA" else im)
    check_against_reference(images)


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match="image 1 has size 0x5"):
        preprocess(CFG, [Image.new("RGB", (3, 3)), Image.new("RGB", (0, 5))])
    with pytest.raises(ValueError, match="image 0 is a ndarray"):
        preprocess(CFG, [np.zeros((3, 3, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 0 of 5000x1 .* too elongated"):
        preprocess(CFG, [Image.new("RGB", (5000, 1))])
    with pytest.raises(ValueError, match="at least one image"):
        preprocess(CFG, [])


def test_full_vl_01_abstractly():
    """eval_shape of the released model: its 8,637 checkpoint tensors cover every param exactly."""
    entries = vl_entries(CFG, REMOTE)
    assert len(entries) == 8637
    shapes = param_shapes(CFG)
    hf_params = sum(math.prod(es[0].rule.hf_shape(CFG)) for es in entries.values())
    ours = sum(math.prod(s) for s in shapes.values())
    vision = sum(math.prod(s) for p, s in shapes.items() if p[0] == "vision_tower")
    projector = sum(math.prod(s) for p, s in shapes.items() if p[0] in ("multi_modal_projector", "image_newline"))
    print(f"MiniMax-VL-01: {ours:,} params ({vision:,} vision tower, {projector:,} projector + newline)")
    assert ours == hf_params
    assert vision == 24 * (4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024) \
        + 1024 * 3 * 14 * 14 + 1024 + 577 * 1024 + 2 * 1024
    assert projector == 1024 * 6144 + 6144 * 6144 + 3 * 6144


def test_vl_yaml_is_the_released_model():
    cfg = MiniMaxVLConfig.from_yaml(ROOT / "configs/minimax-vl-01.yaml")
    assert cfg == MiniMaxVLConfig(text=MiniMaxConfig.from_yaml(ROOT / "configs/minimax-text-01.yaml"))
    assert cfg.vision.image_grid_pinpoints[-1] == (2016, 1008) and len(cfg.vision.image_grid_pinpoints) == 28
    small = MiniMaxVLConfig.from_yaml(ROOT / "configs/minimax-vl-01.yaml", ["vision.num_hidden_layers=2", "hidden_size=128"])
    assert (small.vision.num_hidden_layers, small.text.hidden_size) == (2, 128)
