"""Logit filtering (temperature, top_k, top_p) shared by generate and the server."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.generate import sample_logits
from minimax_jax.sampling import filtered_logits


def test_top_p_and_top_k_keep_the_right_support():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
    key = jax.random.key(0)  # fixed: 4,000 draws put the share of token 0 within 0.05 of 0.625 at 6 sigma
    counts = np.bincount(np.asarray(sample_logits(logits, key, temperature=1.0, top_p=0.7, top_k=0)), minlength=4)
    assert counts[2] == counts[3] == 0  # mass before token 2 is 0.8 >= 0.7
    assert abs(counts[0] / counts[:2].sum() - 0.5 / 0.8) < 0.05
    counts = np.bincount(np.asarray(sample_logits(logits, key, temperature=1.0, top_p=1.0, top_k=3)), minlength=4)
    assert counts[3] == 0 and counts[2] > 0
    greedy = sample_logits(logits[:3], key, temperature=0.0, top_p=0.5, top_k=1)
    assert np.asarray(greedy).tolist() == [0, 0, 0]


def test_per_row_settings_are_independent():
    logits = jnp.log(jnp.asarray([[0.4, 0.35, 0.25]] * 3, jnp.float32))
    out = np.asarray(filtered_logits(logits, jnp.asarray([1.0, 2.0, 1.0]), jnp.asarray([1.0, 1.0, 0.5]),
                                     jnp.asarray([0, 2, 0])))
    neg = np.finfo(np.float32).min
    np.testing.assert_allclose(out[0], np.log([0.4, 0.35, 0.25]), rtol=1e-6)
    assert out[1, 2] == neg and np.isclose(out[1, 0], np.log(0.4) / 2)
    assert out[2, 1] != neg and out[2, 2] == neg  # 0.4 alone is below 0.5: the second token stays
