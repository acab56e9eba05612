"""Time the serving engine: time to first token and decode tokens/s at several batch sizes, and
the same for Hugging Face transformers' `generate` on the same weights (exported to HF).

    python benchmarks/serve.py --config configs/small.yaml --batches 1 8 64 --hf --out results.json
    python benchmarks/serve.py --config configs/small.yaml --override hidden_size=512 ... \
        --long-prompt 1048576 --prefill-chunk 8192      # one long prefill: seconds, peak memory
    python benchmarks/serve.py --config configs/small.yaml --prefix-ttft 4096   # prefix cache: cold / cached
    python benchmarks/serve.py --config configs/small.yaml --quantize int8      # int8 expert/attention weights

Random weights in the config's compute dtype, as `load_model` gives them to the server (the speed
does not depend on their values), random prompt ids, greedy, no EOS (every
request generates exactly --new-tokens). Per batch size b, b requests arrive at once:
- engine TTFT: mean and max over requests of (first token - submission), one engine of b slots;
- engine decode tokens/s: tokens produced after the last request's first token, over that time;
- engine decode step: b / decode tokens/s (one token for every slot), beside the bytes such a step
  must move at the mean context (prompt + new_tokens / 2) and the floor time that takes at the
  device's copy bandwidth (measured, or --bandwidth-gbs): the weights it reads (the experts
  b tokens route to, expected under uniform routing; b rows of the embedding), the float32
  lightning states (read and written) and the K/V it attends to;
- HF TTFT: `generate(max_new_tokens=1)` on the [b, prompt] batch (best of 3); HF decode tokens/s:
  b * (new_tokens - 1) / (t(new_tokens) - t(1)). transformers' native MiniMax rotates the whole
  head (ignores rotary_dim), a negligible difference in work.
--quantize int8 | fp8: the engine's model with its expert and attention weights quantized
(`quant.quantize_model`; the bytes read per step count them at their stored size).
--profile DIR: after each batch size's timed round, one more round traced: the decode loop's ops
(by layer kind, op class and source line, from its HLO dumped into DIR/hlo) and the other
programs' kernels by name, their time and count, device time against wall time.
--prefix-ttft N: instead, TTFT of one request whose prompt is an N-token shared prefix and 16
tokens of its own, on an engine with the prefix cache on: cold (the prefix not cached) and
cached (a second request with the same prefix and other 16 tokens), medians of --repeats
distinct prefixes, after one warm-up pair that compiles every prefill bucket the pair meets.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.trace import MODEL_LAYER_FILES, no_command_buffers, profile, render  # noqa: E402
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, quant  # noqa: E402
from minimax_jax.cache import init_cache  # noqa: E402
from minimax_jax.serving.engine import Engine, Output, SamplingParams  # noqa: E402
from minimax_jax.tokenizer import ByteTokenizer  # noqa: E402


DECODE_MODULE = "jit_decode_loop"  # the engine's multi-token decode program (serving/steps.py)


class NoEosTokenizer(ByteTokenizer):
    """Byte tokenizer whose EOS never matches, so every request runs to max_tokens."""

    eos_token_id = -1


def engine_round(engine: Engine, prompts: np.ndarray, new_tokens: int) -> dict:
    """Submit every prompt at once; returns TTFT (mean, max) and aggregate decode tokens/s."""
    b = len(prompts)
    times: list[list[float]] = [[] for _ in range(b)]
    done = threading.Semaphore(0)

    def collector(i: int):
        def collect(out: Output) -> None:
            times[i].extend([time.perf_counter()] * len(out.token_ids))
            if out.finish_reason is not None:
                done.release()
        return collect

    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(p.tolist(), SamplingParams(max_tokens=new_tokens, temperature=0.0), collector(i))
    for _ in range(b):
        done.acquire()
    ttft = [t[0] - start for t in times]
    window_start, end = max(t[0] for t in times), max(t[-1] for t in times)
    decoded = sum(sum(1 for x in t if x > window_start) for t in times)
    return {"ttft_mean_s": float(np.mean(ttft)), "ttft_max_s": float(np.max(ttft)),
            "decode_tokens_per_s": decoded / max(end - window_start, 1e-9),
            "tokens": sum(map(len, times))}


def decode_step_bytes(model, batch: int, context: int) -> dict:
    """Bytes one decode step (a token for each of `batch` slots holding `context` tokens) must
    move: weights read (all but the experts, b embedding rows, and the experts b tokens are
    expected to route to under uniform top-k routing), lightning states (float32, read and
    written), K/V read. Returns those three and their sum (bytes, floats)."""
    import jax

    cfg = model.config
    experts = other = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        name, n = jax.tree_util.keystr(path), x.size * x.dtype.itemsize
        if "block_sparse_moe" in name and "gate" not in name:
            experts += n
        else:
            other += n * batch / cfg.vocab_size if "embed_tokens" in name else n
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    weights = other + experts * (1 - (1 - k / e) ** batch)  # expected share of experts touched
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context))
    states = 2 * cache.lightning_state.size * cache.lightning_state.dtype.itemsize
    kv = (cache.key.size + cache.value.size) * cache.key.dtype.itemsize
    return {"weights": weights, "lightning_states": float(states), "kv": float(kv),
            "total": weights + states + kv}


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 10) -> float:
    """The device's copy bandwidth in bytes/s: a jitted elementwise op over `nbytes` of float32
    (read once, written once), best of `repeats`."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    op = jax.jit(lambda x: x + 1)
    op(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        op(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def bench_engine(model, batches, prompt_len, new_tokens, chunk, prefill_rows, decode_steps, bandwidth,
                 seed=0, profile_dir: str | None = None) -> dict:
    """Per batch size: TTFT, decode tokens/s, the step against its bandwidth floor (module
    docstring); profile_dir: then a trace of one more round there (`benchmarks/trace.py`: the
    decode loop's ops attributed from the HLO XLA dumped into profile_dir/hlo, other programs'
    kernels by name), its summary in the batch's "profile"."""
    rng = np.random.default_rng(seed)
    results = {}
    for b in batches:
        engine = Engine(model, NoEosTokenizer(), max_batch=b, max_context=prompt_len + new_tokens,
                        prefill_chunk=chunk, prefill_rows=prefill_rows, decode_steps=decode_steps)
        engine.start()
        prompts = rng.integers(0, model.config.vocab_size, (b, prompt_len))
        t0 = time.perf_counter()
        engine_round(engine, prompts, 2)  # compile
        compile_s = time.perf_counter() - t0
        results[b] = {**engine_round(engine, prompts, new_tokens), "compile_s": compile_s}
        if profile_dir:  # the decode loop's HLO, dumped by XLA when this batch size compiled it
            dumps = glob.glob(os.path.join(profile_dir, "hlo", f"*{DECODE_MODULE}*after_optimizations.txt"))
            hlo = open(max(dumps, key=os.path.getmtime)).read() if dumps else ""
            results[b]["profile"] = profile(lambda: engine_round(engine, prompts, new_tokens), hlo,
                                            os.path.join(profile_dir, f"round_b{b}"), 1, MODEL_LAYER_FILES)
            print(f"engine b={b}, one round of {b} x {new_tokens} tokens traced:\n"
                  + "\n".join(render(results[b]["profile"], f"b={b}, one round")), flush=True)
        engine.stop()
        moved = decode_step_bytes(model, b, prompt_len + new_tokens // 2)
        step_ms = 1e3 * b / results[b]["decode_tokens_per_s"]
        floor_ms = 1e3 * moved["total"] / bandwidth
        results[b].update(step_ms=step_ms, step_bytes=moved, floor_ms=floor_ms,
                          floor_fraction=floor_ms / step_ms)
        print(f"engine b={b}: {results[b]}", flush=True)
    print(f"{'batch':>6} {'step ms':>9} {'GB moved':>9} {'floor ms':>9} {'of floor':>9}"
          f"   (at {bandwidth / 1e9:.0f} GB/s)")
    for b, r in results.items():
        print(f"{b:>6} {r['step_ms']:>9.3f} {r['step_bytes']['total'] / 1e9:>9.3f} {r['floor_ms']:>9.3f} "
              f"{100 * r['floor_fraction']:>8.1f}%", flush=True)
    return results


def bench_long_prefill(model, n_tokens: int, chunk: int, seed: int = 0) -> dict:
    """Prefill one prompt of n_tokens (chunked) and sample a token: seconds and peak device memory."""
    import jax

    engine = Engine(model, NoEosTokenizer(), max_batch=1, max_context=n_tokens + 1, prefill_chunk=chunk,
                    prefill_rows=1)
    engine.start()
    prompt = np.random.default_rng(seed).integers(0, model.config.vocab_size, n_tokens)
    t0 = time.perf_counter()
    engine.generate(prompt[:chunk].tolist(), SamplingParams(max_tokens=1, temperature=0.0))  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = engine.generate(prompt.tolist(), SamplingParams(max_tokens=1, temperature=0.0), timeout=3600)
    seconds = time.perf_counter() - t0
    engine.stop()
    stats = jax.devices()[0].memory_stats() or {}
    result = {"tokens": n_tokens, "chunk": chunk, "seconds": seconds, "tokens_per_s": n_tokens / seconds,
              "compile_s": compile_s, "finish_reason": out.finish_reason,
              "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
              "cache_gib": sum(x.nbytes for x in jax.tree.leaves(engine.steps.cache)) / 2**30}
    print(f"long prefill: {result}", flush=True)
    return result


def bench_prefix_ttft(model, prefix_len: int, chunk: int, repeats: int, seed: int = 0) -> dict:
    """TTFT of a prompt of `prefix_len` shared tokens + 16 of its own: the prefix cold, then cached."""
    suffix = 16
    engine = Engine(model, NoEosTokenizer(), max_batch=1, max_context=prefix_len + suffix + 2,
                    prefill_chunk=chunk, prefill_rows=1, prefix_cache_slots=4)
    engine.start()
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(prompt: np.ndarray) -> float:
        t0 = time.perf_counter()
        engine.generate(prompt.tolist(), params, timeout=3600)
        return time.perf_counter() - t0

    def pair() -> tuple[float, float]:
        prefix = rng.integers(0, model.config.vocab_size, prefix_len)
        own = rng.integers(0, model.config.vocab_size, (2, suffix))
        return ttft(np.concatenate([prefix, own[0]])), ttft(np.concatenate([prefix, own[1]]))

    warm = pair()  # compiles the buckets both requests meet
    cold, cached = zip(*(pair() for _ in range(repeats)))
    engine.stop()
    result = {"prefix_tokens": prefix_len, "own_tokens": suffix, "chunk": chunk, "warmup_s": list(warm),
              "cold_ttft_s": float(np.median(cold)), "cached_ttft_s": float(np.median(cached)),
              "speedup": float(np.median(cold) / np.median(cached)),
              "prefix_hits": engine.metrics.prefix_hits, "prefix_misses": engine.metrics.prefix_misses,
              "prefix_hit_tokens": engine.metrics.prefix_hit_tokens}
    print(f"prefix TTFT: {result}", flush=True)
    return result


def bench_hf(model, batches, prompt_len, new_tokens, seed=0) -> dict:
    import torch
    import transformers

    from minimax_jax.checkpoint import save_model
    from minimax_jax.convert import orbax_to_hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if model.config.dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, f"{tmp}/ckpt")
        orbax_to_hf(f"{tmp}/ckpt", f"{tmp}/hf", dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                    progress=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", dtype=dtype).to(device).eval()
    rng = np.random.default_rng(seed)
    results = {}

    def timed(ids, n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for b in batches:
        ids = torch.as_tensor(rng.integers(0, model.config.vocab_size, (b, prompt_len)), device=device)
        timed(ids, 2)  # warm up
        first = min(timed(ids, 1) for _ in range(3))
        full = min(timed(ids, new_tokens) for _ in range(2))
        results[b] = {"ttft_s": first, "decode_tokens_per_s": b * (new_tokens - 1) / max(full - first, 1e-9)}
        print(f"hf b={b}: {results[b]}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/small.yaml")
    p.add_argument("--override", nargs="*", default=[], help="config key=value overrides")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--prefill-rows", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=8, help="decode tokens per slot per dispatch")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the floor times (default: measured copy bandwidth)")
    p.add_argument("--hf", action="store_true", help="also time transformers' generate")
    p.add_argument("--long-prompt", type=int, default=0,
                   help="instead: prefill one prompt of this many tokens; time and peak memory")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="quantize the expert and attention weights of the engine's model")
    p.add_argument("--prefix-ttft", type=int, default=0,
                   help="instead: TTFT of a prompt with this many shared prefix tokens, cold and cached")
    p.add_argument("--repeats", type=int, default=3, help="prefixes timed by --prefix-ttft")
    p.add_argument("--profile", metavar="DIR", help="trace one more round per batch size into DIR (the run's "
                   "XLA command buffers off, all timings without them)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.hf and args.quantize:
        p.error("--hf times transformers on the bf16 weights: run it without --quantize")
    if args.profile:  # read when the backend starts, below
        os.environ.update(no_command_buffers(os.environ, f"--xla_dump_to={os.path.join(args.profile, 'hlo')}",
                                             "--xla_dump_hlo_as_text", f"--xla_dump_hlo_module_re={DECODE_MODULE}"))

    import jax

    cfg = MiniMaxConfig.from_yaml(args.config, args.override)
    cfg = cfg.replace(param_dtype=cfg.dtype)  # as served: load_model keeps the weights in the compute dtype
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    if args.quantize:
        quant.quantize_model(model, args.quantize)
    if args.long_prompt or args.prefix_ttft:
        results = {"device": str(jax.devices()[0].device_kind), "config": args.config,
                   "overrides": args.override, "quantize": args.quantize}
        if args.long_prompt:
            results["long_prefill"] = bench_long_prefill(model, args.long_prompt, args.prefill_chunk)
        else:
            results["prefix_ttft"] = bench_prefix_ttft(model, args.prefix_ttft, args.prefill_chunk, args.repeats)
        print(json.dumps(results, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        return
    bandwidth = copy_bandwidth() if args.bandwidth_gbs is None else args.bandwidth_gbs * 1e9
    results = {"device": str(jax.devices()[0].device_kind), "config": args.config, "overrides": args.override,
               "quantize": args.quantize, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "decode_steps": args.decode_steps,
               "bandwidth_bytes_per_s": bandwidth,
               "engine": bench_engine(model, args.batches, args.prompt_len, args.new_tokens,
                                      args.prefill_chunk, args.prefill_rows, args.decode_steps, bandwidth,
                                      profile_dir=args.profile)}
    if args.hf:
        results["hf"] = bench_hf(model, args.batches, args.prompt_len, args.new_tokens)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
