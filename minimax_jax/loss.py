"""Chunked cross-entropy over the lm_head: the loss and its gradients without materializing `[B, T, V]`
logits.

Tokens are flattened to N = B*T, padded with weight-0 tokens to a multiple of the block size and
scanned `block` tokens at a time. A `jax.custom_vjp` keeps the backward pass O(block * V) as well:
the forward saves only the per-token log-sum-exp and NLL (float32 `[N]` each) besides its inputs,
and the backward recomputes each block's logits and softmax, returns d_h per block and accumulates
d_lm_head in a float32 `[D, V]` carry. Under a mesh that splits the tokens (`sharding.tokens`)
every device runs this over its own tokens (the lm_head whole on each, its gradient summed), and
the per-device sums are added: no device holds another's hidden states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from sharding.tokens import spec_axes, token_spec


def _block_layout(n: int, block_size: int) -> tuple[int, int]:
    """(block, num_blocks) for N tokens: block = min(block_size, N), num_blocks = ceil(N / block)."""
    block = min(block_size, n)
    return block, -(-n // block)


def _block_logits(h_blk: jax.Array, lm_head: jax.Array) -> jax.Array:
    """h_blk `[n, D]` @ lm_head `[D, V]` -> float32 logits `[n, V]` (float32 accumulation)."""
    return jnp.einsum("nd,dv->nv", h_blk, lm_head, preferred_element_type=jnp.float32)


def _forward(hb: jax.Array, lm_head: jax.Array, tb: jax.Array, wb: jax.Array):
    """Blocked forward: (loss float32 scalar, lse float32 `[nb, block]`, nll float32 `[nb, block]`).

    hb `[nb, block, D]`, tb int32 `[nb, block]` (already 0 where a token is not counted),
    wb float32 `[nb, block]`. nll is 0 where wb == 0 and NaN where a counted target is outside [0, V).
    """
    v = lm_head.shape[1]

    def body(_, xs):
        h_blk, t_blk, w_blk = xs
        logits = _block_logits(h_blk, lm_head)
        m = jnp.max(logits, axis=-1)
        lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[:, None]), axis=-1))
        valid = (t_blk >= 0) & (t_blk < v)
        target_logit = jnp.take_along_axis(logits, jnp.where(valid, t_blk, 0)[:, None], axis=-1)[:, 0]
        nll = jnp.where(w_blk != 0, jnp.where(valid, lse - target_logit, jnp.nan), 0.0)
        return None, (lse, nll)

    _, (lse, nll) = lax.scan(body, None, (hb, tb, wb))
    return jnp.sum(wb * nll), lse, nll


@jax.custom_vjp
def _blocked_cross_entropy(hb: jax.Array, lm_head: jax.Array, tb: jax.Array, wb: jax.Array) -> jax.Array:
    """sum(wb * nll) over blocked tokens; shapes as in `_forward`."""
    return _forward(hb, lm_head, tb, wb)[0]


def _blocked_cross_entropy_fwd(hb, lm_head, tb, wb):
    loss, lse, nll = _forward(hb, lm_head, tb, wb)
    return loss, (hb, lm_head, tb, wb, lse, nll)


def _blocked_cross_entropy_bwd(res, g):
    """d_h `[nb, block, D]` in h's dtype, d_lm_head `[D, V]` in lm_head's dtype (float32-accumulated),
    no cotangent for the integer targets, d_weights = g * nll float32 `[nb, block]`.

    d_logits = g * w * (softmax - onehot) is formed in float32 and cast to the compute dtype
    (h's dtype) for the two matmuls, which accumulate in float32.
    """
    hb, lm_head, tb, wb, lse, nll = res
    block, v = hb.shape[1], lm_head.shape[1]
    scale = jnp.where(wb != 0, g * wb, 0.0)
    iota = lax.broadcasted_iota(jnp.int32, (block, v), 1)

    def body(d_lm_head, xs):
        h_blk, t_blk, lse_blk, s_blk = xs
        p = jnp.exp(_block_logits(h_blk, lm_head) - lse_blk[:, None])
        d_logits = (s_blk[:, None] * (p - (iota == t_blk[:, None]))).astype(hb.dtype)
        d_h = jnp.einsum("nv,dv->nd", d_logits, lm_head, preferred_element_type=jnp.float32)
        d_lm_head = d_lm_head + jnp.einsum("nd,nv->dv", h_blk, d_logits, preferred_element_type=jnp.float32)
        return d_lm_head, d_h.astype(hb.dtype)

    d_lm_head, d_h = lax.scan(body, jnp.zeros(lm_head.shape, jnp.float32), (hb, tb, lse, scale))
    return d_h, d_lm_head.astype(lm_head.dtype), None, g * nll


_blocked_cross_entropy.defvjp(_blocked_cross_entropy_fwd, _blocked_cross_entropy_bwd)


def chunked_cross_entropy(h: jax.Array, lm_head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                          block_size: int = 1024) -> jax.Array:
    """Sum over tokens of weights * (-log softmax(h @ lm_head)[target]), float32 scalar.

    h `[B, T, D]` in the compute dtype (bfloat16 or float32: the final-normed hidden states),
    lm_head `[D, V]` in the same dtype, targets integer `[B, T]`, weights float `[B, T]` (0 = not
    counted; such a token's target may be any value). Logits are computed `block_size` tokens at a
    time as `jnp.einsum("nd,dv->nv", h, lm_head, preferred_element_type=jnp.float32)`; memory is
    O(block_size * V) in the forward and the backward pass. Gradients: d_h in h's dtype, d_lm_head
    accumulated in float32 and returned in lm_head's dtype, d_weights = the per-token NLL (0 where
    weights == 0). A counted token whose target is outside [0, V) makes the loss NaN.
    """
    if h.ndim != 3:
        raise ValueError(f"h must be [B, T, D]; got h {h.shape}")
    if lm_head.ndim != 2 or lm_head.shape[0] != h.shape[2]:
        raise ValueError(f"lm_head must be [D, V] with D = h.shape[2]; got h {h.shape}, lm_head {lm_head.shape}")
    if targets.shape != h.shape[:2]:
        raise ValueError(f"targets must be [B, T] = h.shape[:2]; got h {h.shape}, targets {targets.shape}")
    if weights.shape != h.shape[:2]:
        raise ValueError(f"weights must be [B, T] = h.shape[:2]; got h {h.shape}, weights {weights.shape}")
    if not jnp.issubdtype(h.dtype, jnp.floating) or lm_head.dtype != h.dtype:
        raise ValueError(f"h and lm_head must share one float dtype; got h {h.dtype}, lm_head {lm_head.dtype}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer; got {targets.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")

    spec = token_spec(*h.shape[:2])
    if spec is None:
        return _local_cross_entropy(h, lm_head, targets, weights, block_size)
    axes = tuple(sorted(spec_axes(spec)))
    run = jax.shard_map(
        lambda h, lm_head, targets, weights: _local_cross_entropy(h, lm_head, targets, weights,
                                                                  block_size)[None],
        in_specs=(spec, P(), spec, spec), out_specs=P(axes), axis_names=set(axes), check_vma=False)
    return jnp.sum(run(h, lm_head, targets, weights))


def _local_cross_entropy(h: jax.Array, lm_head: jax.Array, targets: jax.Array, weights: jax.Array,
                         block_size: int) -> jax.Array:
    """`chunked_cross_entropy` over the tokens at hand (arguments checked)."""
    b, t, d = h.shape
    n = b * t
    if n == 0:
        return jnp.zeros((), jnp.float32)
    block, num_blocks = _block_layout(n, block_size)
    pad = block * num_blocks - n
    w = weights.reshape(n).astype(jnp.float32)
    tok = jnp.where(w != 0, targets.reshape(n).astype(jnp.int32), 0)
    hf = h.reshape(n, d)
    if pad:
        hf = jnp.pad(hf, ((0, pad), (0, 0)))
        tok = jnp.pad(tok, (0, pad))
        w = jnp.pad(w, (0, pad))
    return _blocked_cross_entropy(hf.reshape(num_blocks, block, d), lm_head,
                                  tok.reshape(num_blocks, block), w.reshape(num_blocks, block))
