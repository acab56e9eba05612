"""Block (chunked) form of lightning attention in plain JAX (spec §3.5), with segment resets.

The sequence is cut into blocks of C tokens; ``lax.scan`` carries the float32 state from block to
block. For token i of a block (0-based), n_i counts the decay steps from the state entering the block
to token i (n_i = i + 1 on real tokens; padding tokens add no step), and r_i is the cumulative
number of segment starts up to token i. With per-head slope s:

    intra:  o_i += sum_{j <= i, r_j = r_i} exp(-s (n_i - n_j)) (q_i . k_j) v_j
    inter:  o_i += [r_i = r_in] exp(-s n_i) q_i S_in
    state:  S_out = [r_last = r_in] exp(-s n_last) S_in + sum_{j, r_j = r_last} exp(-s (n_last - n_j)) k_j^T v_j

where r_in is the reset count of the state entering the block. Every exponent is <= 0, so the form is
stable for any slope and block size (no factored exp(+s i)); the decay counts are integers, so their
differences are exact. T is padded at the end to a multiple of C with zero q, k, v that add no decay,
so the final state is the one after the last real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.reference import segment_starts, state_dtype


def block_coefficients(
    slopes: jax.Array, n: jax.Array, r: jax.Array, r_in: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Decay and reset coefficients of one block.

    slopes ``[H]`` (float); n int ``[C]`` decay-step counts; r int ``[B, C]`` reset counts;
    r_in int ``[B]`` reset count of the state entering the block. Returns, in slopes' dtype:
    intra mask ``[B, H, C, C]`` (query i, key j), query decay ``[B, H, C]``, key decay ``[B, H, C]``
    (to the block's last token) and state decay ``[B, H]``.
    """
    s = slopes[None, :, None]
    diff = n[:, None] - n[None, :]
    causal = jnp.arange(n.shape[0])[:, None] >= jnp.arange(n.shape[0])[None, :]
    same = (r[:, :, None] == r[:, None, :]) & causal
    intra = jnp.where(
        same[:, None], jnp.exp(-slopes[None, :, None, None] * jnp.maximum(diff, 0)), 0
    )
    live = (r == r_in[:, None])[:, None, :]
    q_decay = jnp.where(live, jnp.exp(-s * n[None, None, :]), 0)
    last = (r == r[:, -1:])[:, None, :]
    k_decay = jnp.where(last, jnp.exp(-s * (n[-1] - n)[None, None, :]), 0)
    s_decay = jnp.where((r[:, -1] == r_in)[:, None], jnp.exp(-slopes[None, :] * n[-1]), 0)
    return (
        intra.astype(slopes.dtype),
        q_decay.astype(slopes.dtype),
        k_decay.astype(slopes.dtype),
        s_decay.astype(slopes.dtype),
    )


def lightning_attention_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    segment_ids: jax.Array | None,
    block_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Block form with ``lax.scan`` over blocks of ``block_size`` tokens.

    q, k, v ``[B, T, H, D]`` (any float dtype); slopes ``[H]``; initial_state ``[B, H, D, D]``;
    segment_ids int ``[B, T]`` or None. Returns o ``[B, T, H, D]`` in q's dtype and the final state
    ``[B, H, D, D]`` (float32, or float64 when an input is float64). Memory is O(T * block_size).
    """
    b, t, h, d = q.shape
    c = block_size
    nb = -(-t // c)
    pad = nb * c - t
    dt = state_dtype(q, k, v, initial_state)
    precision = lax.Precision.HIGHEST

    def blocks(x):  # [B, T, ...] -> [nb, B, C, ...], zero padded at the end
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, nb, c) + x.shape[2:]), 1, 0)

    resets = jnp.cumsum(segment_starts(segment_ids, b, t).astype(jnp.int32), axis=1)
    resets = jnp.pad(resets, [(0, 0), (0, pad)], mode="edge")  # pads stay in the last segment
    real = (jnp.arange(nb * c) < t).astype(jnp.int32).reshape(nb, c)
    steps = jnp.cumsum(real, axis=1)  # decay steps from the block's entering state
    slopes_dt = slopes.astype(dt)

    def step(carry, xs):
        state, r_in = carry
        q_c, k_c, v_c, n, r = xs
        q_c, k_c, v_c = q_c.astype(dt), k_c.astype(dt), v_c.astype(dt)
        intra, q_decay, k_decay, s_decay = block_coefficients(slopes_dt, n, r, r_in)
        scores = jnp.einsum("bihk,bjhk->bhij", q_c, k_c, precision=precision) * intra
        o = jnp.einsum("bhij,bjhv->bihv", scores, v_c, precision=precision)
        o = (
            o
            + jnp.einsum("bihk,bhkv->bihv", q_c, state, precision=precision)
            * jnp.moveaxis(q_decay, 1, 2)[..., None]
        )
        kv = jnp.einsum(
            "bjhk,bjhv->bhkv",
            k_c * jnp.moveaxis(k_decay, 1, 2)[..., None],
            v_c,
            precision=precision,
        )
        state = s_decay[..., None, None] * state + kv
        return (state, r[:, -1]), o.astype(q.dtype)

    xs = (blocks(q), blocks(k), blocks(v), steps, jnp.moveaxis(resets.reshape(b, nb, c), 1, 0))
    (final_state, _), o = lax.scan(step, (initial_state.astype(dt), jnp.zeros((b,), jnp.int32)), xs)
    o = jnp.moveaxis(o, 0, 1).reshape(b, nb * c, h, d)[:, :t]
    return o, final_state
