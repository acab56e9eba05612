"""Time the fla-core peer (PyTorch/Triton) at the lightning_attention benchmark shapes.

Run in its own process by benchmarks/lightning_attention.py; prints one JSON line last.
"""

from __future__ import annotations

import json

import torch
import triton
from fla.ops.simple_gla import chunk_simple_gla

SHAPES = [(1, 4096, 64), (1, 16384, 64), (1, 65536, 8), (4, 8192, 16), (1, 262144, 8)]
D = 128


def main() -> None:
    out = {"fla": __import__("fla").__version__, "torch": torch.__version__, "rows": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, t, h in SHAPES:
        q, k, v, do = (
            torch.randn(b, t, h, D, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.5
            for _ in range(4)
        )
        slopes = 2.0 ** (-8.0 * (torch.arange(h, device="cuda", dtype=torch.float32) + 1) / h)
        g_gamma = -slopes
        fwd = lambda: chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

        def fwd_bwd():
            o = chunk_simple_gla(qg, kg, vg, g_gamma=g_gamma, scale=1.0)[0]
            torch.autograd.grad(o, (qg, kg, vg), do)

        row = {
            "shape": f"B{b} T{t} H{h}",
            "fla_fwd": triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median"),
            "fla_fwdbwd": triton.testing.do_bench(
                fwd_bwd, warmup=50, rep=300, return_mode="median"
            ),
        }
        out["rows"].append(row)
        print(row, flush=True)
        del q, k, v, do, qg, kg, vg
        torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
