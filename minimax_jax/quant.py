"""Weight-only quantization for serving: int8 and fp8 (e4m3) weights with float32 scales per
output channel, for the expert projections (w1, w3, w2) and the attention projections (softmax
q/k/v/o_proj, lightning qkv_proj / output_gate / out_proj). The router, embeddings, lm_head,
norms and the lightning decay keep their dtype.

A weight W with contracted axes C (the input dims of its matmul) is stored as values Q and a
scale s over the other axes (the output channels; for the experts also the expert axis):

    int8:  s = max_C |W| / 127,  Q = round(W / s)           |W - Q s| <= s / 2
    fp8:   s = max_C |W| / 448,  Q = e4m3(W / s) (nearest)  |W - Q s| <= max(|W| / 16, s / 1024)

(fp8 e4m3 keeps 3 mantissa bits: a relative half-step of 2^-4 for normal values, an absolute
half-step of 2^-10 s below 2^-6 s). Matmuls read Q: x @ Q runs with Q upcast to x's dtype inside
the dot (exact: int8 and e4m3 values are exact in bfloat16) and float32 accumulation, and s
multiplies the output, so x @ W ~= (x @ Q) * s without a dequantized copy of W.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.grouped_matmul import QuantizedWeights

MODES = ("int8", "fp8")
QUANTIZATION_FILE = "quantization.json"  # {"mode": one of MODES} in a quantized checkpoint
VALUE_DTYPES = {"int8": np.dtype(jnp.int8), "fp8": np.dtype(jnp.float8_e4m3fn)}
QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest |value|: s = max |W| / QMAX

# The weights that are quantized (attribute names of the attention and MoE modules), each with
# the axes its matmul contracts, counted from the end (so they hold for the stacked params too).
CONTRACTED: dict[str, tuple[int, ...]] = {
    "qkv_proj": (-4,), "output_gate": (-3,), "out_proj": (-3, -2),  # lightning [D, H, (3,) K], [H, K, D]
    "q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,), "o_proj": (-3, -2),  # softmax
    "w1": (-2,), "w3": (-2,), "w2": (-2,),  # experts [E, D, F], [E, F, D]
}
WEIGHT, SCALE = "weight", "scale"  # the param names under a quantized weight's path


def check_mode(mode: str | None, *, optional: bool = True) -> None:
    """Raise a ValueError naming `mode` and the valid ones unless it is one of MODES (or None,
    when `optional`)."""
    if mode not in MODES and not (optional and mode is None):
        raise ValueError(f"unknown quantize value {mode!r}; valid: {', '.join(MODES)}"
                         + (" (or None)" if optional else ""))


def _output_axes(items: tuple, contracted: tuple[int, ...]) -> tuple:
    """`items` (one per axis of a weight) without those of the `contracted` axes."""
    drop = {a % len(items) for a in contracted}
    return tuple(x for i, x in enumerate(items) if i not in drop)


def scale_shape(shape: tuple[int, ...], contracted: tuple[int, ...]) -> tuple[int, ...]:
    """The scale's shape for a weight of `shape`: `shape` without the `contracted` axes."""
    return _output_axes(tuple(shape), contracted)


def quantize_array(w: jax.Array | np.ndarray, contracted: tuple[int, ...],
                   mode: str) -> tuple[jax.Array, jax.Array]:
    """w (any float dtype) -> (values int8 / float8_e4m3fn of w's shape, scale float32 of
    `scale_shape`), symmetric per output channel (see the module docstring). An all-zero
    channel gets scale 1."""
    check_mode(mode, optional=False)
    return _quantize(w, tuple(contracted), mode)


@functools.partial(jax.jit, static_argnames=("contracted", "mode"))
def _quantize(w: jax.Array, contracted: tuple[int, ...], mode: str) -> tuple[jax.Array, jax.Array]:
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=contracted)
    scale = jnp.where(amax > 0, amax / QMAX[mode], 1.0)
    scaled = jnp.clip(w / jnp.expand_dims(scale, contracted), -QMAX[mode], QMAX[mode])
    values = jnp.round(scaled) if mode == "int8" else scaled
    return values.astype(VALUE_DTYPES[mode]), scale


def dequantize(values: jax.Array, scale: jax.Array, contracted: tuple[int, ...]) -> jax.Array:
    """values `[...]`, scale over the non-contracted axes -> values * scale, float32."""
    return values.astype(jnp.float32) * jnp.expand_dims(scale, contracted)


