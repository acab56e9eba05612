"""Lightning attention (MiniMax-01 linear attention with per-head exponential decay).

The ops the model computes through, each with a reference beside it:

- ``lightning_attention(q, k, v, slopes, *, initial_state=None, segment_ids=None, impl="auto")``
  and ``lightning_decode(q, k, v, slopes, state)``: MiniMax-01 linear attention with per-head
  exponential decay. Implementations: "reference" (token recurrence), "chunked" (block form in
  plain JAX), "pallas" (Mosaic GPU kernels for Hopper, bf16/f16 inputs with head dim 64 or 128;
  Pallas TPU kernels on TPU, bf16/f32 inputs with head dim 64 or 128; other calls fall back to
  "chunked") and "auto" ("pallas" where the kernels support the call, else "chunked"). A
  one-token call with no segment ids runs the decode step.
- ``softmax_attention`` / ``paged_softmax_attention`` (``pallas_kernels.softmax``).
- ``grouped_matmul`` (``pallas_kernels.grouped_matmul``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import lightning_gpu, lightning_tpu
from pallas_kernels.chunked import lightning_attention_chunked
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.reference import lightning_attention_reference, lightning_decode_reference
from pallas_kernels.softmax import (SOFTMAX_IMPLS, paged_softmax_attention,
                                              softmax_attention)
from sharding.lightning import lightning_attention_sp
from sharding.tokens import sequence_shards

__all__ = ["lightning_attention", "lightning_decode", "IMPLS", "LIGHTNING_CHUNK", "grouped_matmul",
           "softmax_attention", "paged_softmax_attention", "SOFTMAX_IMPLS"]

IMPLS = ("auto", "pallas", "chunked", "reference")
LIGHTNING_CHUNK = lightning_gpu.CHUNK  # tokens per block of the "chunked" form and the kernels


def _check_shape(name: str, x: jax.Array, expected: tuple[int, ...]) -> None:
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(expected)}")


def _check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _validate(q, k, v, slopes, state, state_name: str, token_ndim: int) -> None:
  if q.ndim != token_ndim:
    raise ValueError(f"q must have {token_ndim} dimensions, got shape {tuple(q.shape)}")
  _check_shape("k", k, q.shape)
  _check_shape("v", v, q.shape)
  for name, x in (("q", q), ("k", k), ("v", v), ("slopes", slopes)):
    _check_float(name, x)
  h, d = q.shape[-2:]
  _check_shape("slopes", slopes, (h,))
  if state is not None:
    _check_shape(state_name, state, (q.shape[0], h, d, d))
    _check_float(state_name, state)


def lightning_attention(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, *,
                        initial_state: jax.Array | None = None,
                        segment_ids: jax.Array | None = None, impl: str = "auto",
                        block_size: int = LIGHTNING_CHUNK,
                        zigzag: bool = False) -> tuple[jax.Array, jax.Array]:
  """Causal decayed linear attention: S_t = exp(-slope) S_{t-1} + k_t^T v_t, o_t = q_t S_t.

  Args:
    q, k, v: ``[B, T, H, D]`` (already activated), any float dtype, same shape.
    slopes: float ``[H]``; the per-token decay of head h is ``exp(-slopes[h])``.
    initial_state: float32 ``[B, H, D, D]`` (rows key dim, columns value dim), the state before
      position 0; None means zeros.
    segment_ids: int ``[B, T]`` or None; the state is reset to zero before position t whenever
      ``segment_ids[:, t] != segment_ids[:, t - 1]``.
    impl: one of ``IMPLS``. With "pallas" (and "auto" on Hopper or TPU) slopes are constants: no
      gradient flows to them; "chunked" and "reference" differentiate them too.
    block_size: block length of the "chunked" form.
    zigzag: the tokens are in the current mesh's zigzag order (``sharding.tokens.zigzag_order``);
      only under a mesh with a ``sequence`` axis.

  A call with T == 1 and no segment ids is one decode step (``lightning_decode``) for every impl
  but "reference". Under a mesh (``jax.set_mesh``) with a ``sequence`` axis of size P > 1, T is
  split over that axis (``sharding.lightning``: each shard runs ``impl`` on its tokens, the
  shards' states are exchanged); T must then be a multiple of P.

  Returns:
    o ``[B, T, H, D]`` in q's dtype, final_state float32 ``[B, H, D, D]`` (float64 for float64
    inputs with impl="reference" or "chunked").
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
  _validate(q, k, v, slopes, initial_state, "initial_state", 4)
  b, t, h, d = q.shape
  if segment_ids is not None:
    _check_shape("segment_ids", segment_ids, (b, t))
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integer, got {segment_ids.dtype}")
  if initial_state is None:
    initial_state = jnp.zeros((b, h, d, d), jnp.float32)
  one_device = functools.partial(_lightning_one_device, impl=impl, block_size=block_size)
  if zigzag and sequence_shards() == 1:
    raise ValueError("zigzag token order needs a mesh with a sequence axis of more than one shard")
  if t > 1 and sequence_shards() > 1:
    return lightning_attention_sp(q, k, v, slopes, initial_state, segment_ids, one_device,
                                  zigzag=zigzag)
  return one_device(q, k, v, slopes, initial_state, segment_ids)


def _lightning_one_device(q, k, v, slopes, initial_state, segment_ids, *, impl: str, block_size: int):
  """`lightning_attention` on the tokens at hand (arguments checked, initial_state given)."""
  if impl == "reference":
    return lightning_attention_reference(q, k, v, slopes, initial_state, segment_ids)
  if q.shape[1] == 1 and segment_ids is None:
    o, state = lightning_decode_reference(q[:, 0], k[:, 0], v[:, 0], slopes, initial_state)
    return o[:, None], state
  if impl in ("pallas", "auto") and lightning_gpu.supports(q, k, v):
    return lightning_gpu.lightning_attention_pallas(q, k, v, slopes, initial_state, segment_ids)
  chunked = lambda: lightning_attention_chunked(q, k, v, slopes, initial_state, segment_ids,  # noqa: E731
                                                block_size)
  if impl in ("pallas", "auto") and lightning_tpu.supports(q, k, v):
    # chosen where the program is lowered, so a program compiled ahead of time for TPU takes it too
    tpu = lambda: lightning_tpu.lightning_attention_tpu(q, k, v, slopes, initial_state, segment_ids)  # noqa: E731
    return jax.lax.platform_dependent(tpu=tpu, default=chunked)
  return chunked()


def lightning_decode(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array,
                     state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One decode token for B sequences.

  Args:
    q, k, v: ``[B, H, D]``, any float dtype.
    slopes: float ``[H]``.
    state: float32 ``[B, H, D, D]``, the state after the previous token.

  Returns:
    o ``[B, H, D]`` in q's dtype and the new state float32 ``[B, H, D, D]``.
  """
  _validate(q, k, v, slopes, state, "state", 3)
  return lightning_decode_reference(q, k, v, slopes, state)
