"""Time the whole lightning-attention layer of MiniMax-Text-01 on one GPU, and where its time goes.

Run on the device machine from the repository root:

    python benchmarks/lightning_layer.py --out $OUT

For each shape (D 6144, 64 heads of 128, bf16) and each kernel path ("pallas", "chunked"), the
median ms of `LightningAttention` forward and forward+backward, split into: the projections alone
(qkv_proj, output_gate, out_proj einsums), the attention op alone (`lightning_attention`), and the
rest (SiLU, RMSNorm, sigmoid gate and their gradients: the passes a fused kernel would remove).
Prints a markdown table and writes OUT/lightning_layer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.lightning_attention import bench, minimax_slopes  # noqa: E402
from minimax_jax.config import MiniMaxConfig  # noqa: E402
from minimax_jax.lightning import LightningAttention  # noqa: E402
from pallas_kernels import lightning_attention  # noqa: E402

SHAPES = [(1, 4096), (1, 16384), (4, 8192)]
D, H, K = 6144, 64, 128


def layer_fns(b: int, t: int, impl: str):
    """jitted (forward, forward+backward) of the layer, its projections and its attention op."""
    cfg = MiniMaxConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=H, head_dim=K,
                        dtype="bfloat16", param_dtype="bfloat16", lightning_impl=impl)
    layer = LightningAttention(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    slopes = jnp.asarray(minimax_slopes(H))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, t, D)), jnp.bfloat16)
    qkv = tuple(jnp.asarray(rng.normal(size=(b, t, H, K)) * 0.5, jnp.bfloat16) for _ in range(3))

    def full(params, x):
        return nnx.merge(graphdef, params)(x, slopes=slopes)[0]

    def projections(params, x):
        p = nnx.merge(graphdef, params)
        qkv = jnp.einsum("btd,dhjk->bthjk", x, p.qkv_proj[...])
        gate = jnp.einsum("btd,dhk->bthk", x, p.output_gate[...])
        return jnp.einsum("bthk,hkd->btd", qkv[..., 0, :] * gate, p.out_proj[...])

    def op(q, k, v):
        return lightning_attention(q, k, v, slopes, impl=impl)[0]

    def fwd_bwd(f):
        def run(*args):
            out, vjp = jax.vjp(f, *args)
            return vjp(jnp.ones_like(out))
        return jax.jit(run)

    return {
        "layer": (jax.jit(full), fwd_bwd(full), (params, x)),
        "projections": (jax.jit(projections), fwd_bwd(projections), (params, x)),
        "op": (jax.jit(op), fwd_bwd(op), qkv),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    rows = []
    for b, t in SHAPES:
        for impl in ("pallas", "chunked"):
            row = {"shape": f"B{b} T{t} H{H}", "impl": impl}
            for name, (fwd, both, fn_args) in layer_fns(b, t, impl).items():
                row[f"{name}_fwd"] = bench(fwd, *fn_args, iters=5, repeats=5)
                row[f"{name}_fwd+bwd"] = bench(both, *fn_args, iters=5, repeats=5)
            for mode in ("fwd", "fwd+bwd"):
                row[f"rest_{mode}"] = (row[f"layer_{mode}"] - row[f"projections_{mode}"]
                                       - row[f"op_{mode}"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "lightning_layer.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows},
                  f, indent=1)
    print("| shape | kernel | pass | layer ms | projections ms | attention op ms | rest ms "
          "(SiLU, norm, gate) | rest / layer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode in ("fwd", "fwd+bwd"):
            print(f"| {r['shape']} | {r['impl']} | {mode} | {r[f'layer_{mode}']:.3f} | "
                  f"{r[f'projections_{mode}']:.3f} | {r[f'op_{mode}']:.3f} | "
                  f"{r[f'rest_{mode}']:.3f} | {r[f'rest_{mode}'] / r[f'layer_{mode}']:.2f} |")


if __name__ == "__main__":
    main()
