"""LoRA adapters: the config keys, the adapted forward pass against a float64 merged-weight
oracle (bf16 / fp32 and int8 bases), training that updates only the adapters, adapters saved
and loaded on their own, `convert --merge-lora`, and a LoRA run of the tiny config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from minimax_jax import MiniMaxForCausalLM, lora, quant
from minimax_jax.checkpoint import CheckpointError, load_model, save_model
from minimax_jax.config import ConfigError
from minimax_jax.convert import main as convert_main
from minimax_jax.lora_checkpoint import WEIGHTS_FILE, load_adapters, save_adapters
from minimax_jax.training.config import load_train_config
from minimax_jax.training.loop import run
from minimax_jax.training.metrics import read_metrics
from minimax_jax.training.optimizer import make_optimizer
from minimax_jax.training.step import TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]
ALL = lora.LoraConfig(rank=3, alpha=6.0, targets=("attention", "experts", "router"))


@nnx.jit
def _forward(model: nnx.Module, ids: jax.Array) -> jax.Array:
    return model(ids)


def _ids(cfg, shape=(2, 24), seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


def _randomize(model: nnx.Module, seed: int, std: float = 0.1) -> None:
    """Random nonzero a and b factors (b starts at zero), large enough to move the logits."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, lora.LoraParam)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, std, x.shape), jnp.float32), state))


def _oracle_merge(model: nnx.Module, base: nnx.Module) -> nnx.Module:
    """`base` (a float model, no adapters) with every adapted weight of `model` set to
    W + scale * a b, computed in float64 by numpy (W: `model`'s weight, dequantized if int8)."""
    modules = dict(nnx.iter_modules(base))
    for path, m in nnx.iter_modules(model):
        for name in lora.CONTRACTED:
            adapter = getattr(m, name + lora.SUFFIX, None)
            if adapter is None:
                continue
            w = getattr(m, name)
            w = np.asarray(w.dequantized() if isinstance(w, quant.QuantizedWeight) else w[...], np.float64)
            a, b = np.asarray(adapter.a[...], np.float64), np.asarray(adapter.b[...], np.float64)
            n_c = adapter.num_contracted
            lead = a.ndim - 1 - n_c
            # d[l..., c..., o...] = sum over r of a[l..., c..., r] * b[l..., r, o...]
            outs = [*range(a.ndim, a.ndim + b.ndim - lead - 1)]
            d = np.einsum(a, [*range(a.ndim)], b, [*range(lead), a.ndim - 1, *outs], [*range(a.ndim - 1), *outs])
            getattr(modules[path], name)[...] = jnp.asarray(w + adapter.scale * d, jnp.float32)
    return base


