"""Multi-process start-up (`sharding.distributed`) and training as a job of two processes."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimax_jax.config import ConfigError
from minimax_jax.training.config import load_train_config
from minimax_jax.training.loop import run
from minimax_jax.training.metrics import read_metrics
from sharding import distributed

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT",
                "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES",
                "JOB_COMPLETION_INDEX", "JOB_INDEX")


@pytest.fixture
def joined(monkeypatch) -> list[dict]:
    """A clean launcher environment; the keyword arguments of every jax.distributed.initialize call."""
    for key in LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_a_single_process_run_joins_nothing(joined):
    assert distributed.initialize() is False
    assert joined == []


def test_the_environment_gives_all_three_settings(joined, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.initialize() is True
    assert joined == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                           cluster_detection_method="deactivate")]


def test_explicit_settings_override_the_environment(joined, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--process-id", "1"])
    settings = distributed.from_arguments(args, distributed.DistributedConfig(num_processes=2))
    distributed.initialize(settings)
    assert joined[0]["num_processes"] == 2 and joined[0]["process_id"] == 1
    assert joined[0]["coordinator_address"] == "10.0.0.1:1234"


def test_a_partial_setting_without_a_launcher_names_what_is_missing(joined, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"missing: num_processes \(JAX_NUM_PROCESSES\), process_id \(JAX_PROCESS_ID\)"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"process id 5 is outside \[0, 2\)"):
        distributed.initialize(distributed.DistributedConfig("h:1", 2, 5))
    assert joined == []


def test_slurm_and_open_mpi_use_jax_detection(joined, monkeypatch):
    for key, value in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[01-04]", SLURM_NTASKS="4",
                           SLURM_PROCID="2", SLURM_LOCALID="0").items():
        monkeypatch.setenv(key, value)
    distributed.initialize()
    assert joined[-1] == dict(coordinator_address=None, num_processes=None, process_id=None,
                              cluster_detection_method="slurm")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a single process
    assert distributed.initialize() is False
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    distributed.initialize()
    assert joined[-1]["cluster_detection_method"] == "ompi"
    assert distributed.initialize(distributed.DistributedConfig(cluster="off")) is False
    assert len(joined) == 2


def test_a_kubernetes_indexed_job_pod_finds_pod_zero(joined, monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("HOSTNAME", "train-2")
    monkeypatch.setattr(socket, "getfqdn", lambda host: f"{host}.workers.default.svc.cluster.local")
    with pytest.raises(ValueError, match="set JAX_NUM_PROCESSES in the pod spec"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    distributed.initialize()
    assert joined == [dict(coordinator_address="train-0.workers.default.svc.cluster.local:8476",
                           num_processes=4, process_id=2, cluster_detection_method="deactivate")]
    monkeypatch.setattr(socket, "getfqdn", lambda host: host)
    with pytest.raises(ValueError, match="no subdomain"):
        distributed.initialize()


def test_distributed_config_keys_are_checked():
    tcfg, _ = load_train_config(ROOT / "configs/tiny.yaml", ["distributed.num_processes=2",
                                                             "distributed.cluster=slurm"])
    assert tcfg.distributed_settings == distributed.DistributedConfig(num_processes=2, cluster="slurm")
    with pytest.raises(ConfigError, match="unknown config key 'distributed.port'"):
        load_train_config(ROOT / "configs/tiny.yaml", ["distributed.port=2"])
    with pytest.raises(ConfigError, match="distributed: distributed cluster 'pbs' is not known"):
        load_train_config(ROOT / "configs/tiny.yaml", ["distributed.cluster=pbs"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(corpus: Path, run_dir: Path, steps: int) -> list[str]:
    values = dict(run_dir=str(run_dir), data=f"[{corpus}]", seq_len=32, batch_size=4, steps=steps, log_every=1,
                  eval_every=100, eval_batches=1, save_every=2, warmup_steps=2, sample_tokens=4, progress="false",
                  **{"model.block_size": 8})
    return [f"{k}={v}" for k, v in values.items()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _train(overrides: list[str], devices: int, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", "configs/tiny.yaml", *overrides,
                             *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_train_like_one_and_their_checkpoint_resumes_on_another_mesh(tmp_path):
    """Two processes of four CPU devices each (mesh data2 x fsdp2 x tensor2, each process feeding
    its half of every batch) give the one-device losses; their Orbax checkpoint, written by both,
    resumes in one process on eight devices split fsdp4 x tensor2, and its step 3 matches the
    one-device run resumed the same way (the learning-rate schedule follows `steps`)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards box".split()
    rng = np.random.default_rng(0)
    for i in range(24):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 60 + 7 * i)))
    job = tmp_path / "job"
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    address = f"localhost:{_free_port()}"
    procs = [_train(_overrides(corpus, job, 2) + mesh, 4, "--coordinator-address", address, "--num-processes", "2",
                    "--process-id", str(i)) for i in range(2)]
    single = tmp_path / "single"  # the same two steps, then resumed for a third, on one device
    for steps in (2, 3):
        run(*load_train_config(ROOT / "configs/tiny.yaml", _overrides(corpus, single, steps)))
    outputs = [p.communicate(timeout=540)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    assert "joined a 2-process job as process 0 (4 of 8 devices here)" in outputs[0]
    assert "mesh {" not in outputs[1] and "step 1:" not in outputs[1]  # process 1 does not log
    assert len(list((job / "checkpoints" / "2" / "state").glob("ocdbt.process_*"))) == 2  # both wrote
    want, got = _losses(single), _losses(job)
    assert sorted(got) == [1, 2]
    np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=1e-5)

    resume = _train(_overrides(corpus, job, 3) + ["mesh.fsdp=4", "mesh.tensor=2"], 8, "--no-verify")
    out = resume.communicate(timeout=300)[0]
    assert resume.returncode == 0, out
    assert "resumed from step 2" in out
    np.testing.assert_allclose(_losses(job)[3], want[3], rtol=1e-5)
    assert (job / "model" / "config.json").is_file()
