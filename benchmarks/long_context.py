"""Long context on one GPU: full training steps of configs/small.yaml at long seq_len, and one long
prompt through the serving engine.

    python3 benchmarks/long_context.py --out $OUT --train 2048x16,32768,131072,524288,1048576 --budget 500
    python3 benchmarks/long_context.py --out $OUT --prefill 1048576,4194304 --budget 500
    python3 benchmarks/long_context.py --out $OUT --ops 2097152,4194304 --budget 200

--train: for each seq_len (batch 1 unless SEQxBATCH, remat from 32,768 tokens, bf16 compute,
    float32 master weights, AdamW), in a
    process of its own (so each peak memory is its own and an out-of-memory error ends only that
    row; XLA may take 95% of the device's memory): one compiled `train_step` on packed rows of documents (mean length seq_len / 8), timed
    over a few steps (median); tokens/s, MFU, peak device memory; then the step split by layer
    kind, from the ops timed alone at the step's shapes (`benchmarks/step_timing.py`): lightning
    attention, softmax attention and the MoE layer (each counted as forward-and-backward, plus a
    second forward with remat), the rest being everything else (projections, norms, loss,
    optimizer).
--prefill: for each prompt length, the width-reduced config of benchmarks/serve.py's long-prompt
    run (hidden 512, 4 heads, 1 KV head, 16 layers) through the engine in one prefill chunk, then
    16 greedy decoded tokens: prefill seconds (to the first token; the prompt's second run, the
    first compiles), ms per decoded token after it, peak memory. Progress lines show each phase
    and each XLA compilation as it ends (the row's "compiles": program name, seconds).
--ops: for each prompt length, the long prefill's attention ops alone at its shapes (one row,
    4 heads of 128, 1 KV head, bf16), each logged as it starts and ends, so a prefill that never
    returns shows which op holds it: the lightning kernel (checked: the second half of its output
    equals the second half run alone from the first half's state, 1e-2 of max |o|) and the softmax
    op as the first prefill chunk calls it (own segment ids; checked on the last 1,024 queries
    against the blockwise XLA form over all keys, 1e-2 of max |o|); seconds of the second call.
Results: one JSON line per row on stdout, all rows in --out/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's name
PREFILL_OVERRIDES = ["hidden_size=512", "num_attention_heads=4", "num_key_value_heads=1",
                     "intermediate_size=512", "max_position_embeddings=4200000"]


def packed_batch(seq_len: int, vocab: int, batch: int, docs: int = 8) -> dict[str, np.ndarray]:
    """Packed rows `[batch, seq_len + 1]`: random tokens in documents of random length (mean
    seq_len / docs; docs 1: one document per row), segment ids counting documents, positions
    restarting at each."""
    rows = [packed_row(seq_len, vocab, seed, docs) for seed in range(batch)]
    return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


def packed_row(seq_len: int, vocab: int, seed: int, docs: int) -> dict[str, np.ndarray]:
    """One row of `packed_batch`."""
    rng = np.random.default_rng(seed)
    n = seq_len + 1
    mean = seq_len // docs
    lengths = rng.integers(mean // 2, mean * 3 // 2, size=64) if docs > 1 else np.array([n])
    seg = np.repeat(np.arange(1, 65), lengths)[:n]
    seg = np.concatenate([seg, np.full(n - len(seg), seg[-1] + 1)]).astype(np.int32)
    starts = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
    pos = np.arange(n) - starts[np.searchsorted(starts, np.arange(n), side="right") - 1]
    tokens = rng.integers(0, vocab, n).astype(np.int32)
    return {"tokens": tokens[None], "segment_ids": seg[None], "positions": pos[None].astype(np.int32)}


def train_row(seq_len: int, batch_size: int, steps: int, docs: int) -> dict:
    """Time one training step of batch_size rows of seq_len (see the module docstring; remat from
    seq_len 32,768 on); runs in its own process."""
    from benchmarks.step_timing import compile_train_step, layer_split, measure_step
    from minimax_jax.training.config import load_train_config

    remat = "true" if seq_len >= 32768 else "false"
    tcfg, mcfg = load_train_config("configs/small.yaml", [f"seq_len={seq_len}", f"batch_size={batch_size}",
                                                          f"model.remat={remat}"])
    batch = packed_batch(seq_len, mcfg.vocab_size, batch_size, docs)
    step, info = compile_train_step(tcfg, mcfg, batch, lambda msg: print(f"seq_len {seq_len}: {msg}", flush=True))
    row = {"seq_len": seq_len, "batch": batch_size, "docs_per_row": docs, "remat": remat == "true", **info,
           **measure_step(step, mcfg, steps)}
    print(f"seq_len {seq_len}: step {row['step_s']:.3f} s, peak {row['peak_gib']:.1f} GiB; timing the ops alone",
          flush=True)
    del step
    reps = 3 if seq_len < 524288 else 1  # the longest rows' ops take tens of seconds
    split = layer_split(mcfg, batch["segment_ids"][:, :-1], row["step_s"], reps)
    row.update(split)
    row["lightning_us_per_token"] = 1e6 * split["lightning_s"] / seq_len
    return row


def prefill_row(n_tokens: int, save, new_tokens: int = 16) -> dict:
    """One n_tokens prompt through the engine in one chunk, then new_tokens greedy tokens.

    Phases, each saved (`save(row)`) as it ends so a run cut short keeps what it measured: a
    16-token request (compiles decode), the prompt once (compiles its prefill bucket; its time
    is an upper bound), the prompt again (the measurement).
    """
    import jax
    from flax import nnx

    from benchmarks.serve import NoEosTokenizer
    from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
    from minimax_jax.serving.engine import Engine, SamplingParams

    t_start = time.perf_counter()
    cfg = MiniMaxConfig.from_yaml("configs/small.yaml", PREFILL_OVERRIDES).replace(param_dtype="bfloat16")
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    engine = Engine(model, NoEosTokenizer(), max_batch=1, max_context=n_tokens + new_tokens + 1,
                    prefill_chunk=n_tokens, prefill_rows=1)
    engine.start()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, n_tokens).tolist()
    row: dict = {"tokens": n_tokens, "cache_gib": sum(x.nbytes for x in jax.tree.leaves(engine.steps.cache)) / 2**30}

    def log(msg: str) -> None:
        print(f"prompt {n_tokens} [{time.perf_counter() - t_start:.0f} s]: {msg}", flush=True)

    def compiled(event: str, seconds: float, **info) -> None:
        """Each XLA compilation as it ends, so a phase that never returns shows whether its
        program compiled (and in how long) or its run is what takes the time."""
        if event == BACKEND_COMPILE_EVENT:
            row.setdefault("compiles", []).append([str(info.get("fun_name", "?")), seconds])
            log(f"compiled {info.get('fun_name', '?')} in {seconds:.1f} s")

    jax.monitoring.register_event_duration_secs_listener(compiled)

    def timed_prompt() -> tuple[float, float, int]:
        """(seconds to the first token, ms per decoded token after it, tokens decoded)."""
        stamps: list[float] = []
        done = threading.Event()

        def collect(out) -> None:
            stamps.extend([time.perf_counter()] * len(out.token_ids))
            if out.finish_reason is not None:
                done.set()

        t0 = time.perf_counter()
        engine.submit(prompt, SamplingParams(max_tokens=new_tokens + 1, temperature=0.0), collect)
        done.wait(3600)
        return (stamps[0] - t0, 1e3 * (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
                len(stamps))

    def memory() -> None:
        row["peak_gib"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30

    try:
        log(f"model and engine built, K/V pages + states {row['cache_gib']:.1f} GiB; a 16-token "
            "request (compiles decode)")
        t0 = time.perf_counter()
        engine.generate(prompt[:16], SamplingParams(max_tokens=2, temperature=0.0), timeout=3600)
        row["short_request_s"] = time.perf_counter() - t0
        log(f"short request {row['short_request_s']:.1f} s; the prompt once (compiles its prefill)")
        first_s, ms, n = timed_prompt()
        row.update(first_prefill_s=first_s, decode_ms_per_token=ms, decoded=n)
        memory()
        save(row)
        log(f"first prefill {first_s:.1f} s (with compilation), {ms:.1f} ms per decoded token; "
            "the prompt again (timed)")
        prefill_s, ms, n = timed_prompt()
        row.update(prefill_s=prefill_s, prefill_tokens_per_s=n_tokens / prefill_s,
                   decode_ms_per_token=ms, decoded=n, compile_s=first_s - prefill_s)
        memory()
        save(row)
        log(f"prefill {prefill_s:.2f} s, {ms:.1f} ms per decoded token")
    finally:
        engine.stop()
    return row


def ops_row(n_tokens: int, save) -> dict:
    """The long prefill's attention ops alone at n_tokens (see --ops), each saved as it ends."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels
    from benchmarks.softmax_attention import rel_err

    h, d, half, tail = 4, 128, n_tokens // 2, 1024
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (1, n_tokens, h, d), jnp.bfloat16) for kk in keys[:3])
    slopes = jnp.asarray([0.9, 0.3, 0.05, 0.01], jnp.float32)
    row: dict = {"tokens": n_tokens}

    def timed(name: str, fn, *args):
        print(f"ops {n_tokens}: {name} started", flush=True)
        out = jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        row[f"{name}_s"] = time.perf_counter() - t0
        print(f"ops {n_tokens}: {name} {row[f'{name}_s']:.3f} s", flush=True)
        return out

    light = jax.jit(lambda q, k, v, s0: pallas_kernels.lightning_attention(
        q, k, v, slopes, initial_state=s0, impl="auto"))
    o, _ = timed("lightning", light, q, k, v, None)
    _, state = light(q[:, :half], k[:, :half], v[:, :half], None)
    o2, _ = light(q[:, half:], k[:, half:], v[:, half:], state)
    row["lightning_error"] = rel_err(o[:, half:], o2)
    save(row)
    kv = k[:, :, :1], v[:, :, :1]
    seg = jnp.zeros((1, n_tokens), jnp.int32)
    soft = jax.jit(lambda q, k, v: pallas_kernels.softmax_attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=jnp.where(seg == 0, 0, -1)))
    o = timed("softmax", soft, q, *kv)
    want = jax.jit(lambda q, k, v: pallas_kernels.softmax_attention(
        q, k, v, q_offset=jnp.full((1,), n_tokens - tail, jnp.int32), impl="xla"))(q[:, -tail:], *kv)
    row["softmax_error"] = rel_err(o[:, -tail:], want)
    print(f"ops {n_tokens}: errors lightning {row['lightning_error']:.2e}, softmax {row['softmax_error']:.2e}",
          flush=True)
    return row


