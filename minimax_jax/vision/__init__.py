"""MiniMax-VL-01: the CLIP-style vision tower, the projector, dynamic-resolution tiling and the
model that runs MiniMax-Text-01 on text with image tokens."""

from minimax_jax.vision.anyres import image_token_count
from minimax_jax.vision.config import MiniMaxVLConfig, VisionConfig
from minimax_jax.vision.model import MiniMaxVLForConditionalGeneration
from minimax_jax.vision.preprocess import preprocess

__all__ = ["MiniMaxVLConfig", "MiniMaxVLForConditionalGeneration", "VisionConfig", "image_token_count",
           "preprocess"]
