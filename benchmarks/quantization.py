"""Quality and memory of int8 / fp8 weights against bfloat16, and MiniMax-Text-01's memory per GPU
at int8 on paper.

    python benchmarks/quantization.py [--model runs/tiny/model] [--sample-tokens 1024] [--out results.json]
    python benchmarks/quantization.py --paper [--config configs/minimax-text-01.yaml] [--context 1048576] [--gpus 8]

Quality (default): the model `python train.py --config configs/tiny.yaml` writes (runs/tiny/model),
loaded as float32, bfloat16, bfloat16 with int8 weights and bfloat16 with fp8 weights
(`load_model(..., quantize=...)`). For each: the validation loss on the training run's own
validation batches (its config's seq_len, batch_size, eval_batches, val_fraction and seed over the
default corpus, as `train.py` evaluates it), the bytes of its params, and the greedy-token
agreement with bfloat16: the share of positions where the model's greedy (argmax) next token is
bfloat16's, over every position of those validation batches and over a long sample, bfloat16's
own continuation of a validation document (--sample-tokens tokens sampled at temperature 0.8,
top_p 0.95, seed 0, as `train.py` samples; a greedy continuation of this small model soon
repeats one token, which would make the agreement trivial).

--paper: `jax.eval_shape` of the config quantized to int8 and of a one-sequence cache of
--context tokens, split over --gpus GPUs (experts, heads, vocab, K/V heads and lightning heads
evenly; activations not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, generate, load_model, quant  # noqa: E402
from minimax_jax.cache import init_cache  # noqa: E402
from minimax_jax.tokenizer import load_tokenizer  # noqa: E402
from minimax_jax.training.config import load_train_config  # noqa: E402
from minimax_jax.training.data import DataPipeline, find_files  # noqa: E402
from minimax_jax.training.loop import evaluate  # noqa: E402
from minimax_jax.training.step import split_batch  # noqa: E402

GIB = 1 << 30
H200_GIB = 143_771 / 1024  # memory of one H200 as the driver reports it (143,771 MiB)
VARIANTS = {"bfloat16": ("bfloat16", None), "float32": ("float32", None),
            "int8": ("bfloat16", "int8"), "fp8": ("bfloat16", "fp8")}  # bfloat16 first: the reference


def param_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of `model`'s params: {"quantized": values, "scales": their scales, "other": the rest}."""
    out = {"quantized": 0, "scales": 0, "other": 0}
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        kind = "other"
        if len(path) > 1 and path[-2] in quant.CONTRACTED:
            kind = "quantized" if path[-1] == quant.WEIGHT else "scales"
        out[kind] += math.prod(v.shape) * np.dtype(v.dtype).itemsize
    return out


