"""Compile MiniMax steps for a TPU v5p or v6e slice on a machine without a TPU (ahead of time) and report
what XLA's TPU compiler says each chip needs.

    pip install -e ".[tpu-aot]"    # libtpu: the TPU compiler, used here without a TPU
    python benchmarks/tpu_aot.py --step train --config configs/tiny.yaml --topology 2x2x1 \
        --mesh fsdp=2,tensor=2 --rows 2 --seq-len 4096
    python benchmarks/tpu_aot.py --step train --layers 8 --topology 8x8x16 --mesh fsdp=4,expert=8,sequence=32 \
        --param-rules embed=fsdp+sequence --rows 32 --seq-len 1048576 --out benchmarks/tpu_aot_2026-12-02.json

With libtpu installed every JAX process on the machine looks for TPUs at start-up, so on a
machine shared with other JAX work install the extra into an environment of its own (or
`pip install --target DIR libtpu==...` and `PYTHONPATH=DIR` for this script alone).

`--step train` lowers the train step `train.py` runs (`minimax_jax.training.step.train_step`:
forward, chunked cross-entropy, backward, AdamW; remat on) over `--rows` packed rows of
`--seq-len` tokens, params and optimizer state placed by the sharding rules. `--step prefill`
lowers the serving engine's prefill step (`minimax_jax.serving.steps.Steps`) for one chunk of
`--seq-len` tokens into a paged cache of `--context` tokens, the K/V pages split over the mesh's
`sequence` axis (their KV heads over `tensor`) and the lightning states' heads over `tensor`. `--layers N` keeps the first N layers
(whole blocks) of the config to measure a part of the model. `--step experts` lowers one MoE
layer's expert matmuls forward and backward per chip (`--seq-len` routed rows per chip, the
config's experts split over the mesh's `expert` axis), the grouped matmul's TPU kernels inside.
`--generation v6e` describes a v6e slice (`--topology XxY`) instead of a v5p.

Each compile appends one record to `--out` (JSON): the mesh, `memory_analysis()` per chip
(argument, output, alias, temp, generated code, total against the chip's HBM), the compiled cost
analysis (FLOPs, bytes accessed; a Pallas kernel counts what it declares), compile time, the
collectives and custom calls in the compiled program (a GPU kernel there would be an error).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs on the CPU; TPU devices are only described
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no Cloud TPU metadata server to ask
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile beside other processes that load libtpu

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Mapping  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import mesh_utils, topologies  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimax_jax.config import MiniMaxConfig  # noqa: E402
from minimax_jax.model import MiniMaxForCausalLM  # noqa: E402
from minimax_jax.training.config import TrainConfig  # noqa: E402
from minimax_jax.training.optimizer import make_optimizer, state_shardings  # noqa: E402
from minimax_jax.training.step import TrainState, train_step  # noqa: E402
from sharding import DEFAULT_RULES, MESH_AXES, batch_sharding, param_shardings  # noqa: E402

HBM_BYTES = {"v5p": 95 * 2**30, "v6e": 32 * 2**30}
GIB = 2**30


def say(text: str) -> None:
    """Progress in plain words, with the time of day."""
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def tpu_mesh(topology: str, shape: dict[str, int], generation: str = "v5p") -> Mesh:
    """A mesh with axes `MESH_AXES` over the chips of a described (not present) TPU slice
    `generation:topology` ("v5p", "4x4x8"), hosts of 2x2x1 chips."""
    dims = [int(d) for d in topology.split("x")]
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{topology}",
                                        chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                        num_slices=1)
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if math.prod(sizes) != math.prod(dims):
        raise ValueError(f"mesh {shape} has {math.prod(sizes)} devices but the {generation}:{topology} slice "
                         f"has {math.prod(dims)} chips")
    devices = mesh_utils.create_device_mesh(sizes, desc.devices, allow_split_physical_axes=True)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def model_config(path: str, layers: int | None) -> MiniMaxConfig:
    """The config at `path` with remat on, cut to its first `layers` layers (whole blocks)."""
    cfg = MiniMaxConfig.from_yaml(path).replace(remat=True)
    if layers is None or layers == cfg.num_hidden_layers:
        return cfg
    if layers % len(cfg.block_pattern):
        raise ValueError(f"--layers {layers} is not a whole number of {len(cfg.block_pattern)}-layer blocks")
    return cfg.replace(num_hidden_layers=layers, layer_types=cfg.layer_types[:layers])


def abstract_params(cfg: MiniMaxConfig, mesh: Mesh, rules: Mapping[str, Any], dtype: str | None = None
                    ) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, params as ShapeDtypeStructs placed on `mesh` by the sharding `rules`); nothing is
    allocated. `dtype` casts the params (serving loads them in the compute dtype)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))))
    shardings = param_shardings(params, mesh, rules)
    place = lambda s, v: v.replace(jax.ShapeDtypeStruct(v.shape, dtype or v.dtype, sharding=s))  # noqa: E731
    return graphdef, jax.tree.map(place, shardings, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` carrying `shardings` (trees of the same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def lower_train(cfg: MiniMaxConfig, mesh: Mesh, rules: Mapping[str, Any], rows: int, seq_len: int
                ) -> jax.stages.Lowered:
    """The train step of `train.py` over `rows` x `seq_len` tokens, lowered for `mesh`."""
    graphdef, params = abstract_params(cfg, mesh, rules)
    optimizer = make_optimizer(TrainConfig())
    replicated = NamedSharding(mesh, P())
    opt_state = with_shardings(jax.eval_shape(optimizer.init, params), state_shardings(optimizer, params, replicated))
    state = TrainState(
        params=params, opt_state=opt_state,
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        rng=jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32, sharding=replicated))
    row = jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32, sharding=batch_sharding(mesh))
    batch = {"tokens": row, "segment_ids": row, "positions": row}
    with jax.set_mesh(mesh):
        return train_step.lower(state, batch, graphdef=graphdef, optimizer=optimizer, grad_accum=1,
                                aux_coef=cfg.router_aux_loss_coef)


def lower_experts(cfg: MiniMaxConfig, mesh: Mesh, tokens: int) -> jax.stages.Lowered:
    """One MoE layer's expert matmuls (`minimax_jax.moe.expert_ffn`: w1 | w3, SiLU, w2) forward and
    backward on each chip: `tokens` routed rows per chip over the config's experts split over the
    mesh's `expert` axis, rows over every axis, in the compute dtype; expert sizes even."""
    from minimax_jax.moe import expert_ffn

    local = cfg.num_local_experts // mesh.shape["expert"]
    d, f, dtype = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.dtype)

    def step(x, w1, w3, w2):
        sizes = jnp.full((local,), x.shape[0] // local, jnp.int32)
        loss = lambda *a: jnp.sum(expert_ffn(*a[:1], sizes, *a[1:], impl=cfg.moe_impl).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w1, w3, w2)

    every = tuple(mesh.axis_names)
    run = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(every),) * 4, out_specs=(P(every),) * 4,
                                check_vma=False))
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(every)))  # noqa: E731
    chips = mesh.devices.size
    return run.lower(spec(chips * tokens, d), spec(chips * local, d, f), spec(chips * local, d, f),
                     spec(chips * local, f, d))


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """K/V pages over `sequence` and their KV heads over `tensor`, lightning states over `tensor`
    (heads), the rest replicated."""
    from minimax_jax.cache import Cache

    pages = P(None, None, "sequence", None, "tensor")  # [blocks, layers, pages, page_size, kv_heads, head_dim]
    spec = {"lightning_state": P(None, None, None, "tensor"), "key": pages, "value": pages}
    return Cache(**{f: NamedSharding(mesh, spec.get(f, P())) for f in cache.__dataclass_fields__})


