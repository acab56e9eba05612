r"""Where a compiled program's device time goes: a `jax.profiler` trace of a few runs, each HLO op's
kernels summed, every op named with its opcode, op class, the layer kind of the code that made it
and its source line (read from the Python stack the optimized HLO records).

    summary = profile(lambda: f(*args), compiled.as_text(), "/tmp/trace/f", runs=3,
                      layer_files=((r"minimax_jax/moe\.py$", "moe"),))

Used by `train_step.py --profile`, `vision.py --profile` and `serve.py --profile`. On a GPU, XLA
replays kernels through CUDA graphs ("command buffers"), and the kernels replayed so carry no
annotation of their op: profile in a process started with `no_command_buffers(os.environ)`
(XLA_FLAGS with `--xla_gpu_enable_command_buffer=`), so that every kernel is attributed; its
timings are then those of plain launches.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import time
from typing import Any, Callable, Mapping

OP_CLASSES = ("matmul", "fusion", "custom call", "collective", "copy", "other")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "send", "recv", "ragged-all-to-all")
DATA_MOVEMENT = {"copy", "copy-start", "copy-done", "dynamic-slice", "dynamic-update-slice", "slice",
                 "concatenate", "transpose", "pad", "reshape", "bitcast", "broadcast", "parameter",
                 "constant", "tuple", "get-tuple-element", "iota"}
TOP_OPS = 10
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="
LayerFiles = tuple[tuple[str, str], ...]  # (regular expression over a source path, layer kind)
MODEL_LAYER_FILES = (  # the text model's source files -> the layer kind of the ops they make
    (r"(^|/)lightning[^/]*\.py$|pallas_kernels/chunked\.py$", "lightning"),
    (r"minimax_jax/attention\.py$|(^|/)softmax[^/]*\.py$", "softmax"),
    (r"minimax_jax/moe\.py$|grouped_matmul[^/]*\.py$|sharding/experts\.py$", "moe"),
    (r"minimax_jax/loss\.py$", "loss"),
    (r"minimax_jax/training/step\.py$|^optax/", "optimizer"),
    (r"minimax_jax/(decoder|model)\.py$", "rest"),
)


def no_command_buffers(env: Mapping[str, str], *flags: str) -> dict[str, str]:
    """A copy of the environment `env` whose XLA_FLAGS turn XLA's GPU command buffers off and
    carry `flags` (more XLA flags) too."""
    return {**env, "XLA_FLAGS": " ".join([env.get("XLA_FLAGS", ""), NO_COMMAND_BUFFERS, *flags]).strip()}


def hlo_ops(hlo_text: str, layer_files: LayerFiles) -> dict[str, dict[str, str]]:
    """Every instruction of an optimized HLO module's text (`Compiled.as_text()`), by name:
    {"opcode", "class" (one of OP_CLASSES), "kind" (the layer whose code made it, from its Python
    stack: the kind of the first `layer_files` pattern that matches a frame's file, innermost
    frame first, else "rest"), "source" (the innermost frame, file:line (function), relative to
    the repository or site-packages; "" when the text has no stack for it)}."""
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
                              "target": target.group(1) if target else "",
                              "kind": _layer_kind(stack, layer_files),
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


def _layer_kind(stack: list[tuple[str, str, int]], layer_files: LayerFiles) -> str:
    """The layer kind of an op: that of the innermost frame of its stack in one of `layer_files`
    (helpers the layers share, norms, projections, rope, are skipped to their caller), else "rest"."""
    for path, _, _ in stack:
        for pattern, kind in layer_files:
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


def traced_op_seconds(xplane_path: str, ops: dict[str, dict[str, str]],
                      module: str = "") -> tuple[dict[str, float], dict[str, int], str]:
    """Seconds and event counts per HLO op in a trace (an .xplane.pb), and where they came from.

    On a GPU (or TPU) plane: the kernels of each op, named by their `hlo_op` stat, or else by the
    kernel's name where it is an op's name with "." and "-" written "_" (XLA names a fusion's
    kernel so); other events (a memcpy, a library's kernel launched without its op's annotation,
    with `module` the kernels of other HLO modules, by their `hlo_module` stat) by their own
    name. Without a device
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
        by_kernel_name = {re.sub(r"[.\-]", "_", name): name for name in ops}
        for plane in device:
            lines = list(plane.lines)
            xla_ops = [line for line in lines if line.name == "XLA Ops"]  # TPU planes have it
            for line in xla_ops or [line for line in lines if line.name.startswith("Stream")]:
                for event in line.events:
                    stats = dict(event.stats)
                    if module and stats.get("hlo_module", module) != module:
                        name = event.name
                    else:
                        hlo_op = stats.get("hlo_op")
                        name = hlo_op if hlo_op in ops else by_kernel_name.get(event.name, event.name)
                    seconds[name] += event.duration_ns * 1e-9
                    counts[name] += 1
        return seconds, counts, "device kernels on " + ", ".join(p.name for p in device)
    for plane in planes:
        for line in plane.lines:
            events = []
            for event in line.events:
                name = dict(event.stats).get("hlo_op") or event.name
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



