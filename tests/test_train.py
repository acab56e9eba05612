"""train.py: exact resume after SIGTERM and SIGKILL, fault handling, init_from, grad accumulation."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax import load_model
from minimax_jax.checkpoint import CheckpointError
from minimax_jax.config import ConfigError
from minimax_jax.training.config import load_train_config
from minimax_jax.training.loop import NonFiniteLoss, build_model, run
from minimax_jax.training.metrics import read_metrics
from minimax_jax.training.optimizer import make_optimizer
from minimax_jax.training.step import TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while seven wizards box".split()
    rng = np.random.default_rng(0)
    for i in range(24):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 60 + 7 * i)))
    return d


def _overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    values = dict(run_dir=str(run_dir), data=f"[{corpus}]", seq_len=32, batch_size=4, steps=8,
                  log_every=1, eval_every=100, eval_batches=1, save_every=2, warmup_steps=2,
                  sample_tokens=4, progress="false", **{"model.block_size": 8})
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (re-run after a resume) must have logged the same loss."""
    out: dict[int, float] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "loss" in r:
            assert out.setdefault(r["step"], r["loss"]) == r["loss"], f"step {r['step']} differs on re-run"
    return out


def _start(overrides: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", "configs/tiny.yaml", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(metrics)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_resume_after_sigterm_and_sigkill_is_exact(corpus, tmp_path):
    base = tmp_path / "uninterrupted"
    run(*load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, base)))
    want = _losses(base)
    assert sorted(want) == list(range(1, 9))

    resumed = tmp_path / "resumed"
    proc = _start(_overrides(corpus, resumed))
    _wait_for_step(proc, resumed, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "saved step" in out
    stopped_at = max(_losses(resumed))
    assert stopped_at < 8
    assert stopped_at in [int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()]

    proc = _start(_overrides(corpus, resumed))
    _wait_for_step(proc, resumed, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    proc = _start(_overrides(corpus, resumed))  # the last resume, in a process of its own too
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    got = _losses(resumed)
    assert max(got) == 8
    assert got == want  # bitwise: same floats, every step, including the re-run ones


def test_corrupt_latest_checkpoint_falls_back(corpus, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run(*load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, run_dir, steps=4)))
    want = _losses(run_dir)
    latest = run_dir / "checkpoints" / "4"
    for f in latest.rglob("*"):
        if f.is_file() and f.parent.name != "extra":
            f.write_bytes(b"garbage")
    summary = run(*load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, run_dir, steps=4)))
    assert "trying an older one" in caplog.text
    assert (run_dir / "checkpoints" / "4.unreadable").is_dir()  # kept aside, not deleted
    assert summary["steps"] == 4
    assert _losses(run_dir) == want  # steps 3-4 re-run from the step-2 checkpoint, identically


def test_non_finite_loss_stops_after_max_bad_steps(corpus, tmp_path):
    cfgs = load_train_config(ROOT / "configs/tiny.yaml",
                             _overrides(corpus, tmp_path / "nan", learning_rate="1.0e30", max_bad_steps=3))
    with pytest.raises(NonFiniteLoss, match="3 consecutive steps"):
        run(*cfgs)
    skipped = [r["skipped_steps"] for r in read_metrics(tmp_path / "nan" / "metrics.jsonl")]
    assert max(skipped) >= 2