def test_config_keys_defaults_and_errors(tmp_path):
    tcfg, _ = load_train_config(ROOT / "configs/tiny.yaml", [])
    assert not tcfg.lora_settings.enabled  # full fine-tuning is the default
    tcfg, _ = load_train_config(ROOT / "configs/tiny.yaml", [
        f"init_from={tmp_path}", "lora.rank=8", "lora.alpha=16", "lora.targets=[attention, w1, gate]",
        "lora.quantize=int8"])
    lc = tcfg.lora_settings
    assert (lc.rank, lc.scale, lc.quantize) == (8, 2.0, "int8")
    assert lc.weights == ("qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "w1", "gate")
    with pytest.raises(ConfigError, match="unknown config key 'lora.rnk'.*'lora.rank'"):
        load_train_config(ROOT / "configs/tiny.yaml", ["lora.rnk=4"])
    with pytest.raises(ConfigError, match=r"unknown target\(s\) \['q_prj'\]"):
        load_train_config(ROOT / "configs/tiny.yaml", [f"init_from={tmp_path}", "lora.rank=4", "lora.targets=[q_prj]"])
    with pytest.raises(ConfigError, match="set init_from"):
        load_train_config(ROOT / "configs/tiny.yaml", ["lora.rank=4"])
    with pytest.raises(ConfigError, match="lora.rank must be >= 0"):
        load_train_config(ROOT / "configs/tiny.yaml", ["lora.rank=-1"])
    with pytest.raises(ConfigError, match="lora.quantize.*'int4'"):
        load_train_config(ROOT / "configs/tiny.yaml", [f"init_from={tmp_path}", "lora.rank=4", "lora.quantize=int4"])
    with pytest.raises(ConfigError, match="lora.rank='x' is not a valid int"):
        load_train_config(ROOT / "configs/tiny.yaml", ["lora.rank=x"])


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_adapted_logits_match_float64_merged_weights(quantize):
    """Fresh adapters change nothing; random ones: x W + s (x a) b through the layers (attention
    einsums, per-expert grouped matmuls, the router) equals the model whose weights are W + s a b
    merged in float64."""
    cfg = tiny_config()
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    if quantize:
        quant.quantize_model(model, quantize)
    ids = _ids(cfg)
    before = np.asarray(_forward(model, ids))
    lora.add_adapters(model, ALL, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(_forward(model, ids)), before)  # b starts at zero
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_adapters(model, ALL, rngs=nnx.Rngs(1))
    # the base params keep their names: the Param state is exactly the plain model's
    plain = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    if quantize:
        quant.quantize_model(plain, quantize)
    assert ({p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
            == {p for p, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))})
    _randomize(model, seed=2)
    got = np.asarray(_forward(model, ids))
    oracle = np.asarray(_forward(_oracle_merge(model, MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))), ids))
    assert np.max(np.abs(oracle - before)) > 0.1 * np.max(np.abs(oracle))  # the adapters move the logits a lot
    # fp32 end to end: the two orders of summation differ by float32 rounding only
    np.testing.assert_allclose(got, oracle, rtol=1e-5, atol=1e-5 * np.max(np.abs(oracle)))


def _batch(cfg, seed=0):
    tokens = np.random.default_rng(seed).integers(1, cfg.vocab_size, (4, 33)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(tokens),
            "positions": jnp.asarray(np.broadcast_to(np.arange(33, dtype=np.int32), tokens.shape))}


@pytest.mark.parametrize("base_dtype, quantize", [("bfloat16", None), ("float32", "int8")])
def test_training_updates_only_the_adapters(base_dtype, quantize):
    cfg = tiny_config(param_dtype=base_dtype, dtype="float32")
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    if quantize:
        quant.quantize_model(model, quantize)
    lora.add_adapters(model, ALL, rngs=nnx.Rngs(1))
    graphdef, adapters, frozen = nnx.split(model, lora.LoraParam, ...)
    frozen_before = jax.tree.map(np.asarray, frozen)
    tcfg, _ = load_train_config(ROOT / "configs/tiny.yaml", ["learning_rate=3e-2", "warmup_steps=1", "steps=20"])
    opt = make_optimizer(tcfg)
    opt_state = opt.init(adapters)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
    moments = sorted(x.shape for x in jax.tree.leaves(opt_state) if x.ndim)
    assert moments == sorted(adapter_shapes * 2)  # AdamW's mu and nu of the adapters, nothing else
    state = TrainState(params=adapters, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(0)))
    batch = _batch(cfg)
    losses = []
    for _ in range(5):
        state, metrics = train_step(state, batch, graphdef=graphdef, optimizer=opt, grad_accum=1,
                                    aux_coef=cfg.router_aux_loss_coef, frozen=frozen)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    assert all(float(jnp.max(jnp.abs(b[...]))) > 0 for p, b in nnx.to_flat_state(state.params) if p[-1] == "b")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)


