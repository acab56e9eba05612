"""Check and time the MoE grouped matmul and the MoE layer on one Hopper GPU, in one run.

Run on the device machine from the repository root (jla carried as a wheel):

    python benchmarks/moe.py --out $OUT --budget 420 [--sections check,sweep]

Sections, each skipped once the time budget (seconds) is spent, results printed as they come and
written to OUT/moe.json:

1. sweep: our kernels' tiles at E=32, M=16384 (skewed groups); the fastest per (kernel, contraction,
   width) goes into ``pallas_kernels.grouped_matmul.TILE_TABLE`` for the rest of the run.
2. check: max relative error of our forward, d_x and d_w against ``lax.ragged_dot`` (and its
   VJP) at MiniMax shapes, also with an empty group, rows past sum(group_sizes) and M not a
   multiple of any tile.
3. bench: median ms, forward and forward+backward, of ours, ``lax.ragged_dot``, JAX's
   ``ragged_dot_mgpu`` (+ ``transposed_ragged_dot_mgpu`` for d_w), jla's ragged_dot and a dense
   matmul of the same FLOPs; 4 and 32 experts, 6144 -> 18432 (w1|w3) and 9216 -> 6144 (w2).
4. layer: the whole ``SparseMoE`` (D 6144, F 9216, top-2) forward and forward+backward, and a
   forward breakdown (routing, gather in, experts, gather out + combine).

``--render OUT/moe.json`` prints the markdown tables of a finished run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.grouped_matmul import TILE_TABLE, grouped_matmul  # noqa: E402
from pallas_kernels.grouped_matmul_gpu import (Tiles, ragged_matmul,  # noqa: E402
                                               transposed_ragged_matmul)

D, F = 6144, 9216
LAYERS = {"w13": (D, F, 2), "w2": (F, D, 1)}  # contraction, width per weight, weights
LAYER_TOKENS = (8192, 32768)  # M = 16384 and 65536 expert rows at top-2
# Tiles(block_m, block_n, block_k, stages, band, aligned)
SWEEP = {
    "fwd": [Tiles(128, 256, 64, 4, 4, True), Tiles(128, 256, 64, 4, 8, True)],
    "dw": [Tiles(128, 256, 64, 4, 1), Tiles(128, 256, 64, 4, 2)],
}
SWEEP["dx"] = SWEEP["fwd"]
# JAX's kernels with their fastest tiles of the earlier sweep (benchmarks/RESULTS.md): bands of 8
# column tiles for the row kernels, 4 for d_w.
JAX_TILES = {"fwd": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                         grid_block_n=8),
             "dw": dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                        grid_block_n=4)}
JAX_TILES["dx"] = JAX_TILES["fwd"]
BF16 = jnp.bfloat16
START = time.perf_counter()


def left(budget: float) -> float:
    return budget - (time.perf_counter() - START)


def bench(fn, *args, target_s: float = 0.5, max_reps: int = 30) -> float:
    """Median ms over repeated calls after one warm-up call (compilation included there)."""
    jax.block_until_ready(fn(*args))
    times = []
    while len(times) < 2 or (sum(times) < target_s and len(times) < max_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def skewed_sizes(m: int, e: int, seed: int = 0) -> jax.Array:
    """Zipf-like expert loads (p ~ 1/sqrt(rank), shuffled) summing to m."""
    rng = np.random.default_rng(seed)
    p = rng.permutation(1.0 / np.sqrt(np.arange(1, e + 1)))
    sizes = np.floor(p / p.sum() * m).astype(np.int32)
    sizes[np.argmax(sizes)] += m - sizes.sum()
    return jnp.asarray(sizes)


def rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def randn(key, shape, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(BF16)


def make(m: int, e: int, layer: str, seed: int = 0):
    k, n, nw = LAYERS[layer]
    keys = jax.random.split(jax.random.key(seed), nw + 2)
    x = randn(keys[0], (m, k))
    ws = tuple(randn(keys[1 + j], (e, k, n), k ** -0.5) for j in range(nw))
    dy = randn(keys[-1], (m, n * nw))
    return x, ws, dy


def vjp_fn(f):
    """jit of (x, w, dy) -> (f(x, w), d_x, d_w)."""
    def run(x, w, dy):
        out, vjp = jax.vjp(f, x, w)
        return out, *vjp(dy)
    return jax.jit(run)


def sweep(results: dict, budget: float) -> None:
    m, e = 16384, 32
    sizes = skewed_sizes(m, e)
    for layer, (k, n, nw) in LAYERS.items():
        x, ws, dy = make(m, e, layer)
        jobs = {
            ("fwd", k, n): (lambda t: functools.partial(
                ragged_matmul, transpose_rhs=False, tiles=t), (x, ws, sizes)),
            ("dx", n, k): (lambda t: functools.partial(
                ragged_matmul, transpose_rhs=True, tiles=t), (dy, ws, sizes)),
            ("dw", k, n): (lambda t: functools.partial(
                transposed_ragged_matmul, col_start=0, cols=n, tiles=t), (x, dy, sizes)),
        }
        for key, (kernel, args) in jobs.items():
            best = None
            for t in SWEEP[key[0]]:
                if left(budget) < 0:
                    break
                if key[2] % t.block_n or key[1] % (t.block_m if key[0] == "dw" else t.block_k):
                    continue
                try:
                    ms = bench(jax.jit(kernel(t)), *args, target_s=0.2)
                except Exception as err:  # a tile the compiler rejects: report and go on
                    print(f"sweep {key} {t}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                    continue
                results["sweep"].append({"kernel": list(key), "tiles": list(t.__dict__.values()),
                                         "ms": ms})
                print(f"sweep {layer} {key} {t}: {ms:.3f} ms", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, t)
            if best is not None:
                TILE_TABLE[key] = best[1]
    results["tile_table"] = {str(k): list(v.__dict__.values()) for k, v in TILE_TABLE.items()}
    print("TILE_TABLE =", results["tile_table"], flush=True)


def check(results: dict, budget: float) -> None:
    cases = [(16384, 32, "w13", None), (16384, 4, "w2", None),
             (16384 - 37, 32, "w2", "empty group, 100 rows past the groups")]
    for m, e, layer, note in cases:
        if left(budget) < 0:
            return
        x, ws, dy = make(m, e, layer, seed=1)
        sizes = skewed_sizes(m, e, seed=1)
        if note:
            sizes = sizes.at[3].set(0)
            sizes = sizes.at[int(jnp.argmax(sizes))].add(m - 100 - int(sizes.sum()))
        ours = vjp_fn(lambda x, w: grouped_matmul(x, w, sizes, impl="pallas"))(x, ws, dy)
        ref = vjp_fn(lambda x, w: grouped_matmul(x, w, sizes, impl="xla"))(x, ws, dy)
        errs = {"out": rel_err(ours[0], ref[0]), "dx": rel_err(ours[1], ref[1]),
                "dw": max(rel_err(a, b) for a, b in zip(ours[2], ref[2]))}
        if note:
            errs["tail_zero"] = bool(jnp.all(ours[0][int(sizes.sum()):] == 0))
        row = {"m": m, "experts": e, "layer": layer, "note": note, **errs}
        results["check"].append(row)
        print("check", row, flush=True)


def peers():
    """JAX's shipped kernels (fwd, d_x, d_w) and jla's differentiable ragged_dot, where importable."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    out = {}

    def jax_tiles(key):
        return JAX_TILES[key[0]]

    def jax_fwd(x, w, sizes):
        return ragged_matmul_jax(x, w, sizes, ("fwd", w.shape[1], w.shape[2]), False)

    def ragged_matmul_jax(x, w, sizes, key, transpose):
        return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=sizes, transpose_rhs=transpose,
                                          **jax_tiles(key))

    def jax_fwd_bwd(x, w, dy, sizes):
        k, n = w.shape[1], w.shape[2]
        y = jax_fwd(x, w, sizes)
        dx = ragged_matmul_jax(dy, w, sizes, ("dx", n, k), True)
        dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=sizes,
                                                              **jax_tiles(("dw", k, n)))
        return y, dx, dw

    out["jax_mgpu"] = (jax_fwd, jax_fwd_bwd)
    try:
        from jla.ops.mosaic_gpu import ragged_dot as jla_rd
        out["jla"] = (lambda x, w, s: jla_rd.ragged_dot(x, w, s), None)
    except Exception as err:
        print("jla unavailable:", repr(err), flush=True)
    return out