def profile(run: Callable[[], Any], hlo_text: str, out_dir: str, runs: int,
            layer_files: LayerFiles) -> dict[str, Any]:
    """Trace `runs` calls of `run` (each blocking until its results are ready) into out_dir, with
    the program's optimized HLO `hlo_text` beside it (out_dir/program.hlo.txt; the kernels of
    other programs `run` runs are named by their kernel names; "": all are), and summarize: {"trace_dir",
    "source" (what the times were read from), "command_buffers" (whether XLA_FLAGS left them on:
    then kernels go unattributed), "ms_per_run" (the ops' time summed), "events_per_run" (kernels
    on a GPU), "wall_ms_per_run", "kinds" (ms per run by layer kind, then op class), "top_ops"
    (the TOP_OPS ops of most time: name, opcode, class, kind, source, ms per run, events per run)}."""
    import jax

    os.makedirs(out_dir, exist_ok=True)
    if hlo_text:
        with open(os.path.join(out_dir, "program.hlo.txt"), "w") as f:
            f.write(hlo_text)
    start = time.perf_counter()
    with jax.profiler.trace(out_dir):
        for _ in range(runs):
            run()
    wall_s = time.perf_counter() - start
    paths = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"the profiler wrote no .xplane.pb under {out_dir}")
    ops = hlo_ops(hlo_text, layer_files) if hlo_text else {}
    module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    seconds, counts, source = traced_op_seconds(paths[-1], ops, module.group(1) if module else "")
    ms = {name: 1e3 * s / runs for name, s in seconds.items()}
    info = {name: ops.get(name) or {"opcode": "", "class": _kernel_class(name), "kind": "rest", "source": ""}
            for name in ms}
    kinds = {k: {c: 0.0 for c in OP_CLASSES} for k in dict.fromkeys([*(k for _, k in layer_files), "rest"])}
    for name, t in ms.items():
        kinds[info[name]["kind"]][info[name]["class"]] += t
    top = sorted(ms, key=ms.get, reverse=True)[:TOP_OPS]
    return {"trace_dir": out_dir, "source": source,
            "command_buffers": NO_COMMAND_BUFFERS not in os.environ.get("XLA_FLAGS", ""),
            "ms_per_run": sum(ms.values()), "events_per_run": sum(counts.values()) / runs,
            "wall_ms_per_run": 1e3 * wall_s / runs, "kinds": kinds,
            "top_ops": [{"name": n, **info[n], "ms": ms[n], "events_per_run": counts[n] / runs} for n in top]}


def render(summary: dict[str, Any], what: str) -> list[str]:
    """Markdown lines for a `profile` summary of `what` (e.g. "small: one training step"): the
    time by layer kind and op class, then the top ops."""
    total = summary["ms_per_run"]
    if not total:
        return [f"{what}: no op time traced ({summary['source']})"]
    by_class = {c: sum(k[c] for k in summary["kinds"].values()) for c in OP_CLASSES}
    cell = lambda ms: f"{ms:.2f} ({100 * ms / total:.0f}%)"  # noqa: E731
    note = "; XLA's command buffers on: replayed kernels are unattributed" if summary["command_buffers"] else ""
    lines = [f"{what}: {total:.2f} ms of device ops in {summary['events_per_run']:,.0f} events per run "
             f"({summary['wall_ms_per_run']:.2f} ms of wall time; {summary['source']}{note}), by layer kind "
             "(the code that made each op, projections included) and op class, ms per run (% of the ops' time):",
             "", "| layer kind | " + " | ".join(OP_CLASSES) + " | all |", "|---|" + "---|" * (len(OP_CLASSES) + 1)]
    for kind, classes in [*summary["kinds"].items(), ("all", by_class)]:
        lines.append(f"| {kind} | " + " | ".join(cell(classes[c]) if classes[c] else "-" for c in OP_CLASSES)
                     + f" | {cell(sum(classes.values()))} |")
    lines += ["", f"{what}: top {len(summary['top_ops'])} ops:", "",
              "| op | class | layer kind | ms per run | % | events per run | source |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {o['name'][:80]} | {o['class']} | {o['kind']} | {o['ms']:.3f} | {100 * o['ms'] / total:.1f}% | "
              f"{o['events_per_run']:g} | {o['source'] or '-'} |" for o in summary["top_ops"]]
    return lines
