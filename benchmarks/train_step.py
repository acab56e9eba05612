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
--profile DIR: a `jax.profiler.trace` of --profile-steps more steps in DIR/ROW (open it with
XProf / TensorBoard), with the compiled step's HLO beside it (DIR/ROW/step.hlo.txt); the device
time of each HLO op summed over the trace (its kernels on a GPU; on a CPU the host's thunks,
self time) per step: the top ops, and the time by layer kind (lightning, softmax, MoE, loss,
optimizer, rest: the code that made each op, read from the Python stack the HLO records, so a
layer's projections count for it) and by op class (matmul, fusion, custom call: Pallas and
cuDNN kernels, collective, copy, other).
--override KEY=VALUE ...: config overrides (`load_train_config` syntax: `seq_len=256`,
`model.hidden_size=64`) applied to every row after its own, for smoke tests on a CPU.

Output: progress lines on stderr, one JSON line per row on stdout, all rows in
--out/train_step.json and the markdown tables (printed, and in --out/train_step.md); --render
FILE prints the tables of a finished run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if TYPE_CHECKING:
    from jax.profiler import ProfileEvent

    from benchmarks.step_timing import CompiledStep

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
OP_CLASSES = ("matmul", "fusion", "custom call", "collective", "copy", "other")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "send", "recv", "ragged-all-to-all")
DATA_MOVEMENT = {"copy", "copy-start", "copy-done", "dynamic-slice", "dynamic-update-slice", "slice",
                 "concatenate", "transpose", "pad", "reshape", "bitcast", "broadcast", "parameter",
                 "constant", "tuple", "get-tuple-element", "iota"}
TOP_OPS = 10
TRACE_KINDS = ("lightning", "softmax", "moe", "loss", "optimizer", "rest")
LAYER_FILES = (  # source files -> the layer kind of the ops they make, first match of a stack wins
    (r"(^|/)lightning[^/]*\.py$|pallas_kernels/chunked\.py$", "lightning"),
    (r"minimax_jax/attention\.py$|(^|/)softmax[^/]*\.py$", "softmax"),
    (r"minimax_jax/moe\.py$|grouped_matmul[^/]*\.py$|sharding/experts\.py$", "moe"),
    (r"minimax_jax/loss\.py$", "loss"),
    (r"minimax_jax/training/step\.py$|^optax/", "optimizer"),
    (r"minimax_jax/(decoder|model)\.py$", "rest"),
)


