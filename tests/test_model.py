"""Model-level checks that need no reference implementation: cache consistency, padding,
partial RoPE against an independent implementation, the full-size config, config parsing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FULL, LIN, tiny_config
from minimax_jax import ConfigError, MiniMaxConfig, MiniMaxForCausalLM, init_cache
from minimax_jax.cache import reset_rows
from minimax_jax.generate import generate
from minimax_jax.rope import apply_rope
from sharding import logical_to_spec


def _model(cfg, rng):
    return MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def _cache(cfg, layout: str, rng, batch: int, length: int):
    """An empty cache: "contiguous" (each row owns a run of pages, what `generate` uses) or
    "paged" (pages of 5 tokens handed out in random order from a pool with pages to spare)."""
    if layout == "contiguous":
        return init_cache(cfg, batch, length)
    cache = init_cache(cfg, batch, length, page_size=5, num_pages=batch * 10 + 7)
    pages = rng.permutation(batch * 10 + 7)[:batch * cache.page_table.shape[1]]
    table = jnp.asarray(pages.reshape(batch, -1), jnp.int32)
    return reset_rows(cache, jnp.arange(batch, dtype=jnp.int32), table)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_prefill_then_decode_equals_full_forward(rng, layout):
    cfg = tiny_config()
    model = _model(cfg, rng)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 45)), jnp.int32)
    full = np.asarray(model(ids))
    cache = _cache(cfg, layout, rng, 2, 48)
    # an uneven chunked prefill (crossing lightning block boundaries and pages), then single tokens
    pieces = []
    for lo, hi in ((0, 19), (19, 40)):
        logits, cache, _ = model.forward(ids[:, lo:hi], cache=cache)
        pieces.append(np.asarray(logits))
    for t in range(40, 45):
        logits, cache, _ = model.forward(ids[:, t:t + 1], cache=cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-5 * np.abs(full).max())
    assert list(np.asarray(cache.length)) == [45, 45] and list(np.asarray(cache.next_position)) == [45, 45]


def test_paged_cache_equals_contiguous_cache(rng):
    """Left-padded prefill and decode give the same logits through shuffled pages as through
    each row's own run of pages (the paged pool also holds stale data of an earlier use)."""
    cfg = tiny_config()
    model = _model(cfg, rng)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 30)), jnp.int32)
    mask = jnp.asarray(np.arange(30)[None, :] >= np.asarray([[0], [11]]), jnp.int32)
    results = []
    for layout in ("contiguous", "paged"):
        cache = _cache(cfg, layout, rng, 2, 40)
        if layout == "paged":  # fill the pool with another sequence's K/V, then start the rows over
            _, used, _ = model.forward(jnp.flip(ids, axis=1), cache=cache)
            cache = reset_rows(used, jnp.arange(2, dtype=jnp.int32), used.page_table)
        logits, cache, _ = model.forward(ids[:, :23], attention_mask=mask[:, :23], cache=cache)
        steps = [np.asarray(logits)]
        for t in range(23, 30):
            logits, cache, _ = model.forward(ids[:, t:t + 1], cache=cache)
            steps.append(np.asarray(logits))
        results.append(np.concatenate(steps, axis=1)[np.asarray(mask, bool)])
    scale = np.abs(results[0]).max()
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-6 * scale)


def test_left_padding_equals_unpadded_rows(rng):
    cfg = tiny_config()
    model = _model(cfg, rng)
    long = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 23)), jnp.int32)
    short = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 15)), jnp.int32)
    pad = jnp.full((1, 8), 7, jnp.int32)  # arbitrary token ids under the padding
    batch = jnp.concatenate([long, jnp.concatenate([pad, short], axis=1)])
    mask = jnp.concatenate([jnp.ones((1, 23), jnp.int32),
                            jnp.concatenate([jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 15), jnp.int32)], 1)])
    logits = np.asarray(model(batch, attention_mask=mask))
    alone = np.asarray(model(short))
    np.testing.assert_allclose(logits[1, 8:], alone[0], rtol=0, atol=1e-5 * np.abs(alone).max())
    np.testing.assert_allclose(logits[0], np.asarray(model(long))[0], rtol=0, atol=1e-5 * np.abs(alone).max())
    out = np.asarray(generate(model, batch, 10, attention_mask=mask))
    np.testing.assert_array_equal(out[1], np.asarray(generate(model, short, 10))[0])
    np.testing.assert_array_equal(out[0], np.asarray(generate(model, long, 10))[0])


