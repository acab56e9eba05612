"""Lightning-attention kernels against the float64 token recurrence: shared by the kernel tests."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import lightning_attention

# MiniMax slopes (spec §3.3): layer 0 head 0, layer 0 head 31, layer 78 head 0, layer 78 head 63
SLOPES = np.array([0.9170132, 0.0625006, 0.01161693, 4.948575e-05])


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (shapes equal, actual finite)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_segments(rng, b, t, first_row_cuts=None):
    """Rows with boundaries at random places (row 0 at ``first_row_cuts`` when given), one of them
    reusing an earlier id (1, 2, 1)."""
    ids = np.ones((b, t), np.int32)
    for row in range(b):
        cut1, cut2 = np.sort(rng.choice(np.arange(1, t), size=2, replace=False))
        if row == 0 and first_row_cuts is not None:
            cut1, cut2 = first_row_cuts
        ids[row, cut1:] = 2
        ids[row, cut2:] = 1
    return jnp.asarray(ids)


def float64_errors(rng, kernel: Callable, b, t, slopes, d, dtype, segments, initial_state,
                   cuts=None) -> dict[str, float]:
    """Relative errors (``rel_err``) of the outputs, final state and gradients of q, k, v and
    initial_state of ``kernel(q, k, v, slopes, initial_state, segment_ids) -> (o, final_state)``
    against the float64 recurrence, for a random loss of both outputs; q, k, v ``[b, t, H, d]`` in
    ``dtype`` with H = len(slopes); ``cuts``: segment starts of row 0 (see ``random_segments``)."""
    h = len(slopes)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)) * 0.5, dtype) for _ in range(3))
    slopes = jnp.asarray(slopes, jnp.float32)
    s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32) if initial_state else None
    seg = random_segments(rng, b, t, cuts) if segments else None
    w_o = rng.normal(size=(b, t, h, d))
    w_s = rng.normal(size=(b, h, d, d))

    def loss(fn, cast):
        def f(q, k, v, s0):
            o, state = fn(q, k, v, s0)
            return (
                jnp.sum(o.astype(cast) * jnp.asarray(w_o, cast))
                + jnp.sum(state * jnp.asarray(w_s, cast))
            ), (o, state)

        return jax.grad(f, argnums=(0, 1, 2, 3) if initial_state else (0, 1, 2), has_aux=True)

    grads, (o, state) = loss(lambda q, k, v, s0: kernel(q, k, v, slopes, s0, seg), jnp.float32)(
        q, k, v, s0)
    assert o.dtype == dtype and state.dtype == jnp.float32
    with jax.enable_x64(True):

        def reference(q, k, v, s0):
            return lightning_attention(q, k, v, slopes.astype(jnp.float64), initial_state=s0,
                                       segment_ids=seg, impl="reference")

        up = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        grads_ref, (o_ref, state_ref) = loss(reference, jnp.float64)(up(q), up(k), up(v), up(s0))
        errs = {"o": rel_err(o, o_ref), "final_state": rel_err(state, state_ref)}
        for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_ref):
            errs[name] = rel_err(g, g_ref)
    return errs


def assert_errors_below(errs: dict[str, float], tol: float, why: str) -> None:
    """Every error of ``float64_errors`` below ``tol`` (``why``: what sets the tolerance)."""
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"errors above {tol} ({why}): {errs}"
