"""Model configuration: one frozen dataclass, read from our YAML files or from an HF `config.json`.

Everything derived from the configuration (the layer-type pattern, the repeating block that is
scanned, the lightning decay slopes, the per-sublayer alpha/beta) is computed here, once.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import yaml

from pallas_kernels import IMPLS as LIGHTNING_IMPLS
from pallas_kernels import SOFTMAX_IMPLS
from pallas_kernels.grouped_matmul import IMPLS as MOE_IMPLS

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
DTYPES = ("float32", "bfloat16", "float16")
TEXT_01, M1 = "minimax", "minimax_m1"  # model types: MiniMax-Text-01 / VL-01's text model, MiniMax-M1
ARCHITECTURES = {TEXT_01: "MiniMaxForCausalLM", M1: "MiniMaxM1ForCausalLM"}


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it."""


@dataclasses.dataclass(frozen=True)
class MiniMaxConfig:
    """Architecture of a MiniMax-01 text model (spec §2), plus how to compute it.

    `layer_types[l]` is "linear_attention" (lightning) or "full_attention" (softmax GQA) for
    absolute layer l. `rotary_dim` is the number of leading head dims rotated by RoPE.
    `dtype` is the activation (compute) dtype, `param_dtype` the dtype parameters are stored in.
    `lightning_impl`, `softmax_impl` and `moe_impl` pick the ops' implementations
    (`pallas_kernels.lightning_attention`, `pallas_kernels.softmax_attention`,
    `pallas_kernels.grouped_matmul`). `remat` recomputes each layer's activations in the backward
    pass instead of storing them (only the layers' inputs are kept). `block_size` is the checkpoints' `block_size` field (the
    remote code's lightning chunk length), kept for the HF round trip; results do not depend on it,
    and the lightning op always works in `pallas_kernels.LIGHTNING_CHUNK`-token blocks.
    """

    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9216
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    rotary_dim: int = 64
    max_position_embeddings: int = 10_240_000
    layer_types: tuple[str, ...] = tuple(
        FULL if (i + 1) % 8 == 0 else LINEAR for i in range(80)
    )
    block_size: int = 256
    linear_attn_alpha_factor: float = 3.5565588200778455
    linear_attn_beta_factor: float = 1.0
    full_attn_alpha_factor: float = 3.5565588200778455
    full_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 3.5565588200778455
    mlp_beta_factor: float = 1.0
    router_aux_loss_coef: float = 0.001
    initializer_range: float = 0.02
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    lightning_impl: str = "auto"
    softmax_impl: str = "auto"
    moe_impl: str = "auto"
    remat: bool = False
    model_type: str = TEXT_01

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ConfigError(f"unknown layer_types {bad}; valid: {list(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}"
            )
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_local_experts={self.num_local_experts}]"
            )
        for key, valid in (("dtype", DTYPES), ("param_dtype", DTYPES),
                           ("lightning_impl", LIGHTNING_IMPLS), ("softmax_impl", SOFTMAX_IMPLS),
                           ("moe_impl", MOE_IMPLS), ("model_type", tuple(ARCHITECTURES))):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {list(valid)}")

    # ----- derived quantities -------------------------------------------------------------
    @property
    def block_pattern(self) -> tuple[str, ...]:
        """The shortest prefix of `layer_types` whose repetition gives the whole stack."""
        n = self.num_hidden_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(
                self.layer_types[i] == self.layer_types[i % p] for i in range(n)
            ):
                return self.layer_types[:p]
        raise AssertionError("unreachable: p = n always matches")

    @property
    def num_blocks(self) -> int:
        """How many times `block_pattern` repeats (the length of the layer scan)."""
        return self.num_hidden_layers // len(self.block_pattern)

    def slopes(self) -> np.ndarray:
        """Lightning decay slopes, float32 `[num_hidden_layers, num_attention_heads]` (spec §3.3).

        s(h, l) = 2^(-8 (h+1) / H) * (1 - l / (L - 1) + 1e-5), l the absolute layer index.
        Rows of softmax layers are computed too (never used).
        """
        h = np.arange(self.num_attention_heads, dtype=np.float64)
        base = 2.0 ** (-8.0 * (h + 1) / self.num_attention_heads)
        layers = np.arange(self.num_hidden_layers, dtype=np.float64)
        denom = max(self.num_hidden_layers - 1, 1)
        factor = 1.0 - layers / denom + 1e-5
        return (factor[:, None] * base[None, :]).astype(np.float32)

    def residual_factors(self, layer_type: str) -> tuple[float, float]:
        """(alpha, beta) of the attention sublayer of a layer of this type (spec §5)."""
        if layer_type == LINEAR:
            return self.linear_attn_alpha_factor, self.linear_attn_beta_factor
        return self.full_attn_alpha_factor, self.full_attn_beta_factor

    # ----- construction ---------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MiniMaxConfig":
        """Build from a mapping of field names; unknown keys are an error listing the valid ones."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {unknown}; valid keys: {sorted(cls.field_names())}"
            )
        return cls(**coerce_fields(cls, values))

    def replace(self, **changes: Any) -> "MiniMaxConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = ()) -> "MiniMaxConfig":
        """Read the `model:` section of a YAML file, then apply `key=value` overrides."""
        values = read_yaml(path).get("model")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a 'model:' section")
        return cls.from_mapping({**values, **parse_overrides(overrides, cls.field_names())})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "MiniMaxConfig":
        """Like `from_dict`, but `layer_types` may also be {"pattern": [...], "repeat": n}."""
        values = dict(values)
        lt = values.get("layer_types")
        if isinstance(lt, dict):
            if set(lt) != {"pattern", "repeat"}:
                raise ConfigError("layer_types as a mapping needs exactly 'pattern' and 'repeat'")
            values["layer_types"] = list(lt["pattern"]) * int(lt["repeat"])
        return cls.from_dict(values)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str | Path, **extra: Any) -> "MiniMaxConfig":
        """Read an HF `config.json` (dict or path) of either layout (spec §2.1).

        Remote layout: `attn_type_list` (0 lightning, 1 softmax), `layernorm_*_alpha|beta`,
        `rotary_dim`, `rope_theta`. Native layout: `layer_types`, `*_alpha_factor|_beta_factor`,
        `rope_parameters` (with `rope_theta`, optional `partial_rotary_factor`). A VL config's
        `text_config` is used when present. MiniMax-M1 (`model_type` "minimax_m1" or the
        architecture `MiniMaxM1ForCausalLM`) reads the same way. `shared_intermediate_size`
        (a number or a list of them) must be 0: no release has a shared expert. `extra` sets our
        own fields (dtype, ...). Any problem is a ConfigError naming the file (or "HF config" for a
        dict) and the key.
        """
        where = "HF config"
        if not isinstance(hf, Mapping):
            p = Path(hf)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise ConfigError(f"missing config: {p} does not exist")
            where, hf = str(p), parse_json(p.read_bytes(), p)
        if not isinstance(hf, Mapping):
            raise ConfigError(f"{where}: expected a JSON object at the top level")
        if "text_config" in hf:
            hf = hf["text_config"]
        try:
            values = _hf_values(hf, where)
        except KeyError as e:
            raise ConfigError(f"{where}: lacks required key {e.args[0]!r}") from None
        if hf.get("tie_word_embeddings"):
            raise ConfigError(f"{where}: tie_word_embeddings=true is not a MiniMax-01 layout (lm_head is untied)")
        values.update(extra)
        try:
            return cls.from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """An HF `config.json` for this model: native field names plus the remote ones.

        Carries `rotary_dim` (honoured by the remote code and by this project) alongside
        `layer_types` / `attn_type_list` so that either loader reads it.
        """
        return {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rotary_dim": self.rotary_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_types": list(self.layer_types),
            "attn_type_list": [int(t == FULL) for t in self.layer_types],
            "block_size": self.block_size,
            "linear_attn_alpha_factor": self.linear_attn_alpha_factor,
            "linear_attn_beta_factor": self.linear_attn_beta_factor,
            "full_attn_alpha_factor": self.full_attn_alpha_factor,
            "full_attn_beta_factor": self.full_attn_beta_factor,
            "mlp_alpha_factor": self.mlp_alpha_factor,
            "mlp_beta_factor": self.mlp_beta_factor,
            "layernorm_linear_attention_alpha": self.linear_attn_alpha_factor,
            "layernorm_linear_attention_beta": self.linear_attn_beta_factor,
            "layernorm_full_attention_alpha": self.full_attn_alpha_factor,
            "layernorm_full_attention_beta": self.full_attn_beta_factor,
            "layernorm_mlp_alpha": self.mlp_alpha_factor,
            "layernorm_mlp_beta": self.mlp_beta_factor,
            "postnorm": True,
            "shared_intermediate_size": 0,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "initializer_range": self.initializer_range,
            "torch_dtype": self.param_dtype,
        }


def _number(value: Any, key: str, kind: type, where: str) -> Any:
    """`value` as `kind` (int or float) if it is a JSON number (an integral one for int);
    otherwise a ConfigError naming `where` and `key`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (kind is int and not float(value).is_integer()):
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {kind.__name__}")
    return kind(value)


