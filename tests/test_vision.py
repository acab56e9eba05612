"""MiniMax-VL-01 against an oracle assembled from transformers' components on tiny random
weights in float32: `CLIPVisionModel` (no post-layernorm applied, as released), a torch
projector, LLaVA-NeXT's packing (`pack_image_features`, its `unpad_image` replaced by the
released floor rule) and the native `MiniMaxForCausalLM`; the checkpoint is written in the
released layout (remote text names under `language_model.`, a `text_config` with only the
remote code's keys) and read by `load_model`.

The tiny tower (28 px crops of 7 px patches, 16 tokens per crop) tiles over the released 28
grids scaled by 28 / 336, so every tiling rule is exercised as released.
"""

from __future__ import annotations

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from conftest import FULL, LIN, node_seed
from minimax_jax import load_model
from minimax_jax.checkpoint import save_model
from minimax_jax.config import ConfigError
from minimax_jax.convert import hf_to_orbax, orbax_to_hf
from minimax_jax.generate import generate
from minimax_jax.vision import MiniMaxVLForConditionalGeneration, image_token_count, preprocess
from minimax_jax.vision.config import PINPOINTS_VL_01, MiniMaxVLConfig, VisionConfig
from minimax_jax.vision.anyres import num_crops
from minimax_jax.vision.vit import VisionTower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llava_next = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")

