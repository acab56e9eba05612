"""Timing a compiled training step and splitting it by layer kind, for `benchmarks/train_step.py`
and `benchmarks/long_context.py --train`.

The step is `minimax_jax.training.step.train_step` on the state `train.py` builds (the model of
`training.loop.build_model`, `make_optimizer`, `init_sharded`; one device), compiled once and
timed over a few steps (median). The split times the layers' own ops alone at the step's shapes:
the lightning and softmax attention ops and the whole MoE layer, each counted forward and
backward as the step runs them (with remat the forward twice), "rest" being everything else
(attention projections, norms, embedding, loss, optimizer).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from minimax_jax.config import FULL, MiniMaxConfig
from minimax_jax.moe import SparseMoE
from minimax_jax.training.config import TrainConfig
from minimax_jax.training.loop import build_model, split_trainable
from minimax_jax.training.metrics import peak_flops, train_flops_per_token
from minimax_jax.training.optimizer import init_sharded, make_optimizer
from minimax_jax.training.step import TrainState, train_step


def median_time(fn: Callable[[], Any], n: int) -> float:
    """Median seconds of n calls of fn (which blocks until its result is ready)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_gib() -> float:
    """Peak device memory in use so far, GiB (0 where the device does not report it, e.g. a CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30


@dataclasses.dataclass
class CompiledStep:
    """A compiled `train_step` with its live state, a device-resident batch (int32 `[B, T + 1]`
    arrays), the frozen params of a LoRA run (None: all params train) and the metrics of the last
    step run; `run` advances the state."""

    compiled: jax.stages.Compiled
    state: TrainState
    batch: dict[str, jax.Array]
    frozen: nnx.State | None = None
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    def run(self, n: int) -> list[float]:
        """Run n steps, each waited for; returns the seconds of each."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, self.batch, frozen=self.frozen)
            jax.block_until_ready(self.metrics["loss"])
            times.append(time.perf_counter() - t0)
        return times


def compile_train_step(tcfg: TrainConfig, mcfg: MiniMaxConfig, batch: dict[str, np.ndarray],
                       log: Callable[[str], None]) -> tuple[CompiledStep, dict[str, float]]:
    """Build the training state as `train.py` does (one device) and compile `train_step` for
    `batch`; run it once. Returns the step and {"compile_s" (lowering, compilation and the first
    step), "temp_gib", "arguments_gib" (XLA's memory analysis of the compiled step),
    "trained_params_mib", "optimizer_state_mib" (the adapters alone and their AdamW state with
    LoRA)}."""
    model = build_model(tcfg, mcfg)
    graphdef, params, frozen = split_trainable(model, tcfg.lora_settings)
    optimizer = make_optimizer(tcfg)
    state = TrainState(params=params, opt_state=init_sharded(optimizer, params, None),
                       step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(tcfg.seed)))
    del model
    batch = jax.device_put(batch)
    log("compiling the training step")
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch, graphdef=graphdef, optimizer=optimizer, grad_accum=tcfg.grad_accum,
                                aux_coef=mcfg.router_aux_loss_coef, frozen=frozen).compile()
    memory = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20  # noqa: E731
    info = {"temp_gib": memory.temp_size_in_bytes / 2**30, "arguments_gib": memory.argument_size_in_bytes / 2**30,
            "trained_params_mib": nbytes(params), "optimizer_state_mib": nbytes(state.opt_state)}
    log(f"the compiled step needs {info['temp_gib']:.1f} GiB of temporaries beside "
        f"{info['arguments_gib']:.1f} GiB of arguments; first step")
    step = CompiledStep(compiled, state, batch, frozen)
    step.run(1)
    info["compile_s"] = time.perf_counter() - t0
    return step, info


def measure_step(step: CompiledStep, mcfg: MiniMaxConfig, steps: int) -> dict[str, Any]:
    """Time `steps` more steps: step_s (median), step_times_s, tokens_per_s, model_tflops_per_s
    (the analytic training FLOPs of `train_flops_per_token`: forward + backward, recomputation
    not counted), mfu (of `peak_flops`; None where the peak is unknown), peak_gib, loss, finite."""
    times = step.run(steps)
    batch_size, width = step.batch["tokens"].shape
    seq_len = width - 1
    step_s = float(np.median(times))
    tokens = batch_size * seq_len
    flops, peak = train_flops_per_token(mcfg, seq_len) * tokens / step_s, peak_flops()
    return {"step_s": step_s, "step_times_s": times, "tokens_per_s": tokens / step_s,
            "model_tflops_per_s": flops / 1e12, "mfu": None if peak is None else flops / peak,
            "peak_gib": peak_gib(), "loss": float(step.metrics["loss"]), "finite": bool(step.metrics["finite"])}