def _hf_values(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Our config fields from an HF config mapping (see `MiniMaxConfig.from_hf_config`).

    A missing required key raises KeyError(key); a value of the wrong type a ConfigError."""

    def get(key: str, kind: type, default: Any = None, *, fallback: str | None = None) -> Any:
        if key in hf:
            return _number(hf[key], key, kind, where)
        if fallback is not None and fallback in hf:
            return _number(hf[fallback], fallback, kind, where)
        if default is None:
            raise KeyError(key)
        return kind(default)

    n_heads = get("num_attention_heads", int)
    head_dim = get("head_dim", int) if hf.get("head_dim") else get("hidden_size", int) // n_heads
    if "layer_types" in hf:
        layer_types = hf["layer_types"]
        if not isinstance(layer_types, list):
            raise ConfigError(f"{where}: layer_types={layer_types!r} is not a list")
    elif "attn_type_list" in hf:
        kinds = hf["attn_type_list"]
        if not isinstance(kinds, list) or any(t not in (0, 1) for t in kinds):
            raise ConfigError(f"{where}: attn_type_list={kinds!r} is not a list of 0 (lightning) / 1 (softmax)")
        layer_types = [FULL if t == 1 else LINEAR for t in kinds]
    else:
        raise ConfigError(f"{where}: has neither 'layer_types' nor 'attn_type_list'")
    shared = hf.get("shared_intermediate_size", 0)
    if any(_number(v, "shared_intermediate_size", int, where) for v in (shared if isinstance(shared, list) else [shared])):
        raise ConfigError(f"{where}: shared_intermediate_size={shared!r}: shared experts are not supported "
                          "(0 only)")
    m1 = hf.get("model_type") == M1 or ARCHITECTURES[M1] in (hf.get("architectures") or [])
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ConfigError(f"{where}: rope_parameters={rope!r} is not an object")
    theta = _number(rope["rope_theta"], "rope_parameters.rope_theta", float, where) if "rope_theta" in rope \
        else get("rope_theta", float, 10_000.0)
    if hf.get("rotary_dim"):
        rotary_dim = get("rotary_dim", int)
    else:
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
        rotary_dim = int(_number(factor, "partial_rotary_factor", float, where) * head_dim) if factor else head_dim
    return dict(
        vocab_size=get("vocab_size", int),
        hidden_size=get("hidden_size", int),
        num_hidden_layers=get("num_hidden_layers", int),
        num_attention_heads=n_heads,
        num_key_value_heads=get("num_key_value_heads", int, n_heads),
        head_dim=head_dim,
        intermediate_size=get("intermediate_size", int),
        num_local_experts=get("num_local_experts", int, 1, fallback="num_experts"),
        num_experts_per_tok=get("num_experts_per_tok", int, 1),
        rms_norm_eps=get("rms_norm_eps", float, 1e-5),
        rope_theta=theta,
        rotary_dim=rotary_dim,
        max_position_embeddings=get("max_position_embeddings", int, 10_240_000),
        layer_types=layer_types,
        block_size=get("block_size", int, 256),
        linear_attn_alpha_factor=get("linear_attn_alpha_factor", float, 1.0, fallback="layernorm_linear_attention_alpha"),
        linear_attn_beta_factor=get("linear_attn_beta_factor", float, 1.0, fallback="layernorm_linear_attention_beta"),
        full_attn_alpha_factor=get("full_attn_alpha_factor", float, 1.0, fallback="layernorm_full_attention_alpha"),
        full_attn_beta_factor=get("full_attn_beta_factor", float, 1.0, fallback="layernorm_full_attention_beta"),
        mlp_alpha_factor=get("mlp_alpha_factor", float, 1.0, fallback="layernorm_mlp_alpha"),
        mlp_beta_factor=get("mlp_beta_factor", float, 1.0, fallback="layernorm_mlp_beta"),
        router_aux_loss_coef=get("router_aux_loss_coef", float, 0.001),
        initializer_range=get("initializer_range", float, 0.02),
        model_type=M1 if m1 else TEXT_01,
    )


def parse_json(text: str | bytes, where: str | Path, error: type[ValueError] = ConfigError) -> Any:
    """`text` parsed as JSON; invalid JSON raises `error` naming `where`, the line and the column."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        at = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise error(f"{where}: invalid JSON{at}: {getattr(e, 'msg', e)}") from None


def coerce_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check each value against the dataclass field's type, converting where YAML is loose
    (`1e-3` reads as a string, `3` where a float is meant); a wrong type is a ConfigError."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        kind = hints[key]
        try:
            if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                value = float(value)
            elif kind is int and isinstance(value, str):
                value = int(value)
            elif kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a valid {kind.__name__}") from None
        if kind in (int, bool) and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r} is not a valid {kind.__name__}")
        out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file or another shape is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def parse_overrides(overrides: Iterable[str], valid: Iterable[str]) -> dict[str, Any]:
    """Parse `key=value` strings (values as YAML scalars); an unknown key lists the valid ones."""
    valid = sorted(valid)
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key not in valid:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}")
        out[key] = yaml.safe_load(value)
    return out