def run_child(kind: str, size: str, out: str, timeout: float, steps: int, docs: int) -> dict:
    """Run one row in a fresh process; its result, or the error it ended with."""
    from benchmarks.step_timing import run_child as run_process

    rows_dir = tempfile.mkdtemp()
    row = run_process(os.path.abspath(__file__), ["--child", kind, size, "--out", rows_dir, "--steps", str(steps),
                                                  "--docs", str(docs)],
                      os.path.join(rows_dir, f"long_{kind}_{size}.json"), timeout)
    return {"kind": kind, "size": size, **row}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--train", default="", help="comma-separated seq_lens, SEQxBATCH for batch > 1")
    p.add_argument("--prefill", default="", help="comma-separated prompt lengths")
    p.add_argument("--ops", default="", help="comma-separated prompt lengths: the prefill's attention ops alone")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--docs", type=int, default=8, help="documents per training row (mean)")
    p.add_argument("--budget", type=float, default=540, help="seconds for all rows")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        # one process per row: let it use the device's memory, not XLA's default 75%
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        kind, size = args.child[0], args.child[1]

        def save(row: dict) -> None:
            with open(os.path.join(args.out, f"long_{kind}_{size}.json"), "w") as f:
                json.dump(row, f, indent=1)

        if kind == "train":
            seq_len, _, batch = size.partition("x")
            row = train_row(int(seq_len), int(batch or 1), args.steps, args.docs)
        elif kind == "ops":
            row = ops_row(int(size), save)
        else:
            row = prefill_row(int(size), save)
        save(row)
        print(json.dumps(row), flush=True)
        return
    import jax
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    deadline = time.time() + args.budget
    rows = []
    for kind, sizes in (("train", args.train), ("ops", args.ops), ("prefill", args.prefill)):
        for size in [s for s in sizes.split(",") if s]:
            left = deadline - time.time()
            if left < 30:
                print(f"skipped {kind} {size}: budget spent", flush=True)
                continue
            rows.append(run_child(kind, size, args.out, left, args.steps, args.docs))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "long_context.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