def quality(model_dir: Path, train_config: Path, sample_tokens: int) -> list[dict]:
    """One row per variant of VARIANTS (see the module docstring)."""
    tcfg, _ = load_train_config(train_config)
    tokenizer = load_tokenizer(model_dir)
    data = DataPipeline(find_files(tcfg.data), tokenizer, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size,
                        val_fraction=tcfg.val_fraction, seed=tcfg.seed)
    batches = data.validation(tcfg.eval_batches)
    prompt = jnp.asarray(batches[0]["tokens"][:1, :64], jnp.int32)
    rows, sample, reference = [], None, {}
    for name, (dtype, mode) in VARIANTS.items():
        model = load_model(model_dir, dtype=dtype, quantize=mode)
        graphdef, params = nnx.split(model)
        row = {"variant": name, "val_loss": evaluate(params, graphdef, batches), **param_bytes(model)}
        if name == "bfloat16":
            new = generate(model, prompt, sample_tokens, temperature=0.8, top_p=0.95, seed=0)
            sample = jnp.concatenate([prompt, new[:, :-1]], axis=1)
            print("sample:", repr(tokenizer.decode([int(t) for t in np.asarray(new[0, :300])])), file=sys.stderr)
        choices = {"val": np.concatenate([greedy(model, b) for b in batches]),
                   "sample": np.asarray(jnp.argmax(model(sample), axis=-1))[0, prompt.shape[1] - 1:]}
        for key, choice in choices.items():
            reference.setdefault(key, choice)
            row[f"{key}_agreement"] = float(np.mean(choice == reference[key]))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def greedy(model: MiniMaxForCausalLM, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The model's argmax next token at every input position of a training-format batch
    (int32 `[B, T + 1]` rows: tokens, segment ids, positions), flattened."""
    b = {k: jnp.asarray(v) for k, v in split_batch(batch).items()}
    logits = model(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])
    return np.asarray(jnp.argmax(logits, axis=-1)).reshape(-1)


def quality_table(rows: list[dict], sample_tokens: int) -> str:
    """The markdown table of `quality`'s rows (loss change and agreement against bfloat16)."""
    base = next(r["val_loss"] for r in rows if r["variant"] == "bfloat16")
    lines = ["| weights | val loss (nats/token) | vs bf16 | params KiB (quantized + scales + other) | "
             f"greedy agreement with bf16: validation tokens | on a {sample_tokens}-token sample |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        total = r["quantized"] + r["scales"] + r["other"]
        split = f"{total / 1024:.0f} ({r['quantized'] / 1024:.0f} + {r['scales'] / 1024:.1f} + {r['other'] / 1024:.0f})"
        lines.append(f"| {r['variant']} | {r['val_loss']:.4f} | {(r['val_loss'] / base - 1):+.2%} | {split} | "
                     f"{r['val_agreement']:.2%} | {r['sample_agreement']:.2%} |")
    return "\n".join(lines)


def paper(config: Path, context: int, gpus: int) -> dict:
    """Bytes of MiniMax-Text-01's params (bf16, and int8 projections) and of one `context`-token
    cache, from `jax.eval_shape`, in total and per GPU of `gpus`."""
    cfg = MiniMaxConfig.from_yaml(config, ["param_dtype=bfloat16"])
    create = lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    out = {"bf16": param_bytes(nnx.eval_shape(create)),
           "int8": param_bytes(nnx.eval_shape(lambda: quant.quantize_model(create(), "int8")))}
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, context))
    kv = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in (cache.key, cache.value))
    states = math.prod(cache.lightning_state.shape) * np.dtype(cache.lightning_state.dtype).itemsize
    return {"params_bf16": sum(out["bf16"].values()), "params_int8": sum(out["int8"].values()),
            "int8_split": out["int8"], "kv": kv, "lightning_states": states,
            "kv_shape": list(cache.key.shape), "state_shape": list(cache.lightning_state.shape),
            "context": context, "gpus": gpus}


def paper_table(p: dict) -> str:
    """The markdown table of `paper`'s numbers, per GPU, against an H200's memory."""
    g = p["gpus"]
    seq = (p["kv"] + p["lightning_states"]) / g

    def row(name: str, params: int) -> str:
        used = params / g + seq
        free = H200_GIB * GIB - params / g
        return (f"| {name} | {params / GIB:.1f} | {params / g / GIB:.1f} | {p['kv'] / g / GIB:.2f} | "
                f"{p['lightning_states'] / g / GIB:.3f} | {used / GIB:.1f} | "
                f"{'yes' if used <= H200_GIB * GIB else 'no'} ({H200_GIB:.1f} GiB) | {int(free // seq)} |")

    return "\n".join([
        f"| weights | params GiB (all) | params GiB / GPU | K/V GiB / GPU ({p['context']:,} tokens) | "
        "lightning states GiB / GPU | total GiB / GPU | fits one H200 | sequences of that length that fit |",
        "|---|---|---|---|---|---|---|---|",
        row("bf16", p["params_bf16"]), row("int8 projections", p["params_int8"])])


def main(argv: list[str] | None = None) -> int:
    """Run the quality comparison (or --paper) and print its markdown table."""
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=root / "runs/tiny/model")
    ap.add_argument("--train-config", type=Path, default=root / "configs/tiny.yaml",
                    help="the training config of --model (its validation batches)")
    ap.add_argument("--sample-tokens", type=int, default=1024)
    ap.add_argument("--paper", action="store_true", help="MiniMax-Text-01's memory per GPU at int8 instead")
    ap.add_argument("--config", type=Path, default=root / "configs/minimax-text-01.yaml")
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    if args.paper:
        result = paper(args.config, args.context, args.gpus)
        print(paper_table(result))
    else:
        if not args.model.is_dir():
            print(f"error: no model at {args.model}; train it with `python train.py --config configs/tiny.yaml` "
                  f"or pass --model DIR", file=sys.stderr)
            return 1
        result = quality(args.model, args.train_config, args.sample_tokens)
        print(quality_table(result, args.sample_tokens))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
