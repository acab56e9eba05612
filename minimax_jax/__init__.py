"""minimax-jax: MiniMax-01 hybrid lightning/softmax-attention MoE models in JAX and Flax NNX."""

from minimax_jax.cache import Cache, init_cache
from minimax_jax.config import ConfigError, MiniMaxConfig
from minimax_jax.model import MiniMaxForCausalLM

__all__ = ["Cache", "ConfigError", "MiniMaxConfig", "MiniMaxForCausalLM", "init_cache"]
