"""Serving: a continuous-batching engine over fixed slots and an OpenAI-compatible HTTP API."""

from minimax_jax.serving.engine import Engine, Output, SamplingParams

__all__ = ["Engine", "Output", "SamplingParams"]
