"""Check and time lightning attention on one Hopper GPU: our kernels, our chunked path, and peers.

Run on the device machine from the repository root (peers carried as wheels, see KERNEL_NOTES.md):

    python benchmarks/lightning_attention.py --check --bench --out $OUT

--check: max relative error of impl="pallas" (outputs, final state, all gradients) against the
         float64 chunked form on the GPU at MiniMax shapes (head dim 128 and 64), with segment ids
         and an initial state.
--bench: median ms of forward and forward+backward for ours, chunked and jla (same process), fla
         (benchmarks/fla_peer.py, its own process), decode, and the copy bandwidth of this run.
--no-peers / --no-chunked: leave out jla and fla / the chunked path from --bench (a quicker run
         that times only our kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import lightning_attention, lightning_decode  # noqa: E402

SHAPES = [(1, 4096, 64), (1, 16384, 64), (1, 65536, 8), (4, 8192, 16), (1, 262144, 8)]
CHECK_SHAPES = [(1, 4096, 64, 128), (2, 3000, 16, 128), (2, 3000, 16, 64)]  # B, T, H, D
CHUNKED_MAX_TOKENS = 16384 * 64  # the chunked path is timed only up to this many token-heads
DECODE_BATCHES = [1, 16, 64, 256]
D = 128


def minimax_slopes(h: int) -> np.ndarray:
    return (2.0 ** (-8.0 * (np.arange(h) + 1) / h)).astype(np.float32)


def bench(fn, *args, iters: int = 20, repeats: int = 7) -> float:
    """Median ms per call: `iters` back-to-back asynchronous calls, then one sync, `repeats` times."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters * 1e3)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (GB/s)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1 << 28,)), jnp.float32)  # 1 GiB
    f = jax.jit(lambda x: x * 1.0000001)
    ms = bench(f, x, iters=10, repeats=5)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


def rel(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float64))
    b = np.asarray(jnp.asarray(b, jnp.float64))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check(results: dict) -> None:
    rng = np.random.default_rng()
    for b, t, h, d in CHECK_SHAPES:
        shape = (b, t, h, d)
        q, k, v = (jnp.asarray(rng.normal(size=shape) * 0.5, jnp.bfloat16) for _ in range(3))
        slopes = jnp.asarray(minimax_slopes(h) * np.linspace(1.0, 0.0127, h).astype(np.float32))
        s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32)
        seg = np.ones((b, t), np.int32)
        seg[:, t // 3 :] = 2
        seg[:, (2 * t) // 3 + 5 :] = 1
        seg = jnp.asarray(seg)
        w_o = jnp.asarray(rng.normal(size=shape), jnp.float32)
        w_s = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32)
        key = f"B{b} T{t} H{h} D{d}"

        def loss(impl, dtype):
            def f(q, k, v, s0):
                o, st = lightning_attention(
                    q.astype(dtype),
                    k.astype(dtype),
                    v.astype(dtype),
                    slopes,
                    initial_state=s0,
                    segment_ids=seg,
                    impl=impl,
                )
                return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(st * w_s), (o, st)

            return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))

        try:
            grads, (o, st) = loss("pallas", jnp.bfloat16)(q, k, v, s0)
        except Exception as e:  # report and go on to the timings
            print("check failed:", repr(e)[:2000], flush=True)
            results.setdefault("check", {})[key] = {"failed": repr(e)[:500]}
            continue
        with jax.enable_x64(True):
            q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
            f64 = loss("chunked", jnp.float64)
            grads_ref, (o_ref, st_ref) = f64(q64, k64, v64, s0.astype(jnp.float64))
            errs = {"o": rel(o, o_ref), "final_state": rel(st, st_ref)}
            for name, g, gr in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_ref):
                errs[name] = rel(g, gr)
        results.setdefault("check", {})[key] = errs
        print("check", key, " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)

    # decode: chained kernel steps vs the float64 recurrence
    b, h = 8, 64
    state_np = rng.normal(size=(b, h, D, D))
    state = jnp.asarray(state_np, jnp.float32)
    slopes = jnp.asarray(minimax_slopes(h))
    with jax.enable_x64(True):
        st_ref = jnp.asarray(state_np, jnp.float64)
    err = 0.0
    step = jax.jit(lightning_decode, donate_argnums=(4,))
    for _ in range(4):
        q, k, v = (jnp.asarray(rng.normal(size=(b, h, D)), jnp.bfloat16) for _ in range(3))
        with jax.enable_x64(True):
            lam = jnp.exp(-slopes.astype(jnp.float64))[None, :, None, None]
            st_ref = lam * st_ref + jnp.einsum(
                "bhk,bhv->bhkv", k.astype(jnp.float64), v.astype(jnp.float64)
            )
            o_ref = jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float64), st_ref)
        o, state = step(q, k, v, slopes, state)
        with jax.enable_x64(True):
            err = max(err, rel(o, o_ref), rel(state, st_ref))
    results.setdefault("check", {})["decode B8 H64"] = {"o_and_state": err}
    print(f"check decode B8 H64 max rel err={err:.2e}", flush=True)


