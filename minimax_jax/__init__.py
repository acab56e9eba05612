"""minimax-jax: MiniMax-01 hybrid lightning/softmax-attention MoE models in JAX and Flax NNX."""

from minimax_jax.cache import Cache, init_cache
from minimax_jax.checkpoint import load_model
from minimax_jax.config import ConfigError, MiniMaxConfig
from minimax_jax.generate import generate
from minimax_jax.model import MiniMaxForCausalLM

__all__ = [
    "Cache", "ConfigError", "MiniMaxConfig", "MiniMaxForCausalLM", "generate", "init_cache",
    "load_model",
]
