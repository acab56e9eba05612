"""Shared test helpers: tiny configs, per-test fixed random seeds and a live server."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import zlib
from typing import Callable, Iterator

# The suite runs on the CPU; with libtpu installed (the test extra) JAX would otherwise look for
# TPUs at start-up, in this process and in every subprocess a test starts (they inherit this).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minimax_jax import MiniMaxConfig  # noqa: E402
from minimax_jax.serving.engine import Output, SamplingParams  # noqa: E402

LIN, FULL = "linear_attention", "full_attention"


def tiny_config(**overrides) -> MiniMaxConfig:
    """A two-block tiny model (pattern lin, lin, lin, full) with distinct alpha/beta per sublayer."""
    values = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, num_local_experts=4,
        num_experts_per_tok=2, rope_theta=1e4, rotary_dim=8, block_size=16,
        layer_types=[LIN, LIN, LIN, FULL] * 2,
        linear_attn_alpha_factor=1.3, linear_attn_beta_factor=1.1,
        full_attn_alpha_factor=1.7, full_attn_beta_factor=0.9,
        mlp_alpha_factor=1.5, mlp_beta_factor=0.8,
        dtype="float32", param_dtype="float32", initializer_range=0.1,
    )
    values.update(overrides)
    return MiniMaxConfig(**values)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs() -> Iterator[None]:
    """Frees the XLA programs a test module compiled once it is done. A process keeps every
    program it compiled, its machine code mapped into memory, until JAX's caches are cleared;
    the whole suite's programs would pass the kernel's limit on memory mappings per process
    (vm.max_map_count, 65,530 by default), after which compiling crashes."""
    yield
    jax.clear_caches()
    gc.collect()


def node_seed(request: pytest.FixtureRequest) -> int:
    """A seed fixed by the requesting node's id (test, or module for a module-scoped fixture):
    the same every run, different between tests."""
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's node id, its seed printed so a failure can be replayed."""
    seed = node_seed(request)
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)


@contextlib.contextmanager
def live_server(model, tokenizer, **build_args) -> Iterator:
    """`serving.server.build(model, tokenizer, **build_args)` served over HTTP on a free local
    port (its `url` set) for the duration of the block; stopped and closed after."""
    from minimax_jax.serving.server import BackgroundServer, build

    s = build(model, tokenizer, **build_args)
    server = BackgroundServer(s.app)
    s.url = server.url
    try:
        yield s
    finally:
        server.stop()
        s.close()
    assert not server.thread.is_alive()


@pytest.fixture(scope="module")
def client(served):
    """An OpenAI client of the module's `served` live server (no retries, 120 s timeout)."""
    import openai

    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def script(served):
    """The module's `served.script` (a `scripted.ScriptedOutput`), reset to free generation after
    each test."""
    yield served.script
    served.script.set(None)


def run_jobs(engine, jobs: list[tuple[list[int], SamplingParams]],
             then: tuple[int, int, list[tuple[list[int], SamplingParams]]] | None = None,
             watch: Callable[[int, Output], None] = lambda i, out: None) -> list[list[Output]]:
    """Submit `jobs` at once and wait for all; `then` = (job i, its output n, more jobs): submit
    the more jobs from job i's n-th output callback; `watch(job, output)` runs on every output
    (on the engine thread). Returns every job's outputs in order."""
    more = then[2] if then else []
    parts: list[list[Output]] = [[] for _ in jobs + more]
    finished = threading.Semaphore(0)

    def collector(i: int):
        def collect(out: Output) -> None:
            parts[i].append(out)
            watch(i, out)
            if then and i == then[0] and len(parts[i]) == then[1]:
                for j, (p, params) in enumerate(more):
                    engine.submit(p, params, collector(len(jobs) + j))
            if out.finish_reason is not None:
                finished.release()
        return collect

    for i, (p, params) in enumerate(jobs):
        engine.submit(p, params, collector(i))
    for _ in parts:
        assert finished.acquire(timeout=120), "a request did not finish"
    return parts
