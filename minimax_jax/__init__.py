"""minimax-jax: MiniMax-01 hybrid lightning/softmax-attention MoE models in JAX and Flax NNX."""

from minimax_jax.cache import Cache, init_cache
from minimax_jax.checkpoint import load_model
from minimax_jax.config import ConfigError, MiniMaxConfig
from minimax_jax.generate import generate
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.vision import MiniMaxVLConfig, MiniMaxVLForConditionalGeneration

__all__ = [
    "Cache", "ConfigError", "MiniMaxConfig", "MiniMaxForCausalLM", "MiniMaxVLConfig",
    "MiniMaxVLForConditionalGeneration", "generate", "init_cache", "load_model",
]
