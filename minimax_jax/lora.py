"""Low-rank adapters (LoRA) on the attention projections, the experts and the router.

A target weight W (a param, or a frozen `quant.QuantizedWeight` base) whose matmul contracts the
axes C gets an `Adapter` beside it, attribute `{name}_lora`, holding two factors

    a `[*lead, *C, r]`,  b `[*lead, r, *out]`   (lead: the stacked `layers` axis, for the
    experts also `expert`; out: the output axes)

so that the layer computes x W + (alpha / r) (x a) b. `a` starts N(0, 1 / |C|) and `b` at zero,
so a fresh adapter leaves the model unchanged. The factors are `LoraParam`s, not `nnx.Param`s:
the base params keep their names (`save_model`, the HF conversion and the shardings see only
them) and `nnx.split(model, LoraParam, ...)` separates what trains from the frozen base. The
expert adapters are per-expert factors run through the same grouped matmuls as the experts.

Adapters are saved and loaded on their own by `lora_checkpoint`; `merge_adapters` folds them
into the base weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax import quant
from minimax_jax.config import ConfigError, coerce_fields
from pallas_kernels.grouped_matmul import Weights
from pallas_kernels.grouped_matmul import grouped_matmul as _grouped_matmul

# Target weight -> the axes its matmul contracts, counted from the end (as in `quant.CONTRACTED`,
# plus the router `gate` `[D, E]`).
CONTRACTED: dict[str, tuple[int, ...]] = {**quant.CONTRACTED, "gate": (-2,)}
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "output_gate", "out_proj"),
    "experts": ("w1", "w3", "w2"),
    "router": ("gate",),
}
EXPERT_WEIGHTS = GROUPS["experts"]
SUFFIX = "_lora"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`lora:` in a training config. rank 0 (the default) means full fine-tuning; rank r > 0
    trains rank-r adapters with scale alpha / r on `targets` (weight names of `CONTRACTED` or
    the groups "attention", "experts", "router") and freezes everything else. `quantize`
    ("int8" | "fp8" | None) stores the frozen base's projections quantized (`quant`)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)
    quantize: str | None = None

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"lora.targets must be a non-empty list of weight names, got {self.targets!r}")
        unknown = sorted(set(targets) - set(CONTRACTED) - set(GROUPS))
        if unknown:
            raise ConfigError(f"lora.targets: unknown target(s) {unknown}; valid: "
                              f"{sorted(GROUPS)} or {sorted(CONTRACTED)}")
        object.__setattr__(self, "targets", tuple(targets))
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0: full fine-tuning), got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if self.quantize is not None and self.rank == 0:
            raise ConfigError("lora.quantize freezes a quantized base, so it needs lora.rank > 0")
        try:
            quant.check_mode(self.quantize)
        except ValueError as e:
            raise ConfigError(f"lora.quantize: {e}") from None

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> "LoraConfig":
        """From the `lora:` mapping (None: full fine-tuning); unknown keys are a ConfigError."""
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"lora: must be a mapping of {cls.field_names()}, got {values!r}")
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"lora: unknown key(s) {unknown}; valid: {cls.field_names()}")
        try:
            fields = coerce_fields(cls, values)
        except ConfigError as e:
            raise ConfigError(f"lora.{e}") from None
        return cls(**fields)

    @classmethod
    def field_names(cls) -> list[str]:
        """The keys of `lora:`."""
        return [f.name for f in dataclasses.fields(cls)]

    @property
    def enabled(self) -> bool:
        """True when adapters train (rank > 0)."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on the adapters' output."""
        return self.alpha / self.rank

    @property
    def weights(self) -> tuple[str, ...]:
        """The target weight names, groups expanded, in `CONTRACTED` order."""
        names = {n for t in self.targets for n in GROUPS.get(t, (t,))}
        return tuple(n for n in CONTRACTED if n in names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (as in `adapter_config.json`)."""
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


class LoraParam(nnx.Variable):
    """An adapter factor: what trains in a LoRA run while the `nnx.Param` base stays frozen."""


def _base_array(w: nnx.Param | quant.QuantizedWeight) -> nnx.Param:
    """The param holding a target's values (a QuantizedWeight's `weight`)."""
    return w.weight if isinstance(w, quant.QuantizedWeight) else w


class Adapter(nnx.Module):
    """The low-rank factors of one target weight of shape `[*lead, *C, *out]` (see the module
    docstring): a `[*lead, *C, r]`, b `[*lead, r, *out]`, float32, and the output scale."""

    def __init__(self, weight: nnx.Param | quant.QuantizedWeight, name: str, cfg: LoraConfig, *,
                 rngs: nnx.Rngs):
        base = _base_array(weight)
        shape = tuple(base.shape)
        axes = tuple(base.get_metadata().get("out_sharding") or (None,) * len(shape))
        contracted = sorted(a % len(shape) for a in CONTRACTED[name])
        first, end = contracted[0], contracted[-1] + 1
        lead, r = slice(0, first), cfg.rank
        fan_in = math.prod(shape[first:end])
        a = jax.random.normal(rngs.params(), (*shape[:end], r), jnp.float32) / math.sqrt(fan_in)
        self.a = LoraParam(a, out_sharding=(*axes[:end], None), eager_sharding=False)
        self.b = LoraParam(jnp.zeros((*shape[lead], r, *shape[end:]), jnp.float32),
                           out_sharding=(*axes[lead], None, *axes[end:]), eager_sharding=False)
        self.scale = cfg.scale
        self.num_contracted = end - first

    def delta(self, spec: str, x: jax.Array) -> jax.Array:
        """scale * (x a) b for the base matmul `jnp.einsum(spec, x, W)` (e.g. "btd,dhk->bthk",
        W's letters in its axis order), in x's dtype: x `[B, T, ...]` -> the spec's output."""
        inputs, out = spec.split("->")
        xs, ws = inputs.split(",")
        r = next(c for c in "rzyxwvu" if c not in spec)
        c_letters = "".join(c for c in ws if c not in out)
        o_letters = "".join(c for c in ws if c in out)
        kept = "".join(c for c in xs if c not in c_letters)
        u = jnp.einsum(f"{xs},{c_letters}{r}->{kept}{r}", x, self.a[...].astype(x.dtype))
        return self.scale * jnp.einsum(f"{kept}{r},{r}{o_letters}->{out}", u, self.b[...].astype(x.dtype))

    def weight_delta(self) -> jax.Array:
        """scale * a b as a float32 array of the target weight's shape."""
        a, b = self.a[...], self.b[...]
        n_lead = a.ndim - 1 - self.num_contracted
        lead, c, o = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1:]
        d = jnp.matmul(a.reshape(*lead, math.prod(c), a.shape[-1]),
                       b.reshape(*lead, b.shape[n_lead], math.prod(o)), precision=jax.lax.Precision.HIGHEST)
        return self.scale * d.reshape(*lead, *c, *o)