def bench_all(results: dict, peers: bool, chunked: bool) -> None:
    bw = copy_bandwidth()
    results["copy_GBps"] = bw
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    jla = None
    if peers:
        try:
            import jla  # noqa: F401
            from jla import ops as jla_ops

            jla = jla_ops
        except Exception as e:  # the peer is optional: report and continue
            print("jla unavailable:", repr(e), flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for b, t, h in SHAPES:
        shape = (b, t, h, D)
        q, k, v, do = (jnp.asarray(rng.normal(size=shape) * 0.5, jnp.bfloat16) for _ in range(4))
        slopes = jnp.asarray(minimax_slopes(h))
        g = jnp.broadcast_to(
            -slopes, (b, t, h)
        )  # an argument, so that no peer work is constant-folded

        def ours(impl):
            return lambda q, k, v, slopes, g: lightning_attention(q, k, v, slopes, impl=impl)[0]

        fns = {"ours": ours("pallas")}
        if chunked and b * t * h <= CHUNKED_MAX_TOKENS:
            fns["chunked"] = ours("chunked")
        if jla is not None:
            fns["jla"] = lambda q, k, v, slopes, g: jax.tree.leaves(
                jla.linear_attention("simple_gla", q, k, v, g=g, scale=1.0, impl="mosaic_gpu")
            )[0]
        row = {"shape": f"B{b} T{t} H{h}"}
        for name, fn in fns.items():
            fwd = jax.jit(fn)

            def fwd_bwd(q, k, v, slopes, g, do, fn=fn):
                o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, slopes, g), q, k, v)
                return o, vjp(do)

            try:
                row[f"{name}_fwd"] = bench(fwd, q, k, v, slopes, g)
                row[f"{name}_fwdbwd"] = bench(jax.jit(fwd_bwd), q, k, v, slopes, g, do)
            except Exception as e:
                print(name, row["shape"], "failed:", repr(e)[:400], flush=True)
        tokens = b * t * h
        row["floor_fwd_ms"] = tokens * 1024 / (bw * 1e9) * 1e3
        row["floor_fwdbwd_ms"] = tokens * 2816 / (bw * 1e9) * 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, do
    results["attention"] = rows

    dec = []
    for b in DECODE_BATCHES:
        h = 64
        q, k, v = (jnp.asarray(rng.normal(size=(b, h, D)), jnp.bfloat16) for _ in range(3))
        state = jnp.asarray(rng.normal(size=(b, h, D, D)), jnp.float32)
        slopes = jnp.asarray(minimax_slopes(h))
        step = jax.jit(lightning_decode, donate_argnums=(4,))
        o, state = step(q, k, v, slopes, state)
        jax.block_until_ready(state)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(20):
                o, state = step(q, k, v, slopes, state)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - t0) / 20 * 1e3)
        ms = float(np.median(times))
        gbps = 2 * state.nbytes / (ms * 1e-3) / 1e9
        dec.append({"B": b, "ms": ms, "GBps": gbps, "frac_copy_bw": gbps / bw})
        print(json.dumps(dec[-1]), flush=True)
    results["decode"] = dec


