"""Configuration of MiniMax-VL-01: the CLIP-style vision tower, the image glue (image token,
tiling grids, feature layer) and the MiniMax-Text-01 language model (spec minimax-vl-01 §1).

`VisionConfig` holds the ViT architecture and the keys that tie images to text; `MiniMaxVLConfig`
pairs it with the text model's `MiniMaxConfig`. Both read the released `config.json` layout
(top-level keys, `vision_config`, `text_config` in the remote layout) and our YAML files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping

from minimax_jax.config import ConfigError, MiniMaxConfig, coerce_fields, parse_json, parse_overrides, read_yaml

VL_01 = "minimax_vl_01"
VL_ARCHITECTURE = "MiniMaxVL01ForConditionalGeneration"
# The released tiling grids, each (width, height) in pixels.
PINPOINTS_VL_01: tuple[tuple[int, int], ...] = (
    (336, 336), (336, 672), (336, 1008), (336, 1344), (336, 1680), (336, 2016),
    (672, 336), (672, 672), (672, 1008), (672, 1344), (672, 1680), (672, 2016),
    (1008, 336), (1008, 672), (1008, 1008), (1008, 1344), (1008, 1680), (1008, 2016),
    (1344, 336), (1344, 672), (1344, 1008), (1344, 1344),
    (1680, 336), (1680, 672), (1680, 1008),
    (2016, 336), (2016, 672), (2016, 1008),
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower (exact-GELU pre-LN ViT, class token, learned positions,
    `pre_layrnorm`, no post-layernorm) and how its features become image tokens.

    `vision_feature_layer` indexes the encoder's hidden states (0 = the embeddings after
    `pre_layrnorm`, -1 = the last layer's output); the CLS token is dropped ("default" strategy),
    leaving (image_size / patch_size)^2 tokens per crop. `image_grid_pinpoints` are the tiling
    grids as (width, height), each a multiple of `image_size`. `projection_dim` is carried for the
    HF round trip only (the model has no CLIP projection).
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    projection_dim: int = 6144
    vision_feature_layer: int = -1
    image_token_index: int = 200025
    image_grid_pinpoints: tuple[tuple[int, int], ...] = PINPOINTS_VL_01

    def __post_init__(self) -> None:
        try:
            grids = tuple((int(w), int(h)) for w, h in self.image_grid_pinpoints)
        except (TypeError, ValueError):
            raise ConfigError(f"image_grid_pinpoints must be a list of [width, height] pairs, got "
                              f"{str(self.image_grid_pinpoints)[:200]}") from None
        object.__setattr__(self, "image_grid_pinpoints", grids)
        if not grids:
            raise ConfigError("image_grid_pinpoints is empty")
        bad = [g for g in grids if min(g) <= 0 or g[0] % self.image_size or g[1] % self.image_size]
        if bad:
            raise ConfigError(f"image_grid_pinpoints {bad} are not positive multiples of image_size={self.image_size}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if not -self.num_hidden_layers - 1 <= self.vision_feature_layer <= self.num_hidden_layers:
            raise ConfigError(f"vision_feature_layer={self.vision_feature_layer} is outside "
                              f"[{-self.num_hidden_layers - 1}, {self.num_hidden_layers}]")

    @property
    def patches_per_side(self) -> int:
        """Patches along one side of a crop (24 for 336 / 14)."""
        return self.image_size // self.patch_size

    @property
    def feature_layers(self) -> int:
        """How many encoder layers run to reach `vision_feature_layer`."""
        n = self.vision_feature_layer
        return n if n >= 0 else self.num_hidden_layers + 1 + n

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VisionConfig":
        """Build from a mapping of field names; unknown keys are an error listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown vision config key(s) {unknown}; valid keys: {sorted(names)}")
        values = dict(values)
        grids = values.pop("image_grid_pinpoints", None)
        out = coerce_fields(cls, values)
        return cls(**out) if grids is None else cls(**out, image_grid_pinpoints=grids)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_grid_pinpoints"] = [list(g) for g in self.image_grid_pinpoints]
        return d


_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "num_channels", "layer_norm_eps", "projection_dim")
_FIXED = {"projector_hidden_act": "gelu", "vision_feature_select_strategy": "default"}