def test_save_load_and_merge_lora_cli(tmp_path, capsys):
    cfg = tiny_config()
    base = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    save_model(base, tmp_path / "base")
    model = lora.add_adapters(load_model(tmp_path / "base"), ALL, rngs=nnx.Rngs(1))
    _randomize(model, seed=3)
    ids = _ids(cfg)
    expected = np.asarray(_forward(model, ids))
    adapter_dir = save_adapters(model, tmp_path / "adapter", ALL, base=tmp_path / "base")
    assert not any(p.name == "adapter" for p in (tmp_path / "base").iterdir())  # beside the base, not in it
    adapter_bytes = (adapter_dir / WEIGHTS_FILE).stat().st_size
    n_adapter = sum(math.prod(s) for s in lora.adapter_shapes(model).values())
    assert n_adapter * 4 <= adapter_bytes < n_adapter * 4 + 64 * 1024
    reloaded = load_adapters(load_model(tmp_path / "base"), adapter_dir)
    np.testing.assert_array_equal(np.asarray(_forward(reloaded, ids)), expected)

    assert convert_main(["--merge-lora", str(adapter_dir), "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    merged = load_model(tmp_path / "merged")
    assert not nnx.state(merged, lora.LoraParam)  # a plain checkpoint
    got = np.asarray(_forward(merged, ids))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.max(np.abs(expected)))
    assert np.max(np.abs(expected - np.asarray(_forward(base, ids)))) > 0.1 * np.max(np.abs(expected))

    # bad input: a corrupted tensor, a missing adapter directory, a quantized base
    raw = bytearray((adapter_dir / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (adapter_dir / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_adapters(load_model(tmp_path / "base"), adapter_dir)
    assert convert_main(["--merge-lora", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")]) == 1
    assert "not an adapter directory" in capsys.readouterr().err
    quantized = quant.quantize_model(load_model(tmp_path / "base"), "int8")
    lora.add_adapters(quantized, ALL, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="int8-quantized; merge the adapters into the unquantized base"):
        lora.merge_adapters(quantized)


def test_lora_run_lowers_the_loss_and_trains_only_adapters(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards box".split()
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 80)))
    tcfg, mcfg = load_train_config(ROOT / "configs/tiny.yaml", [])
    base = MiniMaxForCausalLM(mcfg.replace(block_size=8), rngs=nnx.Rngs(0))
    save_model(base, tmp_path / "base")
    overrides = dict(run_dir=tmp_path / "run", data=f"[{corpus}]", seq_len=32, batch_size=4, steps=30,
                     log_every=1, eval_every=30, eval_batches=1, save_every=30, warmup_steps=2,
                     learning_rate=1e-2, sample_tokens=4, progress="false", init_from=tmp_path / "base",
                     **{"model.block_size": 8, "lora.rank": 4, "lora.targets": "[attention, experts, router]"})
    summary = run(*load_train_config(ROOT / "configs/tiny.yaml", [f"{k}={v}" for k, v in overrides.items()]))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert summary["model_dir"] is None and Path(summary["adapter_dir"]).is_dir()
    config = json.loads((Path(summary["adapter_dir"]) / "adapter_config.json").read_text())
    assert config["base"] == str((tmp_path / "base").absolute()) and config["lora"]["rank"] == 4
    # the base checkpoint is untouched; the trained adapters alone move its logits
    ids = _ids(mcfg, (1, 16))
    reloaded_base = load_model(tmp_path / "base")
    np.testing.assert_array_equal(np.asarray(_forward(reloaded_base, ids)), np.asarray(_forward(base, ids)))
    adapted = load_adapters(load_model(tmp_path / "base"), summary["adapter_dir"])
    # the training checkpoints hold the adapters and their two AdamW moments (3x the adapters'
    # float32 bytes, plus metadata), not the base: one holding the base too would be at least
    # base + 3x adapters (full fine-tuning: 3x the base)
    saved = sum(f.stat().st_size for f in Path(summary["checkpoints"]).rglob("*") if f.is_file())
    base_bytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(base, nnx.Param)))
    adapter_bytes = 4 * sum(math.prod(s) for s in lora.adapter_shapes(adapted).values())
    assert 3 * adapter_bytes <= saved < base_bytes + 3 * adapter_bytes, (saved, adapter_bytes, base_bytes)
    assert np.max(np.abs(np.asarray(_forward(adapted, ids)) - np.asarray(_forward(base, ids)))) > 1e-2