def test_segment_ids_isolate_packed_documents(rng):
    cfg = tiny_config()
    model = _model(cfg, rng)
    a = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 21)), jnp.int32)
    b = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 30)), jnp.int32)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.concatenate([jnp.full((1, 21), 1), jnp.full((1, 30), 2)], axis=1).astype(jnp.int32)
    logits = np.asarray(model(packed, segment_ids=seg))
    ref_a, ref_b = np.asarray(model(a)), np.asarray(model(b))
    scale = max(np.abs(ref_a).max(), np.abs(ref_b).max())
    np.testing.assert_allclose(logits[0, :21], ref_a[0], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(logits[0, 21:], ref_b[0], rtol=0, atol=1e-5 * scale)


def _rope_oracle(x, pos, theta, r):
    """Per-pair loop straight from the spec's formula, in float64."""
    out = x.astype(np.float64).copy()
    half = r // 2
    for i in range(half):
        ang = pos[..., None].astype(np.float64) * theta ** (-2.0 * i / r)
        a, b = x[..., i].astype(np.float64), x[..., i + half].astype(np.float64)
        out[..., i] = a * np.cos(ang) - b * np.sin(ang)
        out[..., i + half] = b * np.cos(ang) + a * np.sin(ang)
    return out


@pytest.mark.parametrize("rotary_dim", [8, 16])
def test_partial_rope_matches_spec_formula(rng, rotary_dim):
    x = rng.standard_normal((2, 9, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 64, (2, 9))  # fp32 angles stay exact to ~1e-6 rad
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=1e4, rotary_dim=rotary_dim))
    want = _rope_oracle(x, pos, 1e4, rotary_dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_partial_rope_changes_the_model(rng):
    """rotary_dim reaches the softmax layers: half-head and full-head RoPE give different logits."""
    cfg = tiny_config()
    seed = int(rng.integers(1 << 30))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 30)), jnp.int32)
    half = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(seed))(ids)
    full = MiniMaxForCausalLM(cfg.replace(rotary_dim=16), rngs=nnx.Rngs(seed))(ids)
    assert np.abs(np.asarray(half) - np.asarray(full)).max() > 1e-3


def test_full_text01_config_abstract():
    cfg = MiniMaxConfig()
    assert cfg.block_pattern == (LIN,) * 7 + (FULL,) and cfg.num_blocks == 10
    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert sum(int(np.prod(v.shape)) for _, v in params) == 456_089_655_296
    for path, v in params:
        names = v.get_metadata()["out_sharding"]
        assert len(names) == len(v.shape), path
        logical_to_spec(names)  # every logical name has a rule
    slopes = cfg.slopes()
    np.testing.assert_allclose(slopes[0, [0, 1, 31, 63]], [9.170132e-01, 8.409048e-01, 6.250062e-02, 3.906289e-03], rtol=2e-6)
    np.testing.assert_allclose(slopes[40, [0, 1, 31, 63]], [4.527074e-01, 4.151345e-01, 3.085506e-02, 1.928441e-03], rtol=2e-6)
    # deep layers: the remote-code form 1 - l/79 + 1e-5 (the spec's table uses HF's, 1e-5 apart here)
    np.testing.assert_allclose(slopes[78, [0, 63]], [0.9170040 * (1 - 78 / 79 + 1e-5), 2**-8 * (1 - 78 / 79 + 1e-5)], rtol=2e-6)


def test_block_pattern_for_irregular_layer_types():
    cfg = tiny_config(num_hidden_layers=5, layer_types=[LIN, FULL, LIN, LIN, FULL])
    assert cfg.block_pattern == tuple(cfg.layer_types) and cfg.num_blocks == 1
    cfg = tiny_config(num_hidden_layers=6, layer_types=[LIN, FULL] * 3)
    assert cfg.block_pattern == (LIN, FULL) and cfg.num_blocks == 3


def test_scan_compiles_one_block_whatever_the_depth():
    """The jaxpr of a 2-block and a 6-block model are the same size: depth is a scan length."""
    sizes = []
    for repeat in (2, 6):
        cfg = tiny_config(num_hidden_layers=4 * repeat, layer_types=[LIN, LIN, LIN, FULL] * repeat)
        model = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 8), jnp.int32)))(state)
        sizes.append(len(str(jaxpr)))
    assert sizes[0] == pytest.approx(sizes[1], rel=0.01)