def test_unwritable_checkpoint_dir_fails_before_training(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run_dir = tmp_path / "run"
    cfgs = load_train_config(ROOT / "configs/tiny.yaml",
                             _overrides(corpus, run_dir, checkpoint_dir=str(blocker / "ckpt")))
    with pytest.raises(PermissionError, match="not writable"):
        run(*cfgs)
    assert not (run_dir / "metrics.jsonl").exists()


def test_init_from_fine_tunes_a_saved_model(corpus, tmp_path):
    first = tmp_path / "first"
    run(*load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, first, steps=2)))
    second = tmp_path / "second"
    # learning rate 0: fine-tuning must start from exactly the loaded weights and keep them
    run(*load_train_config(ROOT / "configs/tiny.yaml",
                           _overrides(corpus, second, steps=1, learning_rate=0.0, init_from=str(first / "model"))))
    a = nnx.to_flat_state(nnx.state(load_model(first / "model"), nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(load_model(second / "model"), nnx.Param)))
    for path, v in a:
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(b[path][...]), err_msg=str(path))
    # the run's compute settings reach every layer of a model initialised from a checkpoint
    tcfg, mcfg = load_train_config(ROOT / "configs/tiny.yaml",
                                   _overrides(corpus, second, init_from=str(first / "model"),
                                              **{"model.dtype": "bfloat16"}))
    model = build_model(tcfg, mcfg)
    assert model.config.dtype == "bfloat16" and model.config.param_dtype == "float32"
    assert model.blocks.layers[0].self_attn.dtype == jnp.bfloat16
    assert model.blocks.layers[0].block_sparse_moe.dtype == jnp.bfloat16


def test_grad_accumulation_matches_one_big_batch(corpus, tmp_path):
    tcfg, mcfg = load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, tmp_path))
    from minimax_jax.model import MiniMaxForCausalLM
    from minimax_jax.tokenizer import ByteTokenizer
    from minimax_jax.training.data import DataPipeline, find_files

    data = DataPipeline(find_files([corpus]), ByteTokenizer(), seq_len=32, batch_size=4, val_fraction=0.1, seed=0)
    batch = next(data.train)
    graphdef, params = nnx.split(MiniMaxForCausalLM(mcfg, rngs=nnx.Rngs(0)))
    opt = make_optimizer(tcfg)
    results = []
    for accum in (1, 2):
        state = TrainState(params=jax.tree.map(jnp.copy, params), opt_state=opt.init(params),
                           step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(0)))
        new, metrics = train_step(state, batch, graphdef=graphdef, optimizer=opt, grad_accum=accum,
                                  aux_coef=mcfg.router_aux_loss_coef)
        results.append((float(metrics["ce"]), float(metrics["grad_norm"])))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'stepz'.*'steps'"):
        load_train_config(ROOT / "configs/tiny.yaml", ["stepz=3"])
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_train_config(ROOT / "configs/tiny.yaml", ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="unknown config key 'mesh.experts'.*'mesh.expert'"):
        load_train_config(ROOT / "configs/tiny.yaml", ["mesh.experts=2"])


def test_mesh_axes_override_one_at_a_time():
    tcfg, _ = load_train_config(ROOT / "configs/tiny.yaml", ["mesh={data: 2}", "mesh.expert=2", "mesh.tensor=2"])
    assert tcfg.mesh == {"data": 2, "expert": 2, "tensor": 2}


def test_config_without_a_model_section_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="no model: section.*configs/tiny.yaml"):
        load_train_config(empty)


@pytest.mark.parametrize("mesh, logged", [
    ("{data: 2, fsdp: 2, tensor: 2}", "{'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2, 'sequence': 1}"),
    ("{data: 2, sequence: 4}", "{'data': 2, 'fsdp': 1, 'expert': 1, 'tensor': 1, 'sequence': 4}"),
    ("{data: 2, expert: 2, tensor: 2}", "{'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 2, 'sequence': 1}"),
])
def test_mesh_training_matches_single_device(corpus, tmp_path, mesh, logged):
    """Two steps on an 8-device CPU mesh give the single-device losses (with a sequence axis the
    lightning and softmax layers run split over it, with an expert axis the experts)."""
    single = tmp_path / "single"
    run(*load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, single, steps=2, batch_size=4)))
    meshed = tmp_path / "mesh"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", "configs/tiny.yaml",
         *_overrides(corpus, meshed, steps=2, batch_size=4), f"mesh={mesh}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"mesh {logged} over 8 devices" in proc.stdout + proc.stderr
    want, got = _losses(single), _losses(meshed)
    assert sorted(got) == [1, 2]
    np.testing.assert_allclose([got[s] for s in (1, 2)], [want[s] for s in (1, 2)], rtol=1e-5)


def _flip_middle_bytes(file: Path, count: int = 64) -> None:
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    file.write_bytes(bytes(data))