@dataclasses.dataclass(frozen=True)
class MiniMaxVLConfig:
    """MiniMax-VL-01: `text` (the MiniMax-Text-01 language model; its dtype and param_dtype are
    the whole model's) and `vision` (the tower, the projector's input width and the image glue).
    The projector maps vision.hidden_size -> text.hidden_size -> text.hidden_size."""

    text: MiniMaxConfig = dataclasses.field(default_factory=MiniMaxConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.vision.image_token_index < self.text.vocab_size:
            raise ConfigError(f"image_token_index={self.vision.image_token_index} is outside the "
                              f"vocabulary [0, {self.text.vocab_size})")

    @property
    def dtype(self) -> str:
        """The compute dtype of the whole model (the text model's)."""
        return self.text.dtype

    @property
    def num_hidden_layers(self) -> int:
        """The language model's layers."""
        return self.text.num_hidden_layers

    def replace(self, **changes: Any) -> "MiniMaxVLConfig":
        """A copy with text-model fields changed (dtype, param_dtype, ...)."""
        return dataclasses.replace(self, text=self.text.replace(**changes))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = ()) -> "MiniMaxVLConfig":
        """Read the `model:` (text) and `vision:` sections of a YAML file, then apply `key=value`
        overrides (`vision.KEY=value` for the vision section)."""
        raw = read_yaml(path)
        text, vision = raw.get("model"), raw.get("vision")
        if not isinstance(text, dict) or not isinstance(vision, dict):
            raise ConfigError(f"{path}: expected 'model:' and 'vision:' sections")
        overrides = list(overrides)
        vision_names = [f"vision.{f.name}" for f in dataclasses.fields(VisionConfig)]
        ours = parse_overrides([o for o in overrides if o.startswith("vision.")], vision_names)
        text_cfg = MiniMaxConfig.from_mapping(
            {**text, **parse_overrides([o for o in overrides if not o.startswith("vision.")],
                                       MiniMaxConfig.field_names())})
        try:
            return cls(text_cfg, VisionConfig.from_dict({**vision, **{k.removeprefix("vision."): v for k, v in ours.items()}}))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str | Path, **extra: Any) -> "MiniMaxVLConfig":
        """Read a VL `config.json` (dict or path): the top-level image keys, `vision_config` and
        `text_config` (either text layout, see `MiniMaxConfig.from_hf_config`; `extra` sets the
        text model's own fields such as dtype). A key that is missing or has an unsupported value
        is a ConfigError naming the file and the key."""
        where, hf = _read_json(hf)
        if not isinstance(hf.get("vision_config"), Mapping) or not isinstance(hf.get("text_config"), Mapping):
            raise ConfigError(f"{where}: a VL config needs 'vision_config' and 'text_config' objects")
        vc = hf["vision_config"]
        for key, want in (*_FIXED.items(), ("hidden_act", "gelu")):
            got = (vc if key == "hidden_act" else hf).get(key, want)
            if got != want:
                raise ConfigError(f"{where}: {'vision_config.' if key == 'hidden_act' else ''}{key}={got!r} "
                                  f"is not supported (only {want!r})")
        if hf.get("tie_word_embeddings"):
            raise ConfigError(f"{where}: tie_word_embeddings=true is not the VL-01 layout (lm_head is untied)")
        values = {k: vc[k] for k in _VISION_KEYS if k in vc}
        for key in ("vision_feature_layer", "image_token_index", "image_grid_pinpoints"):
            if key in hf:
                values[key] = hf[key]
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
                   if k not in vc]
        if missing:
            raise ConfigError(f"{where}: vision_config lacks required key(s) {missing}")
        try:
            vision = VisionConfig.from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            text = MiniMaxConfig.from_hf_config(hf["text_config"], **extra)
        except ConfigError as e:
            raise ConfigError(f"{where}: text_config: {e}") from None
        try:
            return cls(text, vision)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The released `config.json` layout: image keys on top, `vision_config`, `text_config`
        (`MiniMaxConfig.to_hf_config`, both text layouts' names)."""
        v = self.vision
        return {
            "architectures": [VL_ARCHITECTURE],
            "model_type": VL_01,
            "image_token_index": v.image_token_index,
            "image_grid_pinpoints": [list(g) for g in v.image_grid_pinpoints],
            "vision_feature_layer": v.vision_feature_layer,
            **_FIXED,
            "ignore_index": -100,
            "tie_word_embeddings": False,
            "torch_dtype": self.text.param_dtype,
            "vision_config": {"model_type": "clip_vision_model", "hidden_act": "gelu",
                              **{k: getattr(v, k) for k in _VISION_KEYS}},
            "text_config": self.text.to_hf_config(),
        }


def _read_json(hf: Mapping[str, Any] | str | Path) -> tuple[str, Mapping[str, Any]]:
    """(where, the config mapping) of a dict, a `config.json` or a directory holding one."""
    if isinstance(hf, Mapping):
        return "HF config", hf
    p = Path(hf)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"missing config: {p} does not exist")
    data = parse_json(p.read_bytes(), p)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: expected a JSON object at the top level")
    return str(p), data


def is_vl_config(hf: Mapping[str, Any] | str | Path) -> bool:
    """True if an HF `config.json` (dict, file or directory) describes a VL model (its model_type
    is minimax_vl_01 or it has a `vision_config`)."""
    _, data = _read_json(hf)
    return data.get("model_type") == VL_01 or "vision_config" in data


def read_model_config(path: str | Path, **extra: Any) -> MiniMaxConfig | MiniMaxVLConfig:
    """The config of the checkpoint directory `path`: a `MiniMaxVLConfig` for a VL model, else a
    `MiniMaxConfig`; `extra` sets the text model's own fields (dtype, param_dtype, ...)."""
    if is_vl_config(path):
        return MiniMaxVLConfig.from_hf_config(path, **extra)
    return MiniMaxConfig.from_hf_config(path, **extra)