IMAGE_TOKEN = 5
TINY_PINPOINTS = [[w // 12, h // 12] for w, h in PINPOINTS_VL_01]  # released grids x 28 / 336
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=7, num_channels=3, layer_norm_eps=1e-5, projection_dim=64)
TEXT_HIDDEN = 64
# (height, width) of the test images: wide, tall, smaller than a crop, an exact grid
IMAGE_SIZES = [(40, 90), (100, 30), (20, 25), (56, 84)]


def floor_unpad(tensor, original_size):
    """The released unpadding (spec minimax-vl-01 §5) in place of LLaVA-NeXT's rounding one."""
    h, w = (int(x) for x in original_size)
    ch, cw = tensor.shape[1:]
    if w / h > cw / ch:
        pad = (ch - int(h * cw) // w) // 2
        return tensor[:, pad:ch - pad, :]
    pad = (cw - int(w * ch) // h) // 2
    return tensor[:, :, pad:cw - pad]


def remote_text_config(hf_text) -> dict:
    """The released `text_config`: the remote code's key names only."""
    c = hf_text.config
    return {
        "model_type": "minimax_text_01", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size, "num_local_experts": c.num_local_experts,
        "num_experts_per_tok": c.num_experts_per_tok, "rms_norm_eps": c.rms_norm_eps,
        "attn_type_list": [int(t == FULL) for t in c.layer_types], "rotary_dim": c.head_dim,
        "rope_theta": 1e4, "postnorm": True, "shared_intermediate_size": [0], "block_size": 16,
        "layernorm_linear_attention_alpha": 1.3, "layernorm_linear_attention_beta": 1.1,
        "layernorm_full_attention_alpha": 1.7, "layernorm_full_attention_beta": 0.9,
        "layernorm_mlp_alpha": 1.5, "layernorm_mlp_beta": 0.8, "hidden_act": "silu",
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }


class Oracle:
    """The reference VL-01 forward built from transformers' components (float32, CPU)."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_act="gelu", **VISION)).eval()
        self.linear_1 = torch.nn.Linear(VISION["hidden_size"], TEXT_HIDDEN)
        self.linear_2 = torch.nn.Linear(TEXT_HIDDEN, TEXT_HIDDEN)
        self.newline = torch.randn(TEXT_HIDDEN)
        config = transformers.MiniMaxConfig(
            vocab_size=128, hidden_size=TEXT_HIDDEN, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=96, num_local_experts=4,
            num_experts_per_tok=2, layer_types=[LIN, LIN, LIN, FULL] * 2, block_size=16,
            rope_parameters={"rope_theta": 1e4, "rope_type": "default"}, max_position_embeddings=4096,
            linear_attn_alpha_factor=1.3, linear_attn_beta_factor=1.1, full_attn_alpha_factor=1.7,
            full_attn_beta_factor=0.9, mlp_alpha_factor=1.5, mlp_beta_factor=0.8,
            tie_word_embeddings=False, initializer_range=0.05)
        self.text = transformers.MiniMaxForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in [*self.vision.named_parameters(), *self.text.named_parameters()]:
                if "norm" in name:  # random norm weights make a wrong wiring visible
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                elif "bias" in name:
                    p.copy_(0.1 * torch.randn_like(p))
        self.packer = types.SimpleNamespace(config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=VISION["image_size"], patch_size=VISION["patch_size"]),
            image_grid_pinpoints=[[h, w] for w, h in TINY_PINPOINTS]))  # LLaVA-NeXT reads (height, width)

    def crop_features(self, pixel_values: np.ndarray, layer: int = -1) -> torch.Tensor:
        """CLIP hidden states of `layer` without CLS, then the projector: `[N, 16, TEXT_HIDDEN]`."""
        out = self.vision(torch.from_numpy(pixel_values), output_hidden_states=True)
        feats = out.hidden_states[layer][:, 1:]
        return self.linear_2(torch.nn.functional.gelu(self.linear_1(feats)))

    def image_features(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> torch.Tensor:
        """LLaVA-NeXT's packing of each image's crops (released unpadding): `[tokens, TEXT_HIDDEN]`."""
        feats = self.crop_features(pixel_values)
        sizes = torch.from_numpy(image_sizes.astype(np.int64))
        counts = [llava_next.image_size_to_num_patches(s, self.packer.config.image_grid_pinpoints,
                                                       VISION["image_size"]) for s in sizes]
        original = llava_next.unpad_image
        llava_next.unpad_image = floor_unpad
        try:
            packed, _ = llava_next.LlavaNextModel.pack_image_features(
                self.packer, list(torch.split(feats, counts)), sizes, "default", self.newline)
        finally:
            llava_next.unpad_image = original
        return torch.cat(packed)

    def logits(self, ids: np.ndarray, pixel_values=None, image_sizes=None) -> np.ndarray:
        tokens = torch.from_numpy(ids.astype(np.int64))
        embeds = self.text.get_input_embeddings()(tokens)
        if pixel_values is not None:
            embeds = embeds.clone()
            embeds[tokens == IMAGE_TOKEN] = self.image_features(pixel_values, image_sizes)
        return self.text(inputs_embeds=embeds).logits.numpy()

    def save(self, path) -> None:
        """The released checkpoint layout and config.json."""
        tensors = {f"vision_tower.vision_model.{k}": v for k, v in self.vision.state_dict().items()
                   if not k.startswith("post_layernorm")}
        tensors.update({"multi_modal_projector.linear_1.weight": self.linear_1.weight,
                        "multi_modal_projector.linear_1.bias": self.linear_1.bias,
                        "multi_modal_projector.linear_2.weight": self.linear_2.weight,
                        "multi_modal_projector.linear_2.bias": self.linear_2.bias,
                        "image_newline": self.newline})
        self.text.save_pretrained(path / "text")
        for k, v in load_file(path / "text" / "model.safetensors").items():
            if not k.endswith(("slope_rate", "query_decay", "key_decay", "diagonal_decay")):
                tensors[f"language_model.{k}"] = v
        save_file({k: np.ascontiguousarray(v.detach().numpy() if torch.is_tensor(v) else v)
                   for k, v in tensors.items()}, path / "model.safetensors")
        config = {
            "architectures": ["MiniMaxVL01ForConditionalGeneration"], "model_type": "minimax_vl_01",
            "image_token_index": IMAGE_TOKEN, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default", "ignore_index": -100, "tie_word_embeddings": False,
            "image_grid_pinpoints": TINY_PINPOINTS,
            "vision_config": {"model_type": "clip_vision_model", "hidden_act": "gelu", **VISION},
            "text_config": remote_text_config(self.text),
        }
        (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    seed = node_seed(request)
    print(f"torch seed: {seed}")
    o = Oracle(seed)
    o.dir = tmp_path_factory.mktemp("vl-hf")
    o.save(o.dir)
    return o


@pytest.fixture(scope="module")
def model(oracle):
    return load_model(oracle.dir, dtype="float32")


@pytest.fixture(scope="module")
def inputs(request, model):
    """Pixel values and sizes of the four test images, and two rows of tokens holding their image
    tokens (row 0: image 0; row 1: images 1, 2, 3) among random text tokens."""
    seed = node_seed(request)
    print(f"numpy seed: {seed}")
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in IMAGE_SIZES]
    pixel_values, image_sizes = preprocess(model.config, images)
    counts = [image_token_count(model.config, h, w) for h, w in IMAGE_SIZES]
    rows = [[7] * 3 + [IMAGE_TOKEN] * counts[0] + [9] * 4,
            [8] + [IMAGE_TOKEN] * counts[1] + [10, 11] + [IMAGE_TOKEN] * counts[2] + [12]
            + [IMAGE_TOKEN] * counts[3] + [13, 14]]
    t = max(map(len, rows))
    ids = rng.integers(16, 128, (2, t)).astype(np.int32)
    for b, row in enumerate(rows):
        mask = np.array(row) == IMAGE_TOKEN
        ids[b, :len(row)] = np.where(mask, IMAGE_TOKEN, ids[b, :len(row)])
    return ids, pixel_values, image_sizes


def test_released_config_is_read(model):
    cfg = model.config
    assert isinstance(model, MiniMaxVLForConditionalGeneration) and isinstance(cfg, MiniMaxVLConfig)
    assert cfg.vision.image_grid_pinpoints == tuple(map(tuple, TINY_PINPOINTS))
    assert (cfg.text.linear_attn_alpha_factor, cfg.text.mlp_beta_factor, cfg.text.rotary_dim) == (1.3, 0.8, 16)
    assert cfg.text.layer_types == (LIN, LIN, LIN, FULL) * 2 and cfg.vision.image_token_index == IMAGE_TOKEN


@pytest.mark.parametrize("layer", [-1, -2])
def test_vision_tower_and_projector_match_clip(oracle, model, inputs, layer):
    _, pixel_values, _ = inputs
    tower = model.vision_tower
    if layer != -1:  # the same weights, features of another layer
        cfg = VisionConfig.from_dict({**model.config.vision.to_dict(), "vision_feature_layer": layer})
        tower = nnx.eval_shape(lambda: VisionTower(cfg, param_dtype=jnp.float32, dtype=jnp.float32, stddev=0.02,
                                                   rngs=nnx.Rngs(1)))
        nnx.update(tower, nnx.state(model.vision_tower, nnx.Param))
    with torch.no_grad():
        hidden = oracle.vision(torch.from_numpy(pixel_values), output_hidden_states=True).hidden_states[layer]
        want_proj = oracle.crop_features(pixel_values, layer).numpy()
    got = np.asarray(tower(jnp.asarray(pixel_values)))
    np.testing.assert_allclose(got, hidden[:, 1:].numpy(), rtol=1e-5, atol=1e-5)
    got_proj = np.asarray(model.multi_modal_projector(jnp.asarray(got)))
    np.testing.assert_allclose(got_proj, want_proj, rtol=1e-5, atol=1e-5)


def test_packed_features_match_llava_next_packing(oracle, model, inputs):
    _, pixel_values, image_sizes = inputs
    with torch.no_grad():
        want = oracle.image_features(pixel_values, image_sizes).numpy()
    got = np.asarray(model.image_features(jnp.asarray(pixel_values), image_sizes))
    assert got.shape == want.shape == (sum(image_token_count(model.config, h, w) for h, w in IMAGE_SIZES),
                                      TEXT_HIDDEN)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_vl_logits_match_oracle_fp32(oracle, model, inputs):
    ids, pixel_values, image_sizes = inputs
    with torch.no_grad():
        want = oracle.logits(ids, pixel_values, image_sizes)
    got = np.asarray(model(jnp.asarray(ids), pixel_values=jnp.asarray(pixel_values), image_sizes=image_sizes))
    diff = np.abs(got - want).max()
    print(f"VL fp32 logits max |diff| = {diff:.3e} (max |logit| {np.abs(want).max():.2f}), T = {ids.shape[1]}")
    assert got.dtype == np.float32 and got.shape == (*ids.shape, 128)
    assert np.abs(want).max() > 1.0
    assert diff <= 1e-4


def test_text_only_input_needs_no_images(oracle, model, inputs):
    ids = inputs[0][:, :40] % 100 + 20  # no image token
    with torch.no_grad():
        want = oracle.logits(ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=1e-4)


def test_image_token_mismatch_is_an_error(model, inputs):
    ids, pixel_values, image_sizes = inputs
    fewer = ids.copy()
    fewer[0, 3] = 7  # one image token less than the images make
    with pytest.raises(ValueError, match="image token"):
        model(jnp.asarray(fewer), pixel_values=jnp.asarray(pixel_values), image_sizes=image_sizes)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(jnp.asarray(ids))
    with pytest.raises(ValueError, match="crops"):
        model.image_features(jnp.asarray(pixel_values[1:]), image_sizes)


def test_hf_round_trip_is_bit_identical_and_loads(oracle, model, tmp_path):
    ckpt, back = tmp_path / "ours", tmp_path / "back"
    hf_to_orbax(oracle.dir, ckpt, progress=False)
    orbax_to_hf(ckpt, back, progress=False)
    src = load_file(oracle.dir / "model.safetensors")
    out = {}
    for f in back.glob("*.safetensors"):
        out.update(load_file(f))
    assert sorted(out) == sorted(src)
    for name, tensor in src.items():
        assert out[name].dtype == tensor.dtype and out[name].tobytes() == tensor.tobytes(), name
    assert MiniMaxVLConfig.from_hf_config(back) == MiniMaxVLConfig.from_hf_config(oracle.dir)
    assert_same_params(load_model(ckpt, dtype="float32"), model)  # the same params as the HF directory gives


def assert_same_params(got: MiniMaxVLForConditionalGeneration, want: MiniMaxVLForConditionalGeneration) -> None:
    assert isinstance(got, MiniMaxVLForConditionalGeneration) and got.config == want.config
    got_params = dict(nnx.to_flat_state(nnx.state(got, nnx.Param)))
    want_params = dict(nnx.to_flat_state(nnx.state(want, nnx.Param)))
    assert sorted(got_params) == sorted(want_params)
    for path, v in want_params.items():
        np.testing.assert_array_equal(np.asarray(got_params[path][...]), np.asarray(v[...]), err_msg=str(path))


def test_save_model_loads_back(model, tmp_path):
    assert_same_params(load_model(save_model(model, tmp_path / "saved"), dtype="float32"), model)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(projector_hidden_act="relu"), "projector_hidden_act='relu' is not supported"),
    (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "vision_config.hidden_act='quick_gelu'"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy='full'"),
    (lambda c: c["vision_config"].pop("num_hidden_layers"), r"vision_config lacks .*num_hidden_layers"),
    (lambda c: c["vision_config"].update(patch_size="seven"), "patch_size='seven' is not a valid int"),
    (lambda c: c.update(image_grid_pinpoints=[[336, 300]]), r"\[\(336, 300\)\] are not positive multiples"),
    (lambda c: c.update(image_token_index=500), "image_token_index=500 is outside the vocabulary"),
    (lambda c: c["text_config"].pop("attn_type_list"), "text_config: .*neither 'layer_types' nor 'attn_type_list'"),
    (lambda c: c.pop("vision_config"), "needs 'vision_config' and 'text_config'"),
])
def test_bad_vl_config_names_the_key(oracle, tmp_path, change, message):
    config = json.loads((oracle.dir / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        MiniMaxVLConfig.from_hf_config(config if "vision_config" in config else tmp_path)


def test_greedy_generation_with_images_matches_oracle(oracle, model, inputs):
    ids, pixel_values, image_sizes = inputs
    length = 3 + image_token_count(model.config, *IMAGE_SIZES[0]) + 4
    prompt, sizes = ids[:1, :length], image_sizes[:1]  # row 0: image 0 only
    crops = num_crops(model.config.vision, *map(int, sizes[0]))
    with torch.no_grad():
        tokens = torch.from_numpy(prompt.astype(np.int64))
        embeds = oracle.text.get_input_embeddings()(tokens).clone()
        embeds[tokens == IMAGE_TOKEN] = oracle.image_features(pixel_values[:crops], sizes)
        want = oracle.text.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(tokens), max_new_tokens=8,
                                    min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    got = generate(model, jnp.asarray(prompt), 8, pixel_values=jnp.asarray(pixel_values[:crops]), image_sizes=sizes)
    np.testing.assert_array_equal(np.asarray(got), want[:, -8:])