def lower_prefill(cfg: MiniMaxConfig, mesh: Mesh, rules: Mapping[str, Any], rows: int, chunk: int,
                  context: int, page_size: int) -> jax.stages.Lowered:
    """The serving engine's prefill step: one chunk of `chunk` tokens for each of `rows` slots of
    up to `context` tokens, lowered for `mesh` (params in the compute dtype)."""
    from minimax_jax.serving.sampling import ROW_DTYPES, SamplingBatch
    from minimax_jax.serving.steps import Steps

    graphdef, params = abstract_params(cfg, mesh, rules, dtype=cfg.dtype)
    pages = -(-context // page_size)
    built: dict[str, Steps] = {}

    def build():
        built["steps"] = Steps(nnx.merge(graphdef, params), slots=rows, pages_per_slot=pages,
                               page_size=page_size, num_pages=rows * pages, prefill_rows=rows)
        return built["steps"].cache, built["steps"].state

    cache, slot_state = jax.eval_shape(build)  # the engine's own empty cache, never allocated
    replicated = NamedSharding(mesh, P())
    cache = with_shardings(cache, cache_shardings(cache, mesh))
    slot_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), slot_state)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
    tokens = jax.ShapeDtypeStruct((rows, chunk), jnp.int32, sharding=NamedSharding(mesh, P(None, "sequence")))
    sampling = SamplingBatch(*(spec((rows,), d) for d in ROW_DTYPES))
    with jax.set_mesh(mesh):
        return built["steps"]._prefill.lower(params, cache, slot_state, spec((rows,), jnp.int32), tokens, tokens,
                                             spec((rows,), jnp.bool_), sampling, None)


