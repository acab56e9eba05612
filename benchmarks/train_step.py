"""One compiled training step on one GPU: throughput, MFU, the step split by layer kind and,
with --profile, by op (a profiler trace of a few steps).

    python3 benchmarks/train_step.py --out $OUT --rows small,width8 --profile $OUT/trace --budget 540
    python3 benchmarks/train_step.py --out $OUT --rows small,small-lora,small-lora-all --budget 540

A smoke test on a CPU (tiny widths, a few minutes):

    python3 benchmarks/train_step.py --out /tmp/ts --rows small --steps 3 --profile /tmp/ts/trace \
        --profile-steps 2 --override model.hidden_size=64 model.intermediate_size=64 \
        model.num_attention_heads=2 model.num_key_value_heads=1 model.head_dim=64 model.vocab_size=512 \
        seq_len=256 batch_size=2

Rows (each in a process of its own, so an out-of-memory error ends only that row; XLA may take
95% of the device's memory), all overrides of configs/small.yaml:
- small: configs/small.yaml as `train.py` trains it: rows of 2,048 tokens, batch 16, no remat
  (16 layers: 7 lightning + 1 softmax, twice; hidden 1024; 8 experts top-2).
- width8: MiniMax-Text-01's width in one 8-layer block: hidden 6144, 64 heads and 8 KV heads of
  128, experts of 9216, 7 lightning + 1 softmax layers, 2 experts top-2; one row of 8,192 tokens,
  remat.
- small-lora, small-lora-all: small with rank-16 adapters (`lora.rank=16`) on the attention
  projections over a float32 base, and on every target (attention, experts, router) over an int8
  base; the base is a fresh model saved to a temporary directory first (`init_from`). Their
  MFU counts the full fine-tuning FLOPs, so compare their tokens/s, peak memory and the bytes
  that train (params and AdamW state) against small's.
All: bf16 compute, float32 master weights, AdamW; the batch is the first one `train.py` would
train on (the standard library's sources, byte tokenizer, packed with segment ids).

For each row: the step (`minimax_jax.training.step.train_step` on the state `train.py` builds,
`benchmarks/step_timing.py`) compiled once, then --steps steps timed: the median step; tokens/s;
MFU = the analytic training FLOPs (`training/metrics.train_flops_per_token`: 3x the forward's
matmul and attention FLOPs, causal attention over the whole row, recomputation not counted) per
second / the device's dense bf16 peak (`training/metrics.PEAK_BF16_FLOPS`, 989 TFLOP/s for an
H200); then the step split by layer kind from the ops timed alone (`step_timing.layer_split`).
--profile DIR: after the row's timing, a process of its own compiles the step again and traces
--profile-steps steps in DIR/ROW (open it with XProf / TensorBoard), the compiled step's HLO beside
it, with XLA's command buffers off so that every kernel is attributed to its op
(`benchmarks/trace.py`): the device time of each HLO op summed over the trace (its kernels on a
GPU; on a CPU the host's thunks, self time) per step: the top ops, and the time by layer kind
(lightning, softmax, MoE, loss, optimizer, rest: the code that made each op, read from the
Python stack the HLO records, so a layer's projections count for it) and by op class (matmul,
fusion, custom call: Pallas and cuDNN kernels, collective, copy, other).
--override KEY=VALUE ...: config overrides (`load_train_config` syntax: `seq_len=256`,
`model.hidden_size=64`) applied to every row after its own, for smoke tests on a CPU.

Output: progress lines on stderr, one JSON line per row on stdout, all rows in
--out/train_step.json and the markdown tables (printed, and in --out/train_step.md); --render
FILE prints the tables of a finished run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.trace import MODEL_LAYER_FILES  # noqa: E402
from benchmarks.trace import render as render_profile  # noqa: E402

CONFIG = "configs/small.yaml"
WIDTH8_PATTERN = ["linear_attention"] * 7 + ["full_attention"]
ROWS = {
    "small": ["seq_len=2048", "batch_size=16", "model.remat=false"],
    "width8": ["seq_len=8192", "batch_size=1", "model.remat=true", "model.hidden_size=6144",
               "model.num_attention_heads=64", "model.num_key_value_heads=8", "model.head_dim=128",
               "model.intermediate_size=9216", "model.num_local_experts=2", "model.num_experts_per_tok=2",
               "model.num_hidden_layers=8",
               "model.layer_types={pattern: [%s], repeat: 1}" % ", ".join(WIDTH8_PATTERN)],
}
ROWS["small-lora"] = [*ROWS["small"], "lora.rank=16"]  # adapters on the attention projections
ROWS["small-lora-all"] = [*ROWS["small"], "lora.rank=16", "lora.targets=[attention, experts, router]",
                          "lora.quantize=int8"]  # every target, on an int8 base


def log(row: str, msg: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {row}: {msg}", file=sys.stderr, flush=True)


# --- one row, in its own process ----------------------------------------------------------------

def train_row(row: str, overrides: list[str], steps: int, profile_dir: str | None, profile_steps: int,
              save: Callable[[dict], None]) -> dict[str, Any]:
    """Measure one row (see the module docstring); `save(result)` after each phase, so a row cut
    short keeps what it measured. With profile_dir: compile the step and trace profile_steps
    steps only (the process should run without XLA's command buffers, `trace.no_command_buffers`)."""
    import numpy as np

    from benchmarks.step_timing import compile_train_step, layer_split, measure_step
    from benchmarks.trace import profile
    from minimax_jax.checkpoint import save_model
    from minimax_jax.training.loop import build_model
    from minimax_jax.checkpoint import param_shapes
    from minimax_jax.tokenizer import load_tokenizer
    from minimax_jax.training.config import load_train_config
    from minimax_jax.training.data import DataPipeline, find_files

    settings, base = [*ROWS[row], *overrides], None
    if any(o.startswith("lora.") for o in settings):  # adapters train on a frozen base: a fresh one, saved
        full_tcfg, full_mcfg = load_train_config(CONFIG, [o for o in settings if not o.startswith("lora.")])
        base = tempfile.mkdtemp(prefix="train_step_base_")
        log(row, f"saving a fresh base model to {base} for the adapters")
        save_model(build_model(full_tcfg, full_mcfg), base)
        settings.append(f"init_from={base}")
    tcfg, mcfg = load_train_config(CONFIG, settings)
    data = DataPipeline(find_files(tcfg.data), load_tokenizer(tcfg.tokenizer), seq_len=tcfg.seq_len,
                        batch_size=tcfg.batch_size, val_fraction=tcfg.val_fraction, seed=tcfg.seed)
    batch = next(data.train)
    seg = batch["segment_ids"][:, :-1]
    result: dict[str, Any] = {
        "row": row, "overrides": settings, "seq_len": tcfg.seq_len, "batch": tcfg.batch_size,
        "hidden": mcfg.hidden_size, "layers": mcfg.num_hidden_layers, "experts": mcfg.num_local_experts,
        "remat": mcfg.remat, "params_m": sum(math.prod(s) for s in param_shapes(mcfg).values()) / 1e6,
        "docs_per_row": float(np.mean([len(np.unique(s)) for s in seg])),
    }
    try:
        step, info = compile_train_step(tcfg, mcfg, batch, lambda msg: log(row, msg))
    finally:
        if base is not None:  # the base is in the step's state now
            shutil.rmtree(base)
    result.update(info)
    save(result)
    if profile_dir:
        out = os.path.join(profile_dir, row)
        log(row, f"compiled in {info['compile_s']:.1f} s; tracing {profile_steps} steps into {out}")
        result["profile"] = profile(functools.partial(step.run, 1), step.compiled.as_text(), out, profile_steps,
                                    MODEL_LAYER_FILES)
        return result
    log(row, f"compiled in {info['compile_s']:.1f} s; timing {steps} steps")
    result.update(measure_step(step, mcfg, steps))
    save(result)
    mfu = "unknown peak" if result["mfu"] is None else f"MFU {100 * result['mfu']:.1f}%"
    log(row, f"step {1e3 * result['step_s']:.1f} ms, {result['tokens_per_s']:,.0f} tokens/s, {mfu}")
    del step
    log(row, "timing the layers' ops alone")
    result.update(layer_split(mcfg, seg, result["step_s"]))
    return result


# --- the tables ---------------------------------------------------------------------------------

def render(rows: list[dict[str, Any]]) -> str:
    """The markdown tables of a run: one line per row, then per profiled row its op classes and
    top ops."""
    kinds = (("lightning_s", "lightning"), ("softmax_s", "softmax"), ("moe_s", "MoE"), ("rest_s", "rest"))
    measured = [r for r in rows if "device" in r]
    devices = sorted({f"{r['device']}, jax {r['jax']}" for r in measured})
    lines = [f"{'; '.join(devices) or 'No row measured'}" + (f", {measured[0]['date']}." if measured else "."), "",
             "| row | config | tokens / step | step ms | tokens/s | model TFLOP/s | MFU | "
             + " | ".join(f"{label} ms (%)" for _, label in kinds) + " | peak GiB | trained / optimizer state MiB |",
             "|---|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|---|"]
    for r in rows:
        if "step_s" not in r:
            error = r.get("error", "no result").replace("|", "/")[:300]
            lines.append(f"| {r['row']} | {error} |" + " |" * (7 + len(kinds)))
            continue
        config = (f"hidden {r['hidden']}, {r['layers']} layers, {r['experts']} experts, {r['params_m']:,.1f}M params, "
                  f"{r['seq_len']:,} x {r['batch']}, {'remat' if r['remat'] else 'no remat'}, "
                  f"~{r['docs_per_row']:.1f} documents per row")
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        split = " | ".join(f"{1e3 * r[k]:.1f} ({100 * r[k] / r['step_s']:.0f}%)" if k in r else "-" for k, _ in kinds)
        lines.append(f"| {r['row']} | {config} | {r['seq_len'] * r['batch']:,} | {1e3 * r['step_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.3g} | {mfu} | {split} | "
                     f"{r['peak_gib']:.1f} | {r['trained_params_mib']:,.1f} / {r['optimizer_state_mib']:,.1f} |")
    lines += [f"\n{r['row']}: cut short: {r['error']}" for r in rows if "step_s" in r and "error" in r]
    lines += ["", "Layer kinds from the ops timed alone at the step's shapes: the lightning and softmax "
              "attention ops (the kernels alone) and the whole MoE layer, each forward and backward as the "
              "step runs them (with remat the forward twice); rest: the step minus those (projections, "
              "norms, embedding, loss, optimizer)."]
    for r in rows:
        if "error" in r.get("profile", {}):
            lines += ["", f"{r['row']}: no profile: {r['profile']['error']}"]
        elif r.get("profile"):
            timed = f" (step {1e3 * r['step_s']:.1f} ms when timed)" if "step_s" in r else ""
            lines += ["", *render_profile(r["profile"], f"{r['row']}: one training step{timed}")]
    return "\n".join(lines)


def row_result_path(out: str, row: str, profiled: bool) -> str:
    """Where a row's child process leaves its JSON result: the profiled run has a file of its own."""
    return os.path.join(out, f"train_step_{row}{'_profile' if profiled else ''}.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--rows", default="small,width8", help=f"comma-separated, of {list(ROWS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the compiled one")
    p.add_argument("--profile", metavar="DIR", help="trace a few more steps into DIR/ROW and summarize the ops")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--override", nargs="*", default=[], help="config key=value overrides for every row")
    p.add_argument("--budget", type=float, default=540, help="seconds for all rows")
    p.add_argument("--render", metavar="FILE", help="print the tables of a train_step.json and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        # one process per row: let it use the device's memory, not XLA's default 75%
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        import jax

        path = row_result_path(args.out, args.child, bool(args.profile))
        header = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        log(args.child, f"{header['device']}, jax {header['jax']}")

        def save(row: dict) -> None:
            with open(path, "w") as f:
                json.dump({**row, **header}, f, indent=1)

        save(train_row(args.child, args.override, args.steps, args.profile, args.profile_steps, save))
        return
    import tempfile

    from benchmarks.step_timing import run_child
    from benchmarks.trace import no_command_buffers

    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows: {list(ROWS)}")
    deadline = time.time() + args.budget
    rows_dir = tempfile.mkdtemp()
    results = []
    for row in rows:
        left = deadline - time.time()
        if left < 30:
            log(row, "skipped: budget spent")
            results.append({"row": row, "error": "skipped: budget spent"})
            continue
        child_args = ["--child", row, "--out", rows_dir, "--steps", str(args.steps),
                      "--profile-steps", str(args.profile_steps), "--override", *args.override]
        results.append({"row": row, **run_child(os.path.abspath(__file__), child_args,
                                                row_result_path(rows_dir, row, False), left)})
        left = deadline - time.time()
        if args.profile and left >= 30:  # a process of its own, without command buffers
            traced = run_child(os.path.abspath(__file__), [*child_args, "--profile", os.path.abspath(args.profile)],
                               row_result_path(rows_dir, row, True), left,
                               env=no_command_buffers(os.environ))
            results[-1]["profile"] = traced.get("profile") or {"error": traced.get("error", "no profile")}
        print(json.dumps(results[-1]), flush=True)
        with open(os.path.join(args.out, "train_step.json"), "w") as f:
            json.dump(results, f, indent=1)
    tables = render(results)
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
        f.write(tables + "\n")
    print(tables, flush=True)


if __name__ == "__main__":
    main()
