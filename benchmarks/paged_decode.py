"""Check and time paged decode attention on one Hopper GPU: the Mosaic GPU kernel against the
blockwise XLA (gather) path.

Run on the device machine from the repository root:

    python3 benchmarks/paged_decode.py --out $OUT --budget 300

Shapes: MiniMax-Text-01's softmax layer (64 query heads, 8 KV heads, head dim 128), bf16, pages of
16 slots shuffled through the pool, one query token per row at the last slot of a context of
1,024 / 131,072 / 1,048,576 tokens, batch 1 and 8 (batch 8 up to 131,072). Rows carry the
serving engine's segment ids (0 on real slots, -1 past the context).

1. check (before any timing, every shape up to 131,072 and 1M at batch 1): max |error| / max
   |reference| of both paths against impl="reference" (float32 on the same bf16 values); PASS
   below 1e-2.
2. bench: median ms per call of impl="pallas" and impl="xla" (each jitted, one warm-up call, then
   calls synced with ``jax.block_until_ready`` for at least 10 and 1 s), the bytes a call must read
   (the context's keys and values) and the floor time at the device's measured copy bandwidth, and
   the share of that floor each path reaches.

--budget SECONDS: wall-clock guard; rows not started when it is spent are skipped and listed.
--out DIR: writes DIR/paged_decode.json (rewritten after every row) and DIR/paged_decode.md.
--smoke: tiny shapes in Pallas' GPU interpret mode on any backend (the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.serve import copy_bandwidth  # noqa: E402
from benchmarks.softmax_attention import error_text, rel_err, time_ms  # noqa: E402
from pallas_kernels import paged_softmax_attention  # noqa: E402
from pallas_kernels.softmax_gpu import paged_decode_attention  # noqa: E402

PAGE = 16
FULL = dict(h=64, n=8, d=128, rows=[(1, 1024), (8, 1024), (1, 131072), (8, 131072), (1, 1048576)])
SMOKE = dict(h=8, n=2, d=64, rows=[(1, 256), (2, 512)])
CHECK_MAX = 1 << 20  # contexts checked against the reference


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def inputs(b: int, context: int, h: int, n: int, d: int, seed: int = 0) -> dict:
    """One decode call: q [b, 1, h, d], pools of b * context / PAGE pages (+ 1 spare), a shuffled
    page table, segment ids as the engine gives them and the query at the last slot."""
    key = jax.random.key(seed)
    kq, kk, kv, kt = jax.random.split(key, 4)
    r = context // PAGE
    pages = b * r + 1
    q = jax.random.normal(kq, (b, 1, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (pages, PAGE, n, d), jnp.bfloat16)
    v = jax.random.normal(kv, (pages, PAGE, n, d), jnp.bfloat16)
    table = jax.random.permutation(kt, pages)[:b * r].reshape(b, r).astype(jnp.int32)
    return dict(q=q, key_pages=k, value_pages=v, page_table=table,
                q_segment_ids=jnp.zeros((b, 1), jnp.int32),
                kv_segment_ids=jnp.zeros((b, r * PAGE), jnp.int32),
                q_offset=jnp.full((b,), context - 1, jnp.int32))


def path(impl: str, smoke: bool):
    """The jitted call of one path (the kernel itself, in interpret mode, for --smoke)."""
    if smoke and impl == "pallas":
        return jax.jit(lambda x: paged_decode_attention(
            x["q"], x["key_pages"], x["value_pages"], x["page_table"], x["q_segment_ids"],
            x["kv_segment_ids"], x["q_offset"], interpret=True))
    return jax.jit(lambda x: paged_softmax_attention(
        x["q"], x["key_pages"], x["value_pages"], x["page_table"], q_segment_ids=x["q_segment_ids"],
        kv_segment_ids=x["kv_segment_ids"], q_offset=x["q_offset"], impl=impl))


def read_bytes(b: int, context: int, n: int, d: int) -> int:
    """Keys and values of the context in bf16: what one call must read at least."""
    return 2 * b * context * n * d * 2


def run(args) -> dict:
    shapes = SMOKE if args.smoke else FULL
    h, n, d = shapes["h"], shapes["n"], shapes["d"]
    deadline = time.perf_counter() + args.budget
    bandwidth = copy_bandwidth(1 << 24 if args.smoke else 1 << 30)
    results = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                   date=time.strftime("%Y-%m-%d"), heads=h, kv_heads=n, head_dim=d, page=PAGE,
                   bandwidth_gbs=bandwidth / 1e9, rows=[], skipped=[])
    paths = {impl: path(impl, args.smoke) for impl in ("pallas", "xla")}
    reference = path("reference", args.smoke)
    for b, context in shapes["rows"]:
        if time.perf_counter() > deadline:
            results["skipped"].append(f"B{b} context {context}")
            continue
        log(f"decode attention: batch {b}, context {context:,} tokens: building inputs")
        x = inputs(b, context, h, n, d)
        row = dict(batch=b, context=context, bytes=read_bytes(b, context, n, d))
        row["floor_ms"] = 1e3 * row["bytes"] / bandwidth
        want = reference(x) if context <= CHECK_MAX and b * context <= CHECK_MAX else None
        for impl, fn in paths.items():
            log(f"  {impl}: checking and timing")
            try:
                if want is not None:
                    row[f"{impl}_error"] = rel_err(fn(x), want)
                warm, ms = time_ms(fn, x, target_s=1.0)
                row[f"{impl}_ms"], row[f"{impl}_warm_s"] = ms, warm
                row[f"{impl}_of_floor"] = row["floor_ms"] / ms
            except Exception as err:  # a path that fails is reported, the others still run
                row[f"{impl}_failed"] = error_text(err)
        if "pallas_ms" in row and "xla_ms" in row:
            row["speedup"] = row["xla_ms"] / row["pallas_ms"]
        row["check"] = ("PASS" if all(row.get(f"{i}_error", 0.0) < 1e-2 for i in paths)
                        and not any(f"{i}_failed" in row for i in paths) else "FAIL")
        del want, x
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write(args.out, results)
    return results


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(results: dict) -> str:
    lines = [f"Paged decode attention, {results['device']}, jax {results['jax']}, {results['date']}: "
             f"H{results['heads']} N{results['kv_heads']} D{results['head_dim']} bf16, pages of "
             f"{results['page']}, copy bandwidth {results['bandwidth_gbs']:.0f} GB/s", "",
             "| batch | context | bytes read | floor ms | pallas ms | xla ms | xla / pallas | "
             "pallas of floor | xla of floor | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['batch']} | {r['context']:,} | {r['bytes'] / 1e6:,.1f} MB | {r['floor_ms']:.3f} | "
                     f"{fmt(r.get('pallas_ms'))} | {fmt(r.get('xla_ms'))} | {fmt(r.get('speedup'), '.2f')} | "
                     f"{fmt(r.get('pallas_of_floor'), '.0%')} | {fmt(r.get('xla_of_floor'), '.0%')} | "
                     f"{r['check']} |")
    for r in results["rows"]:
        for impl in ("pallas", "xla"):
            if f"{impl}_failed" in r:
                lines.append(f"\n{impl} failed at B{r['batch']} context {r['context']}: {r[f'{impl}_failed']}")
    if results["skipped"]:
        lines.append(f"\nSkipped (budget): {', '.join(results['skipped'])}")
    return "\n".join(lines)


def write(out: str, results: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "paged_decode.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "paged_decode.md"), "w") as f:
        f.write(render(results) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--budget", type=float, default=300.0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    results = run(args)
    print(render(results))


if __name__ == "__main__":
    main()
