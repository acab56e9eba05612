"""Lightning attention compiled for TPU v5p and v6e chips on a machine without a TPU (ahead of time):
the Pallas TPU kernels (`pallas_kernels.lightning_tpu`) against the plain-XLA chunked form
(`pallas_kernels.chunked`), per chip, as XLA's TPU compiler reports them. Compiled, not run.

    PYTHONPATH=DIR python benchmarks/lightning_tpu_aot.py --seq-len 8192 --heads 64 8 \
        --out benchmarks/lightning_tpu_aot_2026-12-02.json

(DIR holds libtpu, see benchmarks/tpu_aot.py.) Each chip of a 4-chip slice runs one row of
`--seq-len` tokens with segment ids and an initial state, bf16 q, k, v ``[1, T, H, D]`` (inside
`shard_map` over the rows, so the figures are one chip's). Two programs per implementation: the
forward (o, final state) and forward + backward (gradients of q, k, v and the initial state). For
each it prints `memory_analysis()` (temporaries, total) and the compiled cost analysis (FLOPs,
transcendentals, bytes accessed; the kernels' figures are the `pl.CostEstimate` they declare, the
chunked form's those XLA counts for its ops). XLA counts a while loop's body once, so for the
chunked form (a `lax.scan` over blocks) it also prints loop-corrected figures (`loop_corrected`).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs on the CPU; TPU devices are only described
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no Cloud TPU metadata server to ask
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile beside other processes that load libtpu

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tpu_aot import HBM_BYTES, compile_and_measure, say, tpu_mesh  # noqa: E402
from pallas_kernels.chunked import lightning_attention_chunked  # noqa: E402
from pallas_kernels.lightning_tpu import lightning_attention_tpu  # noqa: E402

SLICES = {"v5p": "2x2x1", "v6e": "2x2"}  # 4 chips each
IMPLS: dict[str, Callable] = {
    "pallas_tpu": lightning_attention_tpu,
    "chunked_64": functools.partial(lightning_attention_chunked, block_size=64),
    "chunked_128": functools.partial(lightning_attention_chunked, block_size=128),
}


def program(fn: Callable, backward: bool, heads: int, flat: bool) -> Callable:
    """(q, k, v, slopes, s0, segment_ids) -> (o, final state), or with ``backward`` the gradients of
    q, k, v and s0 of a loss of both. With ``flat`` the token tensors come and go as
    ``[B, T, H * D]`` (the layout a projection writes them in) and are viewed as ``[B, T, H, D]``
    for the op."""

    def forward(q, k, v, slopes, s0, seg):
        if flat:
            q, k, v = (x.reshape(x.shape[:2] + (heads, -1)) for x in (q, k, v))
        o, state = fn(q, k, v, slopes, s0, seg)
        return (o.reshape(o.shape[:2] + (-1,)) if flat else o), state

    if not backward:
        return forward

    def grads(q, k, v, slopes, s0, seg):
        def loss(q, k, v, s0):
            o, state = forward(q, k, v, slopes, s0, seg)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)

    return grads


def lower(generation: str, impl: str, backward: bool, seq_len: int, heads: int, head_dim: int,
          flat: bool) -> jax.stages.Lowered:
    """One chip's row of the op under ``shard_map`` over a 4-chip slice of ``generation``."""
    mesh = tpu_mesh(SLICES[generation], {"data": 4}, generation)
    rows = mesh.shape["data"]
    body = program(IMPLS[impl], backward, heads, flat)
    out_specs = (P("data"),) * 4 if backward else (P("data"), P("data"))
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * 3 + (P(), P("data"), P("data")),
                           out_specs=out_specs, check_vma=False)

    def spec(shape, dtype, part):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, part))

    x = spec((rows, seq_len) + ((heads * head_dim,) if flat else (heads, head_dim)), jnp.bfloat16, P("data"))
    args = (x, x, x, spec((heads,), jnp.float32, P()),
            spec((rows, heads, head_dim, head_dim), jnp.float32, P("data")),
            spec((rows, seq_len), jnp.int32, P("data")))
    return jax.jit(mapped).lower(*args)


def loop_corrected(cost: dict[str, float], cost_half: dict[str, float], trips: int) -> dict[str, float]:
    """Cost of a program whose while loops (the chunked form's scans, ``trips`` iterations at T) XLA
    counts once: from the counts at T and T / 2, the part outside the loops (linear in T) is
    2 (c(T) - c(T/2)) and the loop bodies c(T) minus that; returns outside + trips * bodies."""
    out = {}
    for key, value in cost.items():
        outside = 2 * (value - cost_half[key])
        out[key] = outside + trips * (value - outside)
    return out


def measure(generation: str, impl: str, backward: bool, seq_len: int, heads: int, head_dim: int,
            flat: bool) -> dict[str, Any]:
    """The record of one compile: shapes, memory per chip, cost analysis, custom calls."""
    def compiled(t):
        return compile_and_measure(lower(generation, impl, backward, t, heads, head_dim, flat),
                                   HBM_BYTES[generation])

    result = compiled(seq_len)
    if impl != "pallas_tpu":
        result["cost_loop_corrected"] = loop_corrected(result["cost"], compiled(seq_len // 2)["cost"],
                                                       seq_len // IMPLS[impl].keywords["block_size"])
    return {"generation": generation, "impl": impl, "pass": "fwd+bwd" if backward else "fwd",
            "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
            "token_layout": "[B, T, H * D]" if flat else "[B, T, H, D]", **result}


def table(records: list[dict[str, Any]]) -> str:
    """Markdown table of the records: per chip, compiled, not run."""
    lines = ["| chip | H | tokens | pass | impl | temp MiB | total MiB | GFLOP | Gtransc. | GB accessed | "
             "loop-corrected GFLOP / GB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mem, cost = r["memory_bytes"], r["cost"]
        fixed = r.get("cost_loop_corrected")
        fixed_text = f"{fixed['flops'] / 1e9:.2f} / {fixed['bytes_accessed'] / 1e9:.3f}" if fixed else "-"
        lines.append(f"| {r['generation']} | {r['heads']} | {r['token_layout']} | {r['pass']} | {r['impl']} | "
                     f"{mem['temp'] / 2**20:.1f} | {mem['total'] / 2**20:.1f} | {cost['flops'] / 1e9:.2f} | "
                     f"{cost['transcendentals'] / 1e9:.3f} | {cost['bytes_accessed'] / 1e9:.3f} | {fixed_text} | "
                     f"{r['compile_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compile every (chip, heads, pass, impl), print the table, write the records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", nargs="+", default=list(SLICES), choices=list(SLICES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, nargs="+", default=[64], help="heads per chip")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--token-layouts", nargs="+", default=["flat", "bthd"], choices=["flat", "bthd"],
                        help="q, k, v, o passed as [B, T, H * D] (flat) or [B, T, H, D] (bthd)")
    parser.add_argument("--out", type=Path, help="write the records to this JSON file")
    args = parser.parse_args(argv)

    records = []
    for generation in args.generations:
        for heads in args.heads:
            for layout in args.token_layouts:
                for backward in (False, True):
                    for impl in args.impls:
                        say(f"{generation} H{heads} {layout} {'fwd+bwd' if backward else 'fwd'} {impl}: compiling")
                        records.append(measure(generation, impl, backward, args.seq_len, heads, args.head_dim,
                                               layout == "flat"))
    print(table(records))
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
                "libtpu": metadata.version("libtpu")}
        args.out.write_text(json.dumps([{**meta, **r} for r in records], indent=1) + "\n")
        say(f"wrote {len(records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
