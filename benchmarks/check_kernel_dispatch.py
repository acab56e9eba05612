"""GPU check: `lightning_attention(impl="auto")` equals `impl="chunked"` on prefill shapes the model
issues (short prompts, a cached initial state, shapes that are not multiples of the kernel's chunk),
and `generate` runs end to end on `configs/small.yaml` with random weights.

    python benchmarks/check_kernel_dispatch.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, generate


def main() -> None:
    print(f"device: {jax.devices()[0].device_kind}")
    rng = np.random.default_rng(0)
    failures = []
    for b, t, h in [(1, 5, 8), (2, 5, 8), (1, 37, 8), (1, 64, 8), (3, 100, 4), (1, 5, 64), (16, 2048, 8)]:
        q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, 128)) * 0.3, jnp.bfloat16) for _ in range(3))
        slopes = jnp.asarray(2.0 ** (-8.0 * (np.arange(h) + 1) / h), jnp.float32)
        s0 = jnp.asarray(rng.standard_normal((b, h, 128, 128)) * 0.1, jnp.float32)
        try:
            o1, f1 = pallas_kernels.lightning_attention(q, k, v, slopes, initial_state=s0, impl="auto")
        except Exception as e:  # noqa: BLE001 - report every shape, then fail
            failures.append(f"B{b} T{t} H{h}: {str(e).splitlines()[0][:160]}")
            print(f"B{b} T{t} H{h}: FAILED {failures[-1]}")
            continue
        o2, f2 = pallas_kernels.lightning_attention(q, k, v, slopes, initial_state=s0, impl="chunked")
        err = float(jnp.max(jnp.abs(o1.astype(jnp.float32) - o2.astype(jnp.float32))) / jnp.max(jnp.abs(o2.astype(jnp.float32))))
        serr = float(jnp.max(jnp.abs(f1 - f2)) / jnp.max(jnp.abs(f2)))
        print(f"B{b} T{t} H{h}: auto vs chunked max rel err o {err:.2e} state {serr:.2e}")
    if failures:
        raise SystemExit(f"{len(failures)} shape(s) failed")
    cfg = MiniMaxConfig.from_yaml("configs/small.yaml")
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    prompt = jnp.asarray(rng.integers(0, 258, (1, 5)), jnp.int32)
    out = generate(model, prompt, 16, temperature=0.8, top_p=0.95)
    print(f"generate on small.yaml (5-token prompt): {np.asarray(out).tolist()}")


if __name__ == "__main__":
    main()
