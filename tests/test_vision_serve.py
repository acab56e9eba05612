"""A tiny VL model served on loopback: a chat request with image parts (read through the chunked
prefill, the image tokens spanning chunks) answers what `generate` gives on the same inputs;
http URLs and bad images get a 400 that says why."""

from __future__ import annotations

import base64
import concurrent.futures
import io

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import live_server, node_seed
from minimax_jax import MiniMaxConfig
from minimax_jax.generate import generate
from minimax_jax.serving.chat import ChatTemplate
from minimax_jax.vision import MiniMaxVLConfig, MiniMaxVLForConditionalGeneration, VisionConfig, image_token_count
from minimax_jax.vision.config import PINPOINTS_VL_01
from minimax_jax.vision.preprocess import preprocess
from test_serve_api import NoEosTokenizer

MODEL, IMAGE_TOKEN = "tiny-vl", 260  # an id the byte tokenizer never produces
VISION = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                      patch_size=7, image_token_index=IMAGE_TOKEN,
                      image_grid_pinpoints=[(w // 12, h // 12) for w, h in PINPOINTS_VL_01])


@pytest.fixture(scope="module")
def served():
    cfg = MiniMaxVLConfig(MiniMaxConfig.from_yaml("configs/tiny.yaml"), VISION)
    model = MiniMaxVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    with live_server(model, NoEosTokenizer(), model_name=MODEL, max_batch=2, max_context=512,
                     prefill_chunk=16) as s:
        s.model = model
        yield s


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat(served, content, max_tokens: int = 6) -> httpx.Response:
    return httpx.post(served.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "system", "content": "Describe images."}, {"role": "user", "content": content}]})


def test_image_chat_equals_generate(served, request):
    rng = np.random.default_rng(node_seed(request))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in ((40, 90), (60, 30))]
    content = [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": data_url(images[0])}},
               {"type": "text", "text": " and "}, {"type": "image", "image": data_url(images[1], "JPEG")}]
    r = chat(served, content)
    assert r.status_code == 200, r.text
    # the same prompt built by hand: the Text-01 chat format, each <image> expanded to its tokens
    decoded = [Image.open(io.BytesIO(base64.b64decode(data_url(im, f).split(",")[1]))) for im, f in
               zip(images, ("PNG", "JPEG"))]
    text = ChatTemplate().render([{"role": "system", "content": "Describe images."},
                                  {"role": "user", "content": "Compare <image> and <image>"}])
    tok = NoEosTokenizer()
    before, middle, after = (tok.encode(t) for t in text.split("<image>"))
    counts = [image_token_count(served.model.config, im.height, im.width) for im in decoded]
    ids = before + [IMAGE_TOKEN] * counts[0] + middle + [IMAGE_TOKEN] * counts[1] + after
    pixel_values, image_sizes = preprocess(served.model.config, decoded)
    want = generate(served.model, jnp.asarray([ids]), 6, pixel_values=jnp.asarray(pixel_values),
                    image_sizes=image_sizes)
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(ids) and len(ids) > 3 * 16  # several prefill chunks
    assert body["choices"][0]["message"]["content"] == tok.decode(np.asarray(want)[0].tolist())


def bad_request(served, url: str) -> str:
    r = chat(served, [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}])
    assert r.status_code == 400, r.text
    return r.json()["error"]["message"]


def test_bad_images_are_400_saying_why(served):
    assert "not fetched" in bad_request(served, "https://example.com/cat.png")
    assert "not a base64 data URL" in bad_request(served, "data:image/png,rawbytes")
    assert "invalid base64" in bad_request(served, "data:image/png;base64,@@@")
    assert "not an image" in bad_request(served, "data:image/png;base64," + base64.b64encode(b"hello").decode())
    png = data_url(Image.new("RGB", (50, 40), (200, 10, 10)))
    truncated = png[:len(png) // 2]
    truncated += "=" * (-len(truncated.split(",")[1]) % 4)
    assert "could not be decoded" in bad_request(served, truncated)
    assert "more than the" in bad_request(served, data_url(Image.new("1", (9000, 9000))))
    assert "too elongated" in bad_request(served, data_url(Image.new("RGB", (3000, 1))))
    assert "media type 'text/plain'" in bad_request(served, "data:text/plain;base64,aGk=")
    r = chat(served, "a literal <image> with no image")
    assert r.status_code == 400 and "1 <image> placeholder(s) for 0 image(s)" in r.json()["error"]["message"]


def test_concurrent_image_and_text_requests_answer_as_alone(served, request):
    """An image request and a text request read side by side (one prefill step holding an image
    row and a text row) answer as each does alone."""
    rng = np.random.default_rng(node_seed(request))
    image = Image.fromarray(rng.integers(0, 256, (70, 50, 3), np.uint8))
    contents = [[{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "What?"}],
                "Tell me a long story about a lighthouse keeper " * 8]  # ~25 prefill chunks: the two overlap
    alone = [chat(served, c).json()["choices"][0]["message"]["content"] for c in contents]
    steps, shared = served.engine.steps, []
    prefill = steps.prefill

    def watched(rows, tokens, mask, active, sampling, targets=None, images=None):
        shared.append(images is not None and int(np.sum(active)) == 2)
        return prefill(rows, tokens, mask, active, sampling, targets, images)

    steps.prefill = watched
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda c: chat(served, c).json()["choices"][0]["message"]["content"],
                                     contents))
    finally:
        del steps.prefill
    assert any(shared), "the two prompts never shared a prefill step"
    assert together == alone


def test_the_vision_step_compiles_once_per_crop_bucket(served, request):
    """The vision tower runs compiled with its crops padded to a power of two: requests of
    images making different numbers of crops compile at most one program per bucket, and asking
    again compiles nothing."""
    rng = np.random.default_rng(node_seed(request))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in ((28, 28), (40, 90), (90, 40))]
    crops = [preprocess(served.model.config, [image])[0].shape[0] for image in images]
    buckets = {1 << (n - 1).bit_length() for n in crops}
    steps = served.engine.steps
    sizes = [steps._crop_features._cache_size()]
    for _ in range(2):
        for image in images:
            r = chat(served, [{"type": "image_url", "image_url": {"url": data_url(image)}}], max_tokens=1)
            assert r.status_code == 200, r.text
        sizes.append(steps._crop_features._cache_size())
    assert len(set(crops)) > 1 and sizes[1] - sizes[0] <= len(buckets) and sizes[2] == sizes[1], (crops, sizes)
