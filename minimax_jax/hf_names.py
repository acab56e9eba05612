"""The one table that maps HF safetensors names to our parameters, used in both directions.

A `Rule` says which HF tensor fills which slice of which of our parameters and how it is
transformed. Our parameters are stacked over the scanned blocks: absolute layer `l` lives at
block position `i = l % P` (P = len(cfg.block_pattern)) and stack index `l // P`; expert
weights add the expert index after it. So one HF tensor always fills one "block" `param[index]`
of a parameter, and the conversion never has to hold a whole stacked parameter.

Transform: `block = hf.swapaxes(-1, -2).reshape(block_shape)` when `transpose` (PyTorch
`Linear.weight` is [out, in], ours are [in..., out...]), else `hf.reshape(block_shape)`; the
inverse reshapes to the (swapped) HF shape and swaps back. `split` selects part `k` of `n` equal
parts along an axis of the HF tensor (the native fused `gate_up_proj` holds w1 then w3).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from minimax_jax.config import FULL, LINEAR, MiniMaxConfig

REMOTE = "remote"  # block_sparse_moe.experts.{e}.w1/w2/w3.weight (original checkpoints, save_pretrained)
NATIVE = "native"  # mlp.gate.weight, mlp.experts.gate_up_proj / down_proj (transformers in memory)

# Lightning decay buffers written by transformers' save_pretrained; recomputed from the config.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)")

ParamPath = tuple[str | int, ...]
ShapeFn = Callable[[MiniMaxConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF name template -> our param path template, over `scope` ("global" | "layer" | "expert")."""

    hf: str  # template with {l} (absolute layer) and {e} (expert)
    ours: str  # dotted path template with {i} (position in the block pattern)
    hf_shape: ShapeFn  # full shape of the HF tensor
    scope: str = "layer"
    layer_type: str | None = None  # only layers of this type (None: every layer)
    transpose: bool = False
    split: tuple[int, int, int] | None = None  # (axis, part k, number of parts n)

    def to_ours(self, hf: np.ndarray, block_shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor (its full shape) -> the block of our parameter, shape `block_shape` (a view
        of `hf` when the layout allows: no copy is made here)."""
        if self.split is not None:
            axis, k, n = self.split
            size = hf.shape[axis] // n
            hf = hf[(slice(None),) * axis + (slice(k * size, (k + 1) * size),)]
        x = hf.swapaxes(-1, -2) if self.transpose else hf
        return x.reshape(block_shape)

    def to_hf(self, block: np.ndarray, cfg: MiniMaxConfig) -> np.ndarray:
        """Block of our parameter -> the HF tensor (only for rules without `split`)."""
        assert self.split is None, "a split rule has no inverse on its own"
        shape = self.hf_shape(cfg)
        if not self.transpose:
            return block.reshape(shape)
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return np.ascontiguousarray(block.reshape(swapped).swapaxes(-1, -2))


def _linear(c: MiniMaxConfig, out: int) -> tuple[int, int]:
    return (out, c.hidden_size)


COMMON: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed_tokens", lambda c: (c.vocab_size, c.hidden_size), "global"),
    Rule("model.norm.weight", "norm.scale", lambda c: (c.hidden_size,), "global"),
    Rule("lm_head.weight", "lm_head", lambda c: (c.vocab_size, c.hidden_size), "global", transpose=True),
    Rule("model.layers.{l}.input_layernorm.weight", "blocks.layers.{i}.input_layernorm.scale",
         lambda c: (c.hidden_size,)),
    Rule("model.layers.{l}.post_attention_layernorm.weight", "blocks.layers.{i}.post_attention_layernorm.scale",
         lambda c: (c.hidden_size,)),
    # lightning layers
    Rule("model.layers.{l}.self_attn.qkv_proj.weight", "blocks.layers.{i}.self_attn.qkv_proj",
         lambda c: _linear(c, 3 * c.num_attention_heads * c.head_dim), layer_type=LINEAR, transpose=True),
    Rule("model.layers.{l}.self_attn.output_gate.weight", "blocks.layers.{i}.self_attn.output_gate",
         lambda c: _linear(c, c.num_attention_heads * c.head_dim), layer_type=LINEAR, transpose=True),
    Rule("model.layers.{l}.self_attn.norm.weight", "blocks.layers.{i}.self_attn.norm.scale",
         lambda c: (c.num_attention_heads * c.head_dim,), layer_type=LINEAR),
    Rule("model.layers.{l}.self_attn.out_proj.weight", "blocks.layers.{i}.self_attn.out_proj",
         lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim), layer_type=LINEAR, transpose=True),
    # softmax layers
    Rule("model.layers.{l}.self_attn.q_proj.weight", "blocks.layers.{i}.self_attn.q_proj",
         lambda c: _linear(c, c.num_attention_heads * c.head_dim), layer_type=FULL, transpose=True),
    Rule("model.layers.{l}.self_attn.k_proj.weight", "blocks.layers.{i}.self_attn.k_proj",
         lambda c: _linear(c, c.num_key_value_heads * c.head_dim), layer_type=FULL, transpose=True),
    Rule("model.layers.{l}.self_attn.v_proj.weight", "blocks.layers.{i}.self_attn.v_proj",
         lambda c: _linear(c, c.num_key_value_heads * c.head_dim), layer_type=FULL, transpose=True),
    Rule("model.layers.{l}.self_attn.o_proj.weight", "blocks.layers.{i}.self_attn.o_proj",
         lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim), layer_type=FULL, transpose=True),
)

_MOE = "blocks.layers.{i}.block_sparse_moe."
RULES: dict[str, tuple[Rule, ...]] = {
    REMOTE: COMMON + (
        Rule("model.layers.{l}.block_sparse_moe.gate.weight", _MOE + "gate",
             lambda c: (c.num_local_experts, c.hidden_size), transpose=True),
        Rule("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight", _MOE + "w1",
             lambda c: (c.intermediate_size, c.hidden_size), "expert", transpose=True),
        Rule("model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight", _MOE + "w3",
             lambda c: (c.intermediate_size, c.hidden_size), "expert", transpose=True),
        Rule("model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight", _MOE + "w2",
             lambda c: (c.hidden_size, c.intermediate_size), "expert", transpose=True),
    ),
    NATIVE: COMMON + (
        Rule("model.layers.{l}.mlp.gate.weight", _MOE + "gate",
             lambda c: (c.num_local_experts, c.hidden_size), transpose=True),
        Rule("model.layers.{l}.mlp.experts.gate_up_proj", _MOE + "w1",
             lambda c: (c.num_local_experts, 2 * c.intermediate_size, c.hidden_size),
             transpose=True, split=(1, 0, 2)),
        Rule("model.layers.{l}.mlp.experts.gate_up_proj", _MOE + "w3",
             lambda c: (c.num_local_experts, 2 * c.intermediate_size, c.hidden_size),
             transpose=True, split=(1, 1, 2)),
        Rule("model.layers.{l}.mlp.experts.down_proj", _MOE + "w2",
             lambda c: (c.num_local_experts, c.hidden_size, c.intermediate_size), transpose=True),
    ),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor's destination: `param[index]` of our param at `path`, via `rule`."""

    hf_name: str
    path: ParamPath
    index: tuple[int, ...]
    rule: Rule


def our_path(template: str, i: int) -> ParamPath:
    """'blocks.layers.{i}.self_attn.qkv_proj' -> ('blocks', 'layers', i, 'self_attn', 'qkv_proj')."""
    parts = template.format(i=i).split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def expected_entries(cfg: MiniMaxConfig, layout: str) -> dict[str, list[Entry]]:
    """Every HF tensor name of `layout` for `cfg`, each with the destinations it fills (in order)."""
    period = len(cfg.block_pattern)
    out: dict[str, list[Entry]] = {}
    for rule in RULES[layout]:
        if rule.scope == "global":
            targets = [(rule.hf, our_path(rule.ours, 0), ())]
        else:
            targets = []
            for l, layer_type in enumerate(cfg.layer_types):
                if rule.layer_type not in (None, layer_type):
                    continue
                path = our_path(rule.ours, l % period)
                experts = range(cfg.num_local_experts) if rule.scope == "expert" else [None]
                for e in experts:
                    index = (l // period,) if e is None else (l // period, e)
                    targets.append((rule.hf.format(l=l, e=e), path, index))
        for name, path, index in targets:
            out.setdefault(name, []).append(Entry(name, path, index, rule))
    return out


def detect_layout(names: set[str]) -> str:
    """NATIVE if any fused `mlp.` expert tensor is present, else REMOTE."""
    return NATIVE if any(".mlp." in n for n in names) else REMOTE

