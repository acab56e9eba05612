"""What evaluation clients see from the server: lm-eval loglikelihood requests/s and the time to
first token of 5-, 256- and 4,096-token prompts, with the prefill length buckets and without them
(every prefill step padded to the full prefill chunk, as before the buckets existed).

    python benchmarks/serve_clients.py                    # the main job's model (runs/tiny/model)
    python benchmarks/serve_clients.py --config configs/small.yaml --dtype bfloat16    # on a GPU

The model is `--checkpoint` when it exists, else a model of `--config` with random weights in
--dtype, as `load_model` would hold them (the speed does not depend on their values). The
server is `serve.py`'s (same defaults: 8 slots, prefill chunk 256 of 4 rows, decode 8 tokens
per dispatch, prefix cache on), served over HTTP on this host. TTFT is measured by a streaming
`/v1/completions` request of token ids (distinct random prompts, so the prefix cache never hits),
from sending the request to its first streamed token; medians of `--repeats`. The lm-eval run is
`local-completions` over a generated multiple-choice task of `--questions` questions of 4
choices each (4 loglikelihood requests per question), run twice: the first run pays for
compiling the prefill that scores prompts (once per length bucket it meets), the second is the
throughput quoted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, load_model  # noqa: E402
from minimax_jax.serving.server import BackgroundServer, build  # noqa: E402
from minimax_jax.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

MODEL = "bench"


def ttft(url: str, prompt: list[int]) -> float:
    """Seconds from sending a streaming completion of `prompt` to its first streamed token."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"a {len(prompt)}-token prompt got {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def time_to_first_token(served, url: str, lengths: list[int], repeats: int, rng: np.random.Generator,
                        vocab: int) -> dict[str, dict[int, float]]:
    """Median TTFT per prompt length, with the engine's length buckets and with the full chunk only."""
    out: dict[str, dict[int, float]] = {}
    buckets = served.engine.buckets
    for name, use in (("one bucket (chunk)", (served.engine.chunk,)), ("length buckets", buckets)):
        served.engine.buckets = use  # every bucket's prefill was compiled in the server's warm-up
        out[name] = {}
        for n in lengths:
            ttft(url, rng.integers(1, vocab, n).tolist())  # first request of a length: page reuse warm
            times = [ttft(url, rng.integers(1, vocab, n).tolist()) for _ in range(repeats)]
            out[name][n] = statistics.median(times)
            print(f"  {name:>20}: prompt {n:5d} tokens: TTFT median {out[name][n] * 1e3:8.1f} ms "
                  f"(of {repeats})", flush=True)
    served.engine.buckets = buckets
    return out


def write_task(directory: Path, questions: int, rng: np.random.Generator) -> None:
    """A multiple-choice task of `questions` generated questions (4 choices each) for lm-eval."""
    words = "the of and to in is that for it as with was on by at an be this from or".split()
    with open(directory / "mc.jsonl", "w") as f:
        for _ in range(questions):
            q = " ".join(rng.choice(words, 24))
            choices = [" " + " ".join(rng.choice(words, 4)) for _ in range(4)]
            f.write(json.dumps({"question": q, "choices": choices, "answer": 0}) + "\n")
    (directory / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")


def loglikelihood_rate(url: str, tokenizer_dir: Path, questions: int, concurrent: int,
                       rng: np.random.Generator) -> dict[str, float]:
    """lm-eval local-completions over the generated task: requests, seconds, requests/s."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as d:
        write_task(Path(d), questions, rng)
        args = (f"model={MODEL},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tokenizer_dir},num_concurrent={concurrent},max_retries=1,max_length=1024")
        start = time.perf_counter()
        lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["bench_mc"],
                                task_manager=TaskManager(include_path=d))
        seconds = time.perf_counter() - start
    requests = 4 * questions
    print(f"  lm-eval: {requests} loglikelihood requests in {seconds:.1f} s: {requests / seconds:.1f} "
          f"requests/s ({concurrent} concurrent)", flush=True)
    return {"requests": requests, "seconds": seconds, "requests_per_s": requests / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs/tiny/model")
    p.add_argument("--config", default="configs/tiny.yaml", help="model when --checkpoint is absent")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", default="5,256,4096")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--questions", type=int, default=50)
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    rng = np.random.default_rng(0)
    if args.checkpoint.exists():
        model, tokenizer, source = load_model(args.checkpoint, dtype=args.dtype), load_tokenizer(args.checkpoint), str(args.checkpoint)
    else:
        cfg = MiniMaxConfig.from_yaml(ROOT / args.config).replace(dtype=args.dtype, param_dtype=args.dtype)
        model, tokenizer, source = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), f"{args.config} (random weights)"
    print(f"serving {source} on {jax.devices()[0].device_kind}; building the engine and compiling its steps",
          flush=True)
    max_context = min(max(2048, 2 * max(lengths)), model.config.max_position_embeddings)
    fitted = [min(n, max_context - 3) for n in lengths]  # room for the BOS and the 2 tokens generated
    for n, m in zip(lengths, fitted):
        if m != n:
            print(f"a {n}-token prompt is timed as {m} tokens: the model's max_position_embeddings is "
                  f"{model.config.max_position_embeddings}", flush=True)
    served = build(model, tokenizer, model_name=MODEL, max_context=max_context, decode_steps=8,
                   prefix_cache_slots=32)
    server = BackgroundServer(served.app)
    try:
        vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        print("time to first token:", flush=True)
        result = {"model": source, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "date": time.strftime("%Y-%m-%d"),
                  "ttft_s": time_to_first_token(served, server.url, fitted, args.repeats, rng, vocab)}
        with tempfile.TemporaryDirectory() as d:
            tokenizer.save(Path(d))
            print("lm-eval loglikelihood throughput (a first run compiles the scoring prefills):", flush=True)
            result["lm_eval_first_run"] = loglikelihood_rate(server.url, Path(d), args.questions,
                                                             args.concurrent, rng)
            result["lm_eval"] = loglikelihood_rate(server.url, Path(d), args.questions, args.concurrent, rng)
    finally:
        server.stop()
        served.close()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