def op_times(f: Callable[..., jax.Array], *args: Any, reps: int) -> tuple[float, float]:
    """(forward seconds, forward-and-backward seconds) of f(*args), each compiled and run once
    first, then the median of `reps` runs; the backward pass is the gradient of sum(f) in float32
    with respect to every argument."""
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=tuple(range(len(args)))))
    jax.block_until_ready(fwd(*args))
    jax.block_until_ready(grad(*args))
    return (median_time(lambda: jax.block_until_ready(fwd(*args)), reps),
            median_time(lambda: jax.block_until_ready(grad(*args)), reps))


def layer_split(mcfg: MiniMaxConfig, segment_ids: np.ndarray, step_s: float, reps: int = 3) -> dict[str, float]:
    """The step of `step_s` seconds split by layer kind: lightning_s, softmax_s, moe_s, rest_s.

    segment_ids int32 `[B, T]`: the step's inputs' documents. Each layer's op (the lightning
    attention op, the softmax attention op, the whole `SparseMoE` layer) is timed alone at the
    step's shapes with random bf16 inputs and the config's impls, counted as the step runs it:
    forward-and-backward, plus a second forward with `mcfg.remat`; times the number of layers
    of its kind.
    rest_s = step_s minus the three.
    """
    b, t = segment_ids.shape
    h, n, k, d = mcfg.num_attention_heads, mcfg.num_key_value_heads, mcfg.head_dim, mcfg.hidden_size
    keys = jax.random.split(jax.random.key(1), 7)
    bf = jnp.bfloat16
    seg = jnp.asarray(segment_ids)
    slopes = jnp.asarray(mcfg.slopes()[0], jnp.float32)

    def lin(q, k, v):
        return pallas_kernels.lightning_attention(q, k, v, slopes, segment_ids=seg, impl=mcfg.lightning_impl)[0]

    def sm(q, k, v):
        return pallas_kernels.softmax_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                impl=mcfg.softmax_impl)

    moe_def, moe_params = nnx.split(SparseMoE(mcfg, rngs=nnx.Rngs(2)))

    def moe(x, p):
        return nnx.merge(moe_def, p)(x)[0]

    lin_in = [jax.nn.silu(jax.random.normal(key, (b, t, h, k), bf)) for key in keys[:3]]
    sm_in = [jax.random.normal(keys[3], (b, t, h, k), bf),
             *(jax.random.normal(key, (b, t, n, k), bf) for key in keys[4:6])]
    x = jax.random.normal(keys[6], (b, t, d), bf)
    n_full = sum(lt == FULL for lt in mcfg.layer_types)
    counts = {"lightning_s": mcfg.num_hidden_layers - n_full, "softmax_s": n_full, "moe_s": mcfg.num_hidden_layers}
    split = {}
    for name, f, args in (("lightning_s", lin, lin_in), ("softmax_s", sm, sm_in), ("moe_s", moe, (x, moe_params))):
        if counts[name] == 0:
            split[name] = 0.0
            continue
        f_s, fb_s = op_times(f, *args, reps=reps)
        split[name] = counts[name] * (fb_s + (f_s if mcfg.remat else 0.0))
    split["rest_s"] = step_s - sum(split.values())
    return split


def run_child(script: str, args: list[str], result_path: str, timeout: float,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python script *args` in a fresh process (its own device memory: an out-of-memory error
    ends only it; its stdout and stderr go to ours; `env`: its environment, None: ours) and
    return the JSON dict it left at `result_path`, or what it saved before failing with "error"
    (its exit status or timeout and the last lines of its stderr) added."""
    proc = subprocess.Popen([sys.executable, script, *args], stderr=subprocess.PIPE, text=True, env=env)
    tail: collections.deque[str] = collections.deque(maxlen=3)

    def forward() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip())

    forwarder = threading.Thread(target=forward, daemon=True)
    forwarder.start()
    try:
        failed = "" if proc.wait(timeout) == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        failed = f"over {timeout:.0f} s"
    forwarder.join(10)
    row: dict[str, Any] = {}
    if os.path.exists(result_path):  # a row cut short keeps the phases it saved
        with open(result_path) as f:
            row = json.load(f)
    if failed or not row:
        row["error"] = " | ".join([failed or "no result", *tail])
    return row