def _targets(model: nnx.Module, names: Sequence[str]) -> list[tuple[nnx.Module, str]]:
    """(module, attribute name) of every weight of `model` named in `names`."""
    return [(m, n) for _, m in nnx.iter_modules(model) for n in names
            if isinstance(getattr(m, n, None), (nnx.Param, quant.QuantizedWeight))]


def _adapted(model: nnx.Module) -> list[tuple[nnx.Module, str, Adapter]]:
    """(module, target name, its Adapter) of every adapter in `model`."""
    return [(m, n, getattr(m, n + SUFFIX)) for m, n in _targets(model, CONTRACTED)
            if isinstance(getattr(m, n + SUFFIX, None), Adapter)]


def add_adapters(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Give every target weight of `model` (`cfg.weights`) a fresh Adapter, in place; returns
    `model`. Works under `nnx.eval_shape`. A model that already has adapters, or has none of the
    targets, is a ValueError."""
    if not cfg.enabled:
        raise ValueError("lora.rank is 0: no adapters to add")
    if _adapted(model):
        raise ValueError("model already has LoRA adapters")
    found = _targets(model, cfg.weights)
    if not found:
        raise ValueError(f"model has none of the LoRA targets {list(cfg.weights)}")
    for module, name in found:
        setattr(module, name + SUFFIX, Adapter(getattr(module, name), name, cfg, rngs=rngs))
    return model


def project(spec: str, x: jax.Array, module: nnx.Module, name: str) -> jax.Array:
    """`quant.einsum(spec, x, module.<name>)` plus the weight's adapter output when it has one
    (x `[B, T, ...]` -> the spec's output, in x's dtype)."""
    y = quant.einsum(spec, x, getattr(module, name))
    adapter = getattr(module, name + SUFFIX, None)
    return y if adapter is None else y + adapter.delta(spec, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptedExperts:
    """Expert weights `[E, K, N]` with per-expert adapters: base (an array or
    `QuantizedWeights`), a `[E, K, r]`, b `[E, r, N]` in the compute dtype, scale (static)."""

    base: Weights
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The base weights' shape `[E, K, N]`."""
        return self.base.shape


ExpertWeights = Weights | AdaptedExperts


def expert_operand(module: nnx.Module, name: str, dtype: jnp.dtype) -> ExpertWeights:
    """`quant.expert_operand` of expert weight `module.<name>` `[E, K, N]`, as `AdaptedExperts`
    when it has an adapter."""
    w = quant.expert_operand(getattr(module, name), dtype)
    adapter = getattr(module, name + SUFFIX, None)
    if adapter is None:
        return w
    return AdaptedExperts(w, adapter.a[...].astype(dtype), adapter.b[...].astype(dtype), adapter.scale)


def grouped_matmul(x: jax.Array, w: ExpertWeights | Sequence[ExpertWeights], group_sizes: jax.Array, *,
                   impl: str = "auto") -> jax.Array:
    """`pallas_kernels.grouped_matmul` where any of the weights may be `AdaptedExperts`: rows
    x `[M, K]` grouped by expert times each expert's W + scale * a b, outputs side by side
    `[M, N * len(w)]` in x's dtype."""
    ws = tuple(w) if isinstance(w, Sequence) else (w,)
    bases = [v.base if isinstance(v, AdaptedExperts) else v for v in ws]
    y = _grouped_matmul(x, bases, group_sizes, impl=impl)
    if not any(isinstance(v, AdaptedExperts) for v in ws):
        return y
    def delta(v: ExpertWeights) -> jax.Array:
        if not isinstance(v, AdaptedExperts):
            return jnp.zeros((x.shape[0], v.shape[-1]), x.dtype)
        u = _grouped_matmul(x, v.a, group_sizes, impl=impl)  # [M, r]
        return v.scale * _grouped_matmul(u, v.b, group_sizes, impl=impl)

    return y + jnp.concatenate([delta(v) for v in ws], axis=1).astype(y.dtype)


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """Add every adapter's scale * a b into its base weight (in float32, stored back in the
    weight's dtype) and remove the adapters, in place; returns `model`, a plain model. A
    quantized base weight is a ValueError (merge into the float checkpoint, then quantize)."""
    adapted = _adapted(model)
    if not adapted:
        raise ValueError("model has no LoRA adapters to merge")
    for module, name, adapter in adapted:
        w = getattr(module, name)
        if isinstance(w, quant.QuantizedWeight):
            raise ValueError(f"{type(module).__name__}.{name} is {w.mode}-quantized; merge the adapters into "
                             f"the unquantized base and quantize the merged checkpoint")
        w[...] = (w[...].astype(jnp.float32) + adapter.weight_delta()).astype(w.dtype)
        delattr(module, name + SUFFIX)
    return model


def adapter_shapes(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
    """{path of each adapter factor in the model's state: its shape}."""
    return {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, LoraParam))}