def bench_matmuls(results: dict, budget: float, ms_list=(16384, 65536)) -> None:
    peer = peers()
    for m in ms_list:
        for e in (4, 32):
            for layer, (k, n, nw) in LAYERS.items():
                if left(budget) < 0:
                    return
                sizes = skewed_sizes(m, e)
                x, ws, dy = make(m, e, layer)
                w_cat = ws[0] if nw == 1 else jnp.concatenate(ws, axis=2)
                flops = 2 * m * k * n * nw
                dense_w = w_cat[0]
                fwd = {
                    "dense": (jax.jit(lambda x, w: x @ w), (x, dense_w)),
                    "ours": (jax.jit(lambda x, w: grouped_matmul(x, w, sizes, impl="pallas")),
                             (x, ws)),
                    "xla": (jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), (x, w_cat)),
                    "jax_mgpu": (jax.jit(lambda x, w: peer["jax_mgpu"][0](x, w, sizes)),
                                 (x, w_cat)),
                }
                both = {
                    "dense": (vjp_fn(lambda x, w: x @ w), (x, dense_w, dy)),
                    "ours": (vjp_fn(lambda x, w: grouped_matmul(x, w, sizes, impl="pallas")),
                             (x, ws, dy)),
                    "xla": (vjp_fn(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), (x, w_cat, dy)),
                    "jax_mgpu": (jax.jit(lambda x, w, dy: peer["jax_mgpu"][1](x, w, dy, sizes)),
                                 (x, w_cat, dy)),
                }
                if "jla" in peer:
                    jla_f = lambda x, w: peer["jla"][0](x, w, sizes)  # noqa: E731
                    fwd["jla"] = (jax.jit(jla_f), (x, w_cat))
                    both["jla"] = (vjp_fn(jla_f), (x, w_cat, dy))
                for mode, fns, mult in (("fwd", fwd, 1), ("fwd+bwd", both, 3)):
                    row = {"m": m, "experts": e, "layer": layer, "pass": mode}
                    for name, (fn, args) in fns.items():
                        try:
                            ms = bench(fn, *args, target_s=0.3)
                        except Exception as err:
                            print(f"{name} {row}: {type(err).__name__}: {str(err)[:300]}",
                                  flush=True)
                            continue
                        row[name] = ms
                        row[f"{name}_tflops"] = mult * flops / ms / 1e9
                    results["bench"].append(row)
                    print("bench", json.dumps(row), flush=True)
                del x, ws, dy, w_cat, dense_w, fwd, both