def program_facts(lowered: str, compiled: str) -> dict[str, Any]:
    """Collectives in compiled HLO text; custom calls in the lowered program (the model's own:
    a kernel would show here) and in the compiled one (those the TPU compiler adds)."""
    ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return {"collectives": {op: len(re.findall(rf"\b{op}(?:-start)?\(", compiled)) for op in ops},
            "model_custom_calls": sorted(set(re.findall(r"stablehlo\.custom_call @(\w+)", lowered))),
            "compiler_custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled)))}


def cost_figures(compiled: jax.stages.Compiled) -> dict[str, float]:
    """The compiled program's cost analysis per chip: FLOPs, transcendentals, bytes accessed (a
    Pallas TPU kernel counts what its `pl.CostEstimate` declares)."""
    cost = compiled.cost_analysis()
    return {"flops": float(cost.get("flops", 0.0)), "transcendentals": float(cost.get("transcendentals", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def compile_and_measure(lowered: jax.stages.Lowered, hbm: int) -> dict[str, Any]:
    """Compile `lowered` and return its per-chip memory figures (bytes and GiB), cost analysis,
    compile seconds and program facts; a GPU kernel in the program is a RuntimeError."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    mem = {f.removesuffix("_size_in_bytes"): int(getattr(m, f)) for f in fields}
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    facts = program_facts(lowered.as_text(), compiled.as_text())
    gpu = [t for t in facts["model_custom_calls"] + facts["compiler_custom_calls"]
           if re.search(r"triton|mosaic_gpu|cudnn|cublas|__gpu", t)]
    if gpu:
        raise RuntimeError(f"the TPU program calls GPU kernels: {gpu}")
    return {"compile_s": round(seconds, 1), "memory_bytes": mem, "cost": cost_figures(compiled),
            "memory_gib": {k: round(v / GIB, 2) for k, v in mem.items()}, "hbm_gib": round(hbm / GIB, 1),
            "fits": mem["total"] <= hbm, **facts}


def parse_rules(text: str) -> dict[str, Any]:
    """"embed=fsdp+sequence,vocab=tensor" -> DEFAULT_RULES with those parameter rules replaced."""
    rules = dict(DEFAULT_RULES)
    for part in filter(None, text.split(",")):
        name, _, axes = part.partition("=")
        group = tuple(a for a in axes.split("+") if a)
        if name not in rules or not set(group) <= set(MESH_AXES):
            raise ValueError(f"--param-rules {text!r}: expected NAME=AXIS[+AXIS],... with names from "
                             f"{sorted(rules)} and axes from {list(MESH_AXES)}")
        rules[name] = group if len(group) > 1 else (group[0] if group else None)
    return rules


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=8,expert=8" -> {"fsdp": 8, "expert": 8}."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.isdigit():
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes from {list(MESH_AXES)}")
        out[name] = int(size)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, compile one step for the described slice, print and append the record."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=("train", "prefill", "experts"), default="train")
    parser.add_argument("--config", default="configs/minimax-text-01.yaml")
    parser.add_argument("--layers", type=int, help="keep the first N layers (whole blocks)")
    parser.add_argument("--generation", choices=sorted(HBM_BYTES), default="v5p", help="TPU generation")
    parser.add_argument("--topology", default="2x2x1", help="chips as XxYxZ (v5p) or XxY (v6e) (default: %(default)s)")
    parser.add_argument("--mesh", default="fsdp=4", help="AXIS=SIZE,... multiplying to the chip count")
    parser.add_argument("--rows", type=int, default=1, help="train: packed rows; prefill: prompts")
    parser.add_argument("--seq-len", type=int, default=4096, help="train: row length; prefill: chunk length")
    parser.add_argument("--context", type=int, help="prefill: tokens the cache holds (default: --seq-len)")
    parser.add_argument("--page-size", type=int, default=4096, help="prefill: tokens per K/V page")
    parser.add_argument("--param-rules", default="", help="parameter sharding rules to replace, e.g. "
                        "embed=fsdp+sequence (shard the params over the sequence axis's devices too)")
    parser.add_argument("--out", type=Path, help="append the record to this JSON file")
    parser.add_argument("--label", default="", help="a note kept with the record")
    args = parser.parse_args(argv)

    cfg = model_config(args.config, args.layers)
    rules = parse_rules(args.param_rules)
    chips = math.prod(int(d) for d in args.topology.split("x"))
    say(f"describing a TPU {args.generation} {args.topology} slice ({chips} chips) and a mesh {args.mesh}")
    mesh = tpu_mesh(args.topology, parse_mesh(args.mesh), args.generation)
    say(f"devices are '{mesh.devices.flat[0].device_kind}'; the host backend is {jax.default_backend()}; the "
        f"ops' 'auto' dispatch picks their TPU kernels where the program is lowered")
    n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(nnx.eval_shape(
        lambda: nnx.state(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))))
    say(f"lowering the {args.step} step: {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts, "
        f"{n_params / 1e9:.1f}B parameters, {args.rows} x {args.seq_len} tokens")
    t0 = time.perf_counter()
    if args.step == "train":
        lowered = lower_train(cfg, mesh, rules, args.rows, args.seq_len)
    elif args.step == "experts":
        lowered = lower_experts(cfg, mesh, args.seq_len)
    else:
        lowered = lower_prefill(cfg, mesh, rules, args.rows, args.seq_len, args.context or args.seq_len,
                                args.page_size)
    lower_s = time.perf_counter() - t0
    say(f"lowered in {lower_s:.0f} s; compiling for the TPU (this is the long part)")
    result = compile_and_measure(lowered, HBM_BYTES[args.generation])
    g = result["memory_gib"]
    say(f"compiled in {result['compile_s']:.0f} s: per chip {g['argument']} GiB arguments, {g['output']} GiB "
        f"outputs ({g['alias']} GiB of them aliased to arguments), {g['temp']} GiB temporaries: {g['total']} GiB "
        f"of {result['hbm_gib']} GiB HBM ({'fits' if result['fits'] else 'does NOT fit'})")
    cost = result["cost"]
    say(f"cost analysis per chip: {cost['flops']:.3e} FLOPs, {cost['bytes_accessed']:.3e} bytes accessed")
    say(f"collectives {result['collectives']}; custom calls from the model: "
        f"{result['model_custom_calls'] or 'none'}, added by the TPU compiler: {result['compiler_custom_calls']}")
    record = {"date": datetime.date.today().isoformat(), "label": args.label, "step": args.step,
              "config": args.config, "layers": cfg.num_hidden_layers, "params": n_params,
              "topology": f"{args.generation}:{args.topology}", "chips": chips, "mesh": dict(mesh.shape),
              "param_rules": args.param_rules or "default", "rows": args.rows,
              "seq_len": args.seq_len, "context": args.context, "lower_s": round(lower_s, 1),
              "jax": jax.__version__, "libtpu": metadata.version("libtpu"), **result}
    if args.out:
        records = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps(records + [record], indent=1) + "\n")
        say(f"appended the record to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