def test_resume_verifies_checksums_removes_unfinished_saves_and_logs_each_step_once(corpus, tmp_path, caplog):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    config = lambda: load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, run_dir, steps=4))  # noqa: E731
    run(*config())
    want = _losses(run_dir)
    _flip_middle_bytes(max((f for f in (ckpts / "4" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size))
    (ckpts / "6.orbax-checkpoint-tmp-1733011200").mkdir()  # what a save killed before it finished leaves
    with (run_dir / "metrics.jsonl").open("a") as f:  # records of a killed run past the newest checkpoint
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    caplog.set_level(logging.INFO, logger="minimax_jax.training")
    summary = run(*config())
    assert re.search(rf"{ckpts / '4'}: tensor \S+ does not match its checksum", caplog.text)
    assert "trying an older one" in caplog.text and (ckpts / "4.unreadable").is_dir()
    assert f"removed {ckpts / '6.orbax-checkpoint-tmp-1733011200'}" in caplog.text
    assert not list(ckpts.glob("*.orbax-checkpoint-tmp*"))
    assert summary["steps"] == 4 and _losses(run_dir) == want  # steps 3-4 re-run from step 2, identically
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    shutil.rmtree(ckpts / "4" / "checksums")
    with pytest.raises(CheckpointError, match=f"{ckpts / '4'} has no checksums.*--no-verify"):
        run(*config())
    assert run(*config(), verify=False)["steps"] == 4


def _train_main(capsys, *args: str) -> tuple[int, str]:
    """(exit code, its `error: ...` line or "") of train.py's main run in this process,
    asserting at most one error line and no traceback."""
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(list(args))
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in out.err + out.out and len(errors) <= 1, out.err
    return code, errors[0] if errors else ""


def test_bad_training_inputs_are_one_line_errors(corpus, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("steps: [1\nmodel: {}\n")
    (tmp_path / "eight.yaml").write_text('model:\n  num_hidden_layers: "eight"\n')
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"text": \n{"text": "three"}\n')
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "broken_ckpt").mkdir()
    (tmp_path / "broken_ckpt" / "config.json").write_text("{")
    tiny = ["--config", str(ROOT / "configs/tiny.yaml")]
    cases = [
        ([f"--config={tmp_path / 'bad.yaml'}"], rf"{tmp_path / 'bad.yaml'}: invalid YAML at line 2 column \d+"),
        ([f"--config={tmp_path / 'eight.yaml'}"], f"{tmp_path / 'eight.yaml'}: num_hidden_layers='eight' is not a valid int"),
        (tiny + _overrides(tmp_path / "docs.jsonl", tmp_path / "r1"), f"{tmp_path / 'docs.jsonl'} line 2: invalid JSON"),
        (tiny + _overrides(corpus, tmp_path / "a_file" / "run"), f"run directory {tmp_path / 'a_file' / 'run'} is not writable"),
        (tiny + _overrides(corpus, tmp_path / "r2", init_from=tmp_path / "missing"),
         f"init_from: checkpoint directory {tmp_path / 'missing'} does not exist"),
        (tiny + _overrides(corpus, tmp_path / "r3", init_from=tmp_path / "broken_ckpt"),
         f"{tmp_path / 'broken_ckpt' / 'config.json'}: invalid JSON at line 1 column 2"),
        (tiny + _overrides(corpus, tmp_path / "r4", seq_len=5000),
         r"seq_len \(5000\) is larger than the model's max_position_embeddings \(4096\)"),
    ]
    for args, message in cases:
        code, err = _train_main(capsys, *args)
        assert code == 1 and re.search(message, err), (args, err)


def test_a_model_too_large_for_the_memory_is_refused_before_allocation(tmp_path, capsys):
    code, err = _train_main(capsys, "--config", str(ROOT / "configs/minimax-text-01.yaml"), f"run_dir={tmp_path}")
    assert code == 1 and re.search(r"training the 80-layer, 6144-wide model .* needs \d+\.\d GiB but "
                                   r"\d+\.\d GiB are available", err), err
