"""HF names of MiniMax-VL-01 (spec minimax-vl-01 §2) -> our params, both directions, as rules of
the text model's table (`minimax_jax.hf_names.Rule`).

The text model's tensors are its own names under `language_model.` (either text layout), our
params under `language_model`; the vision tower's layers are stacked on a leading axis, so layer
l's tensors fill block `[l]` of the stacked params.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from minimax_jax.config import MiniMaxConfig
from minimax_jax.hf_names import Entry, Rule, ShapeFn, detect_layout, expected_entries, our_path
from minimax_jax.vision.config import MiniMaxVLConfig

TEXT_PREFIX = "language_model."
_VIT = "vision_tower.vision_model."
_LAYER = _VIT + "encoder.layers.{l}."


def _d(c: MiniMaxVLConfig) -> int:
    """The vision width."""
    return c.vision.hidden_size


def _vector(size: Callable[[MiniMaxVLConfig], int]) -> ShapeFn:
    """The shape function of a vector of `size(cfg)` elements."""
    return lambda c: (size(c),)


# scope "global": one tensor, one param; scope "layer": one tensor per ViT layer into block [l]
VISION_RULES: tuple[Rule, ...] = (
    Rule(_VIT + "embeddings.class_embedding", "vision_tower.class_embedding", _vector(_d), "global"),
    Rule(_VIT + "embeddings.patch_embedding.weight", "vision_tower.patch_embedding",
         lambda c: (_d(c), c.vision.num_channels, c.vision.patch_size, c.vision.patch_size), "global"),
    Rule(_VIT + "embeddings.position_embedding.weight", "vision_tower.position_embedding",
         lambda c: (c.vision.patches_per_side ** 2 + 1, _d(c)), "global"),
    Rule(_VIT + "pre_layrnorm.weight", "vision_tower.pre_layrnorm.scale", _vector(_d), "global"),
    Rule(_VIT + "pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias", _vector(_d), "global"),
    *(rule for ours, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")) for rule in (
        Rule(_LAYER + f"self_attn.{hf}.weight", f"vision_tower.layers.{ours}", lambda c: (_d(c), _d(c)),
             transpose=True),
        Rule(_LAYER + f"self_attn.{hf}.bias", f"vision_tower.layers.{ours}_bias", _vector(_d)),
    )),
    Rule(_LAYER + "self_attn.out_proj.weight", "vision_tower.layers.out", lambda c: (_d(c), _d(c)), transpose=True),
    Rule(_LAYER + "self_attn.out_proj.bias", "vision_tower.layers.out_bias", _vector(_d)),
    *(Rule(_LAYER + f"{norm}.{hf}", f"vision_tower.layers.{norm}.{ours}", _vector(_d))
      for norm in ("layer_norm1", "layer_norm2") for hf, ours in (("weight", "scale"), ("bias", "bias"))),
    Rule(_LAYER + "mlp.fc1.weight", "vision_tower.layers.fc1", lambda c: (c.vision.intermediate_size, _d(c)),
         transpose=True),
    Rule(_LAYER + "mlp.fc1.bias", "vision_tower.layers.fc1_bias", _vector(lambda c: c.vision.intermediate_size)),
    Rule(_LAYER + "mlp.fc2.weight", "vision_tower.layers.fc2", lambda c: (_d(c), c.vision.intermediate_size),
         transpose=True),
    Rule(_LAYER + "mlp.fc2.bias", "vision_tower.layers.fc2_bias", _vector(_d)),
    Rule("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1",
         lambda c: (c.text.hidden_size, _d(c)), "global", transpose=True),
    Rule("multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1_bias",
         _vector(lambda c: c.text.hidden_size), "global"),
    Rule("multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2",
         lambda c: (c.text.hidden_size, c.text.hidden_size), "global", transpose=True),
    Rule("multi_modal_projector.linear_2.bias", "multi_modal_projector.linear_2_bias",
         _vector(lambda c: c.text.hidden_size), "global"),
    Rule("image_newline", "image_newline", _vector(lambda c: c.text.hidden_size), "global"),
)


def _text_rule(rule: Rule) -> Rule:
    """A text rule as part of the VL table: its HF shape read from the VL config's text model."""
    return dataclasses.replace(rule, hf=TEXT_PREFIX + rule.hf, hf_shape=lambda c, f=rule.hf_shape: f(c.text))


def vl_entries(cfg: MiniMaxVLConfig, layout: str) -> dict[str, list[Entry]]:
    """Every HF tensor name of a VL checkpoint whose text model is in `layout`, each with the
    destinations it fills (in order)."""
    out: dict[str, list[Entry]] = {}
    lifted: dict[Rule, Rule] = {}
    for name, entries in expected_entries(cfg.text, layout).items():
        out[TEXT_PREFIX + name] = [
            Entry(TEXT_PREFIX + name, ("language_model", *e.path), e.index,
                  lifted.setdefault(e.rule, _text_rule(e.rule)))
            for e in entries
        ]
    for rule in VISION_RULES:
        layers = [None] if rule.scope == "global" else range(cfg.vision.num_hidden_layers)
        for l in layers:
            name = rule.hf if l is None else rule.hf.format(l=l)
            out[name] = [Entry(name, our_path(rule.ours, 0), () if l is None else (l,), rule)]
    return out


def hf_entries(cfg: MiniMaxConfig | MiniMaxVLConfig, layout: str) -> dict[str, list[Entry]]:
    """The HF tensor names of a text or VL model of `cfg` (text model in `layout`) and their
    destinations."""
    return vl_entries(cfg, layout) if isinstance(cfg, MiniMaxVLConfig) else expected_entries(cfg, layout)


def text_name(cfg: MiniMaxConfig | MiniMaxVLConfig, name: str) -> str | None:
    """The text model's own name of HF tensor `name` (its `language_model.` prefix removed for a
    VL model), or None when it is not a text-model tensor."""
    if not isinstance(cfg, MiniMaxVLConfig):
        return name
    return name[len(TEXT_PREFIX):] if name.startswith(TEXT_PREFIX) else None


def detect_text_layout(cfg: MiniMaxConfig | MiniMaxVLConfig, names: set[str]) -> str:
    """The layout (`hf_names.REMOTE` / `NATIVE`) of the text-model tensors among `names`."""
    return detect_layout({t for n in names if (t := text_name(cfg, n)) is not None})
