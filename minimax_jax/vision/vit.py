"""The CLIP-style vision tower of MiniMax-VL-01 (spec minimax-vl-01 §3): a convolutional patch
embedding without bias, a class token, learned positions, `pre_layrnorm`, then pre-LN encoder
layers (bias everywhere, exact GELU, bidirectional attention through the softmax op: cuDNN's
fused kernel on Hopper, the blockwise XLA form elsewhere), scanned over stacked parameters. There
is no post-layernorm: the features are the hidden states of `vision_feature_layer` without the CLS
token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.params import param
from pallas_kernels import softmax_attention
from minimax_jax.vision.config import VisionConfig


def zeros(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: jnp.dtype) -> nnx.Param:
    """A zero-initialised parameter (a bias) of `shape`, named by `axes`."""
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with a learned scale and bias, computed in float32."""

    def __init__(self, size: int, *, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = param(None, (size,), ("embed",), param_dtype)
        self.bias = zeros((size,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., D]` -> the same shape and dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * (1 + erf(x / sqrt 2)) / 2, elementwise in x's dtype: CLIP's formula. XLA
    computes erf as one polynomial; `jax.nn.gelu`'s erfc adds an exponential and a second
    polynomial for its tail."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


class EncoderLayer(nnx.Module):
    """x + attention(layer_norm1(x)), then x + fc2(gelu(fc1(layer_norm2(x)))); weights `[in..., out...]`."""

    def __init__(self, cfg: VisionConfig, param_dtype: jnp.dtype, stddev: float, *, rngs: nnx.Rngs):
        d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
        k = d // h
        self.layer_norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.layer_norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        for name in ("query", "key", "value"):
            setattr(self, name, param(rngs, (d, h, k), ("embed", "heads", "head_dim"), param_dtype, stddev=stddev))
            setattr(self, f"{name}_bias", zeros((h, k), ("heads", "head_dim"), param_dtype))
        self.out = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), param_dtype, stddev=stddev)
        self.out_bias = zeros((d,), ("embed",), param_dtype)
        self.fc1 = param(rngs, (d, f), ("embed", "mlp"), param_dtype, stddev=stddev)
        self.fc1_bias = zeros((f,), ("mlp",), param_dtype)
        self.fc2 = param(rngs, (f, d), ("mlp", "embed"), param_dtype, stddev=stddev)
        self.fc2_bias = zeros((d,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[N, S, D]` (N crops, S = 1 + patches) -> `[N, S, D]`, same dtype."""
        dt = x.dtype
        w = lambda p: p[...].astype(dt)  # noqa: E731
        h = self.layer_norm1(x)
        q = jnp.einsum("nsd,dhk->nshk", h, w(self.query)) + w(self.query_bias)
        k = jnp.einsum("nsd,dhk->nshk", h, w(self.key)) + w(self.key_bias)
        v = jnp.einsum("nsd,dhk->nshk", h, w(self.value)) + w(self.value_bias)
        o = softmax_attention(q, k, v, causal=False)
        x = x + jnp.einsum("nshk,hkd->nsd", o, w(self.out)) + w(self.out_bias)
        h = jnp.einsum("nsd,df->nsf", self.layer_norm2(x), w(self.fc1)) + w(self.fc1_bias)
        h = gelu(h.astype(jnp.float32)).astype(dt)
        return x + jnp.einsum("nsf,fd->nsd", h, w(self.fc2)) + w(self.fc2_bias)


class VisionTower(nnx.Module):
    """pixel_values `[N, C, image_size, image_size]` -> features `[N, patches, D]` of
    `cfg.vision_feature_layer`, the CLS token dropped."""

    def __init__(self, cfg: VisionConfig, *, param_dtype: jnp.dtype, dtype: jnp.dtype, stddev: float,
                 rngs: nnx.Rngs):
        d, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
        self.config, self.dtype = cfg, dtype
        self.patch_embedding = param(rngs, (d, c, p, p), ("embed", None, None, None), param_dtype, stddev=stddev)
        self.class_embedding = param(rngs, (d,), ("embed",), param_dtype, stddev=stddev)
        self.position_embedding = param(rngs, (cfg.patches_per_side ** 2 + 1, d), (None, "embed"), param_dtype,
                                        stddev=stddev)
        self.pre_layrnorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(r: nnx.Rngs) -> EncoderLayer:
            return EncoderLayer(cfg, param_dtype, stddev, rngs=r)

        self.layers = create(rngs)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values `[N, C, S, S]` -> `pre_layrnorm`(patches + CLS + positions) `[N, 1 + (S/p)^2, D]`."""
        cfg = self.config
        n, c, s, s2 = pixel_values.shape
        if (c, s, s2) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected "
                             f"[N, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]")
        g, p = cfg.patches_per_side, cfg.patch_size
        x = pixel_values.astype(self.dtype).reshape(n, c, g, p, g, p)
        patches = jnp.einsum("ncypxq,dcpq->nyxd", x, self.patch_embedding[...].astype(self.dtype))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, cfg.hidden_size))
        h = jnp.concatenate([cls, patches.reshape(n, g * g, cfg.hidden_size)], axis=1)
        return self.pre_layrnorm(h + self.position_embedding[...].astype(self.dtype))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values float `[N, C, S, S]` -> features `[N, (S/p)^2, D]` in the compute dtype."""
        graphdef, params = nnx.split(self.layers)
        n = self.config.feature_layers
        if n < self.config.num_hidden_layers:
            params = jax.tree.map(lambda a: a[:n], params)

        def body(h, layer_params):
            return nnx.merge(graphdef, layer_params)(h), None

        h, _ = jax.lax.scan(body, self.embed(pixel_values), params)
        return h[:, 1:]