def sweep(results: dict) -> None:
    """Forward and forward+backward ms of our kernel at every shape over the programs-per-launch
    target (which sets how many pieces each row's time axis is cut into)."""
    from pallas_kernels import lightning_gpu

    rng = np.random.default_rng(1)
    rows = []
    default = lightning_gpu.TARGET_PROGRAMS
    for b, t, h in SHAPES:
        q, k, v, do = (jnp.asarray(rng.normal(size=(b, t, h, D)) * 0.5, jnp.bfloat16)
                       for _ in range(4))
        slopes = jnp.asarray(minimax_slopes(h))
        for target in (64, 128, 132, 264):
            lightning_gpu.TARGET_PROGRAMS = target
            jax.clear_caches()

            def fwd(q, k, v):
                return lightning_attention(q, k, v, slopes, impl="pallas")[0]

            def fwd_bwd(q, k, v, do):
                o, vjp = jax.vjp(fwd, q, k, v)
                return o, vjp(do)

            nchunks = -(-t // lightning_gpu.CHUNK)
            row = {"shape": f"B{b} T{t} H{h}", "target": target,
                   "pieces": lightning_gpu.num_pieces(b, h, nchunks, target),
                   "fwd_ms": bench(jax.jit(fwd), q, k, v),
                   "fwdbwd_ms": bench(jax.jit(fwd_bwd), q, k, v, do)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, do
    lightning_gpu.TARGET_PROGRAMS = default
    jax.clear_caches()
    results["sweep"] = rows


def run_fla(results: dict) -> None:
    """fla in its own process, before this process takes the GPU's memory."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, os.path.join(here, "fla_peer.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    try:
        results["fla"] = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as e:
        print("fla results unreadable:", repr(e), flush=True)


def markdown(results: dict) -> str:
    """The results table: median ms, ratios to the peers, fraction of the memory floor."""
    fla = {r["shape"]: r for r in results.get("fla", {}).get("rows", [])}
    lines = [
        f"GPU: {results['device']}; jax {results['jax']}; fla {results.get('fla', {}).get('fla')}"
        f", torch {results.get('fla', {}).get('torch')}; date {results['date']}; copy bandwidth "
        f"{results['copy_GBps']:.0f} GB/s (read + write) measured in the same run.",
        "",
        "| shape | pass | ours ms | chunked ms | jla ms | fla ms | jla / ours | fla / ours | "
        "floor ms | floor / ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for row in results["attention"]:
        for key, floor in (("fwd", "floor_fwd_ms"), ("fwdbwd", "floor_fwdbwd_ms")):
            ours = row.get(f"ours_{key}")
            jla, flav = row.get(f"jla_{key}"), fla.get(row["shape"], {}).get(f"fla_{key}")
            ratio = lambda peer: "-" if peer is None or ours is None else f"{peer / ours:.2f}"
            lines.append(
                f"| {row['shape']} | {'fwd' if key == 'fwd' else 'fwd+bwd'} | {fmt(ours)} | "
                f"{fmt(row.get(f'chunked_{key}'))} | {fmt(jla)} | {fmt(flav)} | {ratio(jla)} | "
                f"{ratio(flav)} | {row[floor]:.3f} | {ratio(row[floor])} |"
            )
    lines += [
        "",
        "| decode B (H64, D128) | ms | state GB/s (read + write) | fraction of copy bandwidth |",
        "|---|---|---|---|",
    ]
    for r in results["decode"]:
        lines.append(f"| {r['B']} | {r['ms']:.4f} | {r['GBps']:.0f} | {r['frac_copy_bw']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-chunked", action="store_true")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    results = {"jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.bench and not args.no_peers:
        run_fla(results)
    results["device"] = str(jax.devices()[0].device_kind)
    print(results, flush=True)
    if args.check:
        check(results)
    if args.sweep:
        sweep(results)
    if args.bench:
        bench_all(results, not args.no_peers, not args.no_chunked)
    with open(os.path.join(args.out, "lightning_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if args.bench:
        table = markdown(results)
        print(table)
        with open(os.path.join(args.out, "RESULTS_table.md"), "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
