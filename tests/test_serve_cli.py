"""`python serve.py` as a process: serves a saved checkpoint on loopback; without one it says in
one line how to make one."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from flax import nnx

from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.checkpoint import save_model
from minimax_jax.serving.steps import cache_bytes
from minimax_jax.tokenizer import ByteTokenizer

SERVE = Path(__file__).resolve().parents[1] / "serve.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_checkpoint_it_says_how_to_make_one(tmp_path):
    r = subprocess.run([sys.executable, str(SERVE)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: no checkpoint at runs/tiny/model; train one with "
        "`python train.py --config configs/tiny.yaml`, or pass --checkpoint DIR"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(0))
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny-ckpt", tokenizer=ByteTokenizer())


def test_serves_a_saved_checkpoint(checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVE), "--checkpoint", str(checkpoint), "--port", str(port), "--max-batch", "4",
         "--max-context", "64", "--prefill-chunk", "16", "--page-size", "8",
         "--kv-pages", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # a liveness bound: start-up compiles the engine's steps
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-ckpt"]
        r = client.completions.create(model="tiny-ckpt", prompt="Hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3 or r.choices[0].finish_reason == "stop"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # a server that ignores the interrupt is a failure, never left running
            code = proc.wait()
        assert code == 0


def test_a_cache_larger_than_memory_is_refused_in_one_line(checkpoint):
    """A K/V pool of more than a TiB is refused before anything is allocated, naming both sizes;
    --debug shows the traceback instead."""
    cfg = MiniMaxConfig.from_yaml("configs/tiny.yaml")
    per_page = cache_bytes(cfg, slots=1, pages_per_slot=1, page_size=8, num_pages=2) - cache_bytes(
        cfg, slots=1, pages_per_slot=1, page_size=8, num_pages=1)
    pages = -(-(1 << 40) // per_page)
    cmd = [sys.executable, str(SERVE), "--checkpoint", str(checkpoint), "--page-size", "8",
           "--kv-pages", str(pages)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"error: the cache of 8 slots and {pages} K/V pages of 8 tokens needs [0-9.]+ GiB but "
        r"[0-9.]+ GiB are available on this host; .*", lines[0]), lines
    r = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback" in r.stderr