def log(row: str, msg: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {row}: {msg}", file=sys.stderr, flush=True)


# --- the optimized HLO: what each op is ---------------------------------------------------------

def hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
    """Every instruction of an optimized HLO module's text (`Compiled.as_text()`), by name:
    {"opcode", "class" (one of OP_CLASSES), "kind" (one of TRACE_KINDS: the layer whose code
    made it, from its Python stack), "source" (the innermost frame, file:line (function),
    relative to the repository or site-packages; "" when the text has no stack for it)}."""
    frames = _stack_frames(hlo_text)
    instructions: dict[str, dict[str, str]] = {}
    computations: dict[str, set[str]] = collections.defaultdict(set)  # opcodes per computation
    current = ""
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            continue
        m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m:
            continue
        name, rest = m.groups()
        opcode = _opcode(rest)
        if opcode is None:
            continue
        computations[current].add(opcode)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        stack = _stack(frames, int(frame.group(1))) if frame else []
        instructions[name] = {"opcode": opcode, "calls": calls.group(1) if calls else "",
                              "target": target.group(1) if target else "", "kind": _layer_kind(stack),
                              "source": f"{stack[0][0]}:{stack[0][2]} ({stack[0][1]})" if stack else ""}
    return {name: {"opcode": op["opcode"], "class": _op_class(op, computations), "kind": op["kind"],
                   "source": op["source"]} for name, op in instructions.items()}


def _stack_frames(hlo_text: str) -> dict[int, tuple[str, str, int, int]]:
    """The stack-frame tables at the top of an HLO module's text: frame id -> (file, relative to
    the repository or site-packages; function; line; parent frame id, 0 for none)."""
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section = ""
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif section and (m := re.match(r"(\d+) (.*)$", line)):
            tables[section][int(m.group(1))] = m.group(2)
        elif line.startswith(("%", "ENTRY")):
            break
    field = lambda text, key: int(re.search(key + r"=(\d+)", text).group(1))  # noqa: E731
    frames = {}
    for fid, text in tables["StackFrames"].items():
        loc = tables["FileLocations"][field(text, "file_location_id")]
        frames[fid] = (_short_path(tables["FileNames"][field(loc, "file_name_id")].strip('"')),
                       tables["FunctionNames"][field(loc, "function_name_id")].strip('"'), field(loc, "line"),
                       field(text, "parent_frame_id") - 1)  # printed one above the parent's id
    return frames


def _stack(frames: dict[int, tuple[str, str, int, int]], fid: int) -> list[tuple[str, str, int]]:
    """The Python stack of frame `fid`, innermost first: (file, function, line) each."""
    stack, seen = [], set()
    while fid in frames and fid not in seen:
        seen.add(fid)
        path, function, line, fid = frames[fid]
        stack.append((path, function, line))
    return stack


def _layer_kind(stack: list[tuple[str, str, int]]) -> str:
    """The layer kind of an op: that of the innermost frame of its stack in one of LAYER_FILES
    (helpers the layers share, norms, projections, rope, are skipped to their caller), else "rest"."""
    for path, _, _ in stack:
        for pattern, kind in LAYER_FILES:
            if re.search(pattern, path):
                return kind
    return "rest"


def _opcode(rest: str) -> str | None:
    """The opcode of an HLO instruction from the text after its `name =` (shape, then opcode)."""
    i = 0
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, c in enumerate(rest):
            depth += (c == "(") - (c == ")")
            if depth == 0:
                break
        i += 1
    else:
        i = rest.find(" ")
    m = re.match(r"\s*([a-z][\w\-]*)\(", rest[i:])
    return m.group(1) if m else None


def _short_path(path: str) -> str:
    """A source path relative to the repository or to site-packages."""
    for root in ("/site-packages/", os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/"):
        if root in path:
            return path.split(root, 1)[1]
    return path


def _op_class(op: dict[str, str], computations: dict[str, set[str]]) -> str:
    """One of OP_CLASSES for an instruction (a fusion by the ops it fuses)."""
    opcode, target = op["opcode"], op["target"].lower()
    collective = lambda o: o.removesuffix("-start").removesuffix("-done") in COLLECTIVES  # noqa: E731
    if collective(opcode):
        return "collective"
    if opcode in ("dot", "convolution") or (opcode == "custom-call" and re.search(r"gemm|matmul|cublas", target)):
        return "matmul"
    if opcode == "custom-call":
        return "custom call"
    if opcode == "fusion":
        fused = computations.get(op["calls"], set())
        if fused & {"dot", "convolution"}:
            return "matmul"
        if any(map(collective, fused)):
            return "collective"
        return "copy" if fused and fused <= DATA_MOVEMENT else "fusion"
    return "copy" if opcode in DATA_MOVEMENT else "other"


def _kernel_class(name: str) -> str:
    """One of OP_CLASSES for a device event that names no HLO op, by its kernel's name."""
    for pattern, op_class in ((r"nccl", "collective"), (r"mem(cpy|set)", "copy"),
                              (r"gemm|nvjet|cutlass|xmma|cublas|matmul", "matmul"), (r"fusion", "fusion")):
        if re.search(pattern, name, re.I):
            return op_class
    return "other"


# --- the profiler trace -------------------------------------------------------------------------

def traced_op_seconds(xplane_path: str,
                      ops: dict[str, dict[str, str]]) -> tuple[dict[str, float], dict[str, int], str]:
    """Seconds and event counts per HLO op in a trace (an .xplane.pb), and where they came from.

    On a GPU (or TPU) plane: the kernels of each op (events named by their `hlo_op` stat; events
    without an op of `ops`, e.g. a memcpy, by their own name, the kernel's). Without a device
    plane (a CPU): the host events that name an HLO op of `ops` (by `hlo_op` stat or by name),
    each counted for its self time (an op's events nested in another's on the same thread, a
    loop's body, are taken out of the outer one)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    seconds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    if device:
        for plane in device:
            lines = list(plane.lines)
            xla_ops = [line for line in lines if line.name == "XLA Ops"]  # TPU planes have it
            for line in xla_ops or [line for line in lines if line.name.startswith("Stream")]:
                for event in line.events:
                    hlo_op = _hlo_op(event)
                    name = hlo_op if hlo_op in ops else event.name
                    seconds[name] += event.duration_ns * 1e-9
                    counts[name] += 1
        return seconds, counts, "device kernels on " + ", ".join(p.name for p in device)
    for plane in planes:
        for line in plane.lines:
            events = []
            for event in line.events:
                name = _hlo_op(event) or event.name
                if name in ops:
                    events.append((event.start_ns, event.duration_ns, name))
            events.sort(key=lambda e: (e[0], -e[1]))
            stack: list[tuple[float, str]] = []  # (end, name) of the enclosing events
            for start, duration, name in events:
                while stack and stack[-1][0] <= start:
                    stack.pop()
                if stack:
                    seconds[stack[-1][1]] -= duration * 1e-9
                seconds[name] += duration * 1e-9
                counts[name] += 1
                stack.append((start + duration, name))
    return seconds, counts, "host events (no device plane)"


def _hlo_op(event: ProfileEvent) -> str | None:
    """The `hlo_op` stat of a trace event (a `jax.profiler.ProfileEvent`), or None."""
    return next((value for key, value in event.stats if key == "hlo_op"), None)


def profile_row(step: CompiledStep, row: str, profile_dir: str, n_steps: int) -> dict[str, Any]:
    """Trace n_steps more steps of `step` into profile_dir/row and summarize: {"trace_dir",
    "source", "traced_ms_per_step" (the ops' time summed), "kinds" (ms per step by layer kind,
    then op class: `hlo_ops`), "top_ops" (the TOP_OPS ops of most time: name, opcode, class,
    kind, source, ms per step, events per step)}."""
    import jax

    out = os.path.join(profile_dir, row)
    os.makedirs(out, exist_ok=True)
    hlo = step.compiled.as_text()
    with open(os.path.join(out, "step.hlo.txt"), "w") as f:
        f.write(hlo)
    log(row, f"tracing {n_steps} steps into {out}")
    with jax.profiler.trace(out):
        step.run(n_steps)
    paths = sorted(glob.glob(os.path.join(out, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"the profiler wrote no .xplane.pb under {out}")
    ops = hlo_ops(hlo)
    seconds, counts, source = traced_op_seconds(paths[-1], ops)
    ms = {name: 1e3 * s / n_steps for name, s in seconds.items()}
    info = {name: ops.get(name) or {"opcode": "", "class": _kernel_class(name), "kind": "rest", "source": ""}
            for name in ms}
    kinds = {k: {c: 0.0 for c in OP_CLASSES} for k in TRACE_KINDS}
    for name, t in ms.items():
        kinds[info[name]["kind"]][info[name]["class"]] += t
    top = sorted(ms, key=ms.get, reverse=True)[:TOP_OPS]
    return {"trace_dir": out, "source": source, "traced_ms_per_step": sum(ms.values()), "kinds": kinds,
            "top_ops": [{"name": n, **info[n], "ms": ms[n], "events_per_step": counts[n] / n_steps} for n in top]}


# --- one row, in its own process ----------------------------------------------------------------

def train_row(row: str, overrides: list[str], steps: int, profile_dir: str | None, profile_steps: int,
              save: Callable[[dict], None]) -> dict[str, Any]:
    """Measure one row (see the module docstring); `save(result)` after each phase, so a row cut
    short keeps what it measured."""
    import numpy as np

    from benchmarks.step_timing import compile_train_step, layer_split, measure_step
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
    log(row, f"compiled in {info['compile_s']:.1f} s; timing {steps} steps")
    result.update(measure_step(step, mcfg, steps))
    save(result)
    mfu = "unknown peak" if result["mfu"] is None else f"MFU {100 * result['mfu']:.1f}%"
    log(row, f"step {1e3 * result['step_s']:.1f} ms, {result['tokens_per_s']:,.0f} tokens/s, {mfu}")
    if profile_dir:
        result["profile"] = profile_row(step, row, profile_dir, profile_steps)
        save(result)
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
        prof = r.get("profile")
        if not prof:
            continue
        total = prof["traced_ms_per_step"]
        by_class = {c: sum(k[c] for k in prof["kinds"].values()) for c in OP_CLASSES}
        cell = lambda ms: f"{ms:.1f} ({100 * ms / total:.0f}%)"  # noqa: E731
        lines += ["", f"{r['row']}: {total:.1f} ms of ops per step ({prof['source']}; step "
                  f"{1e3 * r['step_s']:.1f} ms), by layer kind (the code that made each op, "
                  "projections included) and op class, ms per step (% of the ops' time):", "",
                  "| layer kind | " + " | ".join(OP_CLASSES) + " | all |", "|---|" + "---|" * (len(OP_CLASSES) + 1)]
        for kind, classes in [*prof["kinds"].items(), ("all", by_class)]:
            lines.append(f"| {kind} | " + " | ".join(cell(classes[c]) if classes[c] else "-" for c in OP_CLASSES)
                         + f" | {cell(sum(classes.values()))} |")
        lines += ["", f"{r['row']}: top {len(prof['top_ops'])} ops:", "",
                  "| op | class | layer kind | ms per step | % | events per step | source |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {o['name']} | {o['class']} | {o['kind']} | {o['ms']:.2f} | {100 * o['ms'] / total:.1f}% | "
                  f"{o['events_per_step']:g} | {o['source'] or '-'} |" for o in prof["top_ops"]]
    return "\n".join(lines)


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

        path = os.path.join(args.out, f"train_step_{args.child}.json")
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
        if args.profile:
            child_args += ["--profile", os.path.abspath(args.profile)]
        results.append({"row": row, **run_child(os.path.abspath(__file__), child_args,
                                                os.path.join(rows_dir, f"train_step_{row}.json"), left)})
        print(json.dumps(results[-1]), flush=True)
        with open(os.path.join(args.out, "train_step.json"), "w") as f:
            json.dump(results, f, indent=1)
    tables = render(results)
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
        f.write(tables + "\n")
    print(tables, flush=True)


if __name__ == "__main__":
    main()