class QuantizedWeight(nnx.Module):
    """A quantized weight in a module: `weight` (int8 / float8_e4m3fn values, the original
    shape and logical axes) and `scale` (float32 over the output channels, the remaining
    axes), W ~= weight * scale broadcast over the `contracted` axes."""

    def __init__(self, weight: nnx.Param, scale: nnx.Param, contracted: tuple[int, ...]):
        self.weight = weight
        self.scale = scale
        self.contracted = contracted

    @property
    def mode(self) -> str:
        """"int8" or "fp8", from the values' dtype."""
        return next(m for m, dt in VALUE_DTYPES.items() if dt == self.weight.dtype)

    def dequantized(self) -> jax.Array:
        """The weight the values and scale stand for, float32."""
        return dequantize(self.weight[...], self.scale[...], self.contracted)


def quantize_param(p: nnx.Param, name: str, mode: str) -> QuantizedWeight:
    """The QuantizedWeight of param `p` (a weight named `name`, one of CONTRACTED)."""
    contracted = CONTRACTED[name]
    values, scale = quantize_array(p[...], contracted, mode)
    axes = tuple(p.get_metadata().get("out_sharding") or (None,) * p.ndim)
    return QuantizedWeight(nnx.Param(values, out_sharding=axes, eager_sharding=False),
                           nnx.Param(scale, out_sharding=_output_axes(axes, contracted), eager_sharding=False),
                           contracted)


def _quantizable(model: nnx.Module) -> Iterator[tuple[nnx.Module, str]]:
    """(module, attribute name) of every weight of `model` named in CONTRACTED."""
    for _, module in nnx.iter_modules(model):
        for name in CONTRACTED:
            if isinstance(getattr(module, name, None), (nnx.Param, QuantizedWeight)):
                yield module, name


def quantize_model(model: nnx.Module, mode: str) -> nnx.Module:
    """Replace, in place, every weight of `model` named in CONTRACTED (the expert and attention
    projections) by its QuantizedWeight in `mode` ("int8" | "fp8"); returns `model`. Works under
    `nnx.eval_shape` (abstract params). A model that is already quantized is refused."""
    check_mode(mode, optional=False)
    for module, name in list(_quantizable(model)):
        p = getattr(module, name)
        if isinstance(p, QuantizedWeight):
            raise ValueError(f"{type(module).__name__}.{name} is already quantized ({p.mode})")
        setattr(module, name, quantize_param(p, name, mode))
    return model


def quantization_mode(model: nnx.Module) -> str | None:
    """"int8" / "fp8" when `model`'s projections are quantized, None when none is."""
    modes = {getattr(m, n).mode for m, n in _quantizable(model) if isinstance(getattr(m, n), QuantizedWeight)}
    if len(modes) > 1:
        raise ValueError(f"model mixes quantization modes {sorted(modes)}")
    return modes.pop() if modes else None


def einsum(spec: str, x: jax.Array, w: nnx.Param | QuantizedWeight) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in x's dtype, w a param (cast to x's dtype) or a
    QuantizedWeight (its values upcast to x's dtype inside the dot, float32 accumulation, the
    scale applied to the output). The output must end with w's non-contracted axes in order,
    as every projection spec here does (e.g. "btd,dhk->bthk")."""
    if isinstance(w, QuantizedWeight):
        y = jnp.einsum(spec, x, w.weight[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * w.scale[...]).astype(x.dtype)
    return jnp.einsum(spec, x, w[...].astype(x.dtype))


def expert_operand(w: nnx.Param | QuantizedWeight, dtype: jnp.dtype) -> jax.Array | QuantizedWeights:
    """An expert weight `[E, K, N]` as the grouped matmul takes it: the param cast to `dtype`,
    or `QuantizedWeights` (values as stored, float32 scale `[E, N]`)."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeights(w.weight[...], w.scale[...])
    return w[...].astype(dtype)


@dataclasses.dataclass(frozen=True)
class StoredParam:
    """How one param of the float model is stored quantized: the paths of its values and
    scale, their shapes and dtypes, and the contracted axes."""

    weight: tuple
    scale: tuple
    weight_shape: tuple[int, ...]
    scale_shape: tuple[int, ...]
    value_dtype: np.dtype
    contracted: tuple[int, ...]


def stored_param(path: tuple, shape: tuple[int, ...], mode: str) -> StoredParam | None:
    """For a param of the float model at `path` (its last key the attribute name) with `shape`:
    its StoredParam in `mode`, or None if it stays unquantized (or mode is None)."""
    if mode is None or path[-1] not in CONTRACTED:
        return None
    contracted = CONTRACTED[path[-1]]
    return StoredParam((*path, WEIGHT), (*path, SCALE), tuple(shape), scale_shape(tuple(shape), contracted),
                       VALUE_DTYPES[mode], contracted)