def bench_layer(results: dict, budget: float) -> None:
    from flax import nnx

    from minimax_jax.config import MiniMaxConfig
    from minimax_jax.moe import SparseMoE, dispatch_order, expert_ffn, gather_rows, route

    for e in (4, 32):
        cfg = MiniMaxConfig(hidden_size=D, intermediate_size=F, num_local_experts=e,
                            dtype="bfloat16", param_dtype="bfloat16", moe_impl="pallas")
        moe = SparseMoE(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(moe)
        k = cfg.num_experts_per_tok
        for tokens in LAYER_TOKENS:
            if left(budget) < 0:
                return
            x = randn(jax.random.key(5), (1, tokens, D))
            dy = randn(jax.random.key(6), (1, tokens, D))
            layer = lambda st, x: nnx.merge(graphdef, st)(x)[0]  # noqa: E731
            fwd_ms = bench(jax.jit(layer), state, x, target_s=0.3)
            both_ms = bench(vjp_fn(layer), state, x, dy, target_s=0.3)
            flops = 2 * tokens * D * e + 2 * tokens * k * 3 * D * F

            xf = x.reshape(tokens, D)
            gate, w1, w3, w2 = (moe.gate[...], moe.w1[...], moe.w3[...], moe.w2[...])

            def routing(xf, gate):
                probs, weights, experts = route(xf @ gate, k)
                return weights, dispatch_order(experts, e)

            weights, (order, inverse, sizes) = jax.jit(routing)(xf, gate)
            xs = jax.jit(gather_rows, static_argnums=3)(xf, order, inverse, k)
            experts_fn = jax.jit(functools.partial(expert_ffn, impl="pallas"))
            ys = experts_fn(xs, sizes, w1, w3, w2)

            def combine(ys, inverse, order, weights):
                y = gather_rows(ys, inverse, order, 1).reshape(tokens, k, D)
                return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(BF16)

            parts = {
                "routing": bench(jax.jit(routing), xf, gate, target_s=0.2),
                "gather_in": bench(jax.jit(gather_rows, static_argnums=3), xf, order, inverse, k,
                                   target_s=0.2),
                "experts": bench(experts_fn, xs, sizes, w1, w3, w2, target_s=0.2),
                "gather_out_combine": bench(jax.jit(combine), ys, inverse, order, weights,
                                            target_s=0.2),
            }
            row = {"experts": e, "tokens": tokens, "fwd_ms": fwd_ms, "fwd+bwd_ms": both_ms,
                   "fwd_tflops": flops / fwd_ms / 1e9, "fwd+bwd_tflops": 3 * flops / both_ms / 1e9,
                   "us_per_token_fwd+bwd": both_ms * 1e3 / tokens, "fwd_parts_ms": parts}
            results["layer"].append(row)
            print("layer", json.dumps(row), flush=True)
        del moe, state


def render(results: dict) -> str:
    """Markdown tables of a results dict (as written to moe.json)."""
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| M | experts | layer | pass | dense ms | ours ms (TFLOP/s) | lax.ragged_dot ms | "
             "JAX mgpu ms | jla ms | dense ms / ours ms | JAX ms / ours ms | jla ms / ours ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["bench"]:
        ours = r.get("ours")
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
        lines.append(
            f"| {r['m']} | {r['experts']} | {r['layer']} | {r['pass']} | {fmt(r.get('dense'))} | "
            f"{fmt(ours)} ({fmt(r.get('ours_tflops'), '.0f')}) | {fmt(r.get('xla'))} | "
            f"{fmt(r.get('jax_mgpu'))} | {fmt(r.get('jla'))} | {ratio(r.get('dense'), ours)} | "
            f"{ratio(r.get('jax_mgpu'), ours)} | {ratio(r.get('jla'), ours)} |")
    lines += ["", "| experts | tokens | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | "
              "us/token (fwd+bwd) | fwd parts ms: routing / gather in / experts / gather out |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["layer"]:
        p = r["fwd_parts_ms"]
        lines.append(
            f"| {r['experts']} | {r['tokens']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd+bwd_ms'])} | "
            f"{fmt(r['fwd_tflops'], '.0f')} | {fmt(r['fwd+bwd_tflops'], '.0f')} | "
            f"{fmt(r['us_per_token_fwd+bwd'], '.3f')} | {p['routing']:.2f} / {p['gather_in']:.2f} / "
            f"{p['experts']:.2f} / {p['gather_out_combine']:.2f} |")
    return "\n".join(lines)


SECTIONS = {"sweep": sweep, "check": check,
            "bench16k": functools.partial(bench_matmuls, ms_list=(16384,)), "layer": bench_layer,
            "bench64k": functools.partial(bench_matmuls, ms_list=(65536,))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--budget", type=float, default=270.0)
    parser.add_argument("--render", help="print the tables of a moe.json and exit")
    parser.add_argument("--sections", default="sweep,check,bench16k,layer,bench64k",
                        help="comma-separated subset of: " + ", ".join(SECTIONS))
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return
    dev = jax.devices()[0]
    results = {"device": dev.device_kind, "jax": jax.__version__, "sweep": [], "check": [],
               "bench": [], "layer": []}
    print(results["device"], jax.__version__, flush=True)
    path = os.path.join(args.out, "moe.json")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    for section in (SECTIONS[name] for name in args.sections.split(",")):
        if left(args.budget) < 0:
            print("out of time before", section, flush=True)
            break
        try:
            section(results, args.budget)
        except Exception as err:
            print(f"section failed: {type(err).__name__}: {str(err)[:2000]}", flush=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    print(render(results))
    print(f"done in {time.perf_counter() - START:.0f} s", flush=True)


if __name__ == "__main__":
    main()