def test_config_yaml_and_overrides(tmp_path):
    cfg = MiniMaxConfig.from_yaml("configs/tiny.yaml", ["hidden_size=32", "dtype=bfloat16"])
    assert cfg.hidden_size == 32 and cfg.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown config key 'hiden_size'.*hidden_size"):
        MiniMaxConfig.from_yaml("configs/tiny.yaml", ["hiden_size=32"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match="num_layers"):
        MiniMaxConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="dtype"):
        tiny_config(dtype="float8")
    real = MiniMaxConfig.from_yaml("configs/minimax-text-01.yaml")
    assert real == MiniMaxConfig()


def test_hf_config_layouts_agree():
    common = dict(vocab_size=200064, hidden_size=6144, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, head_dim=128, intermediate_size=9216, num_local_experts=32,
                  num_experts_per_tok=2, max_position_embeddings=10240000)
    alpha = 3.5565588200778455
    remote = dict(common, attn_type_list=([0] * 7 + [1]) * 10, rotary_dim=64,
                  rope_theta=1e7, layernorm_full_attention_alpha=alpha, layernorm_linear_attention_alpha=alpha,
                  layernorm_mlp_alpha=alpha, layernorm_full_attention_beta=1.0,
                  layernorm_linear_attention_beta=1.0, layernorm_mlp_beta=1.0)
    native = dict(common, layer_types=list(MiniMaxConfig().layer_types),
                  rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.5},
                  full_attn_alpha_factor=alpha, linear_attn_alpha_factor=alpha, mlp_alpha_factor=alpha)
    a = MiniMaxConfig.from_hf_config(remote, dtype="bfloat16")
    b = MiniMaxConfig.from_hf_config(native, dtype="bfloat16")
    assert a == b == MiniMaxConfig()
    assert MiniMaxConfig.from_hf_config(a.to_hf_config()) == a
    no_rotary = dict(native, rope_parameters={"rope_theta": 1e7})
    assert MiniMaxConfig.from_hf_config(no_rotary).rotary_dim == 128


def test_remat_changes_memory_not_results(rng):
    cfg = tiny_config()
    seed = int(rng.integers(1 << 30))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
    grads = []
    for remat in (False, True):
        graphdef, state = nnx.split(MiniMaxForCausalLM(cfg.replace(remat=remat), rngs=nnx.Rngs(seed)))
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(ids) ** 2)  # noqa: E731
        grads.append(jax.grad(loss)(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_long_packed_row_documents_equal_documents_alone(rng, monkeypatch):
    from pallas_kernels import softmax
    monkeypatch.setattr(softmax, "BLOCK_Q", 128)  # documents straddle query and key blocks
    monkeypatch.setattr(softmax, "BLOCK_K", 64)
    cfg = tiny_config()
    model = _model(cfg, rng)
    lengths = (300, 517, 95, 448)  # 1,360 tokens; no length a multiple of a block
    docs = [jnp.asarray(rng.integers(0, cfg.vocab_size, (1, n)), jnp.int32) for n in lengths]
    seg = jnp.concatenate([jnp.full((1, n), i + 7) for i, n in enumerate(lengths)], axis=1)
    logits = np.asarray(jax.jit(lambda ids, s: model(ids, segment_ids=s))(
        jnp.concatenate(docs, axis=1), seg.astype(jnp.int32)))
    start = 0
    for doc, n in zip(docs, lengths):
        alone = np.asarray(model(doc))[0]
        # float32 sums over the hidden size and over <= 517 keys, then the lm_head: 1e-5 of the
        # largest logit
        np.testing.assert_allclose(logits[0, start:start + n], alone, rtol=0,
                                   atol=1e-5 * np.abs(alone).max())
        start += n


def test_training_memory_is_linear_in_sequence_length():
    from minimax_jax.loss import chunked_cross_entropy
    t = 32768
    cfg = MiniMaxConfig.from_yaml("configs/tiny.yaml", ["remat=true"])
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))))

    def loss(params, ids, seg):
        model = nnx.merge(graphdef, params)
        h, _, _ = model.hidden_states(ids, segment_ids=seg)
        weights = jnp.ones(ids.shape, jnp.float32)
        return chunked_cross_entropy(h, model.lm_head[...].astype(h.dtype), ids, weights)

    row = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, row, row).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # one [T, T] float32 score matrix alone would be 4 GiB
    assert temp < 3 * 2**30, f"forward+backward of one {t}-token row needs {temp / 2**30:.2f} GiB"
