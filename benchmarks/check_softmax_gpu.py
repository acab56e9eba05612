"""GPU correctness of the softmax op's cuDNN paths with several rows, and of the training step.

    python3 benchmarks/check_softmax_gpu.py [--ops]   (--ops: the op checks only)

1. impl="auto" (cuDNN, packed segments) against impl="xla" at B 1 / 2 / 4 with different
   document boundaries per row, and the packed form run as 2 and 8 head groups: output and
   gradients, max |error| / max |xla|, bf16.
2. One training step of configs/small.yaml (seq_len 2048, batch 4, packed documents) with every op
   on "auto" and with every op on its XLA form: losses finite and equal within bf16 tolerance.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import softmax_attention, softmax_cudnn  # noqa: E402


def op_check(b: int, t: int = 2048, h: int = 8, n: int = 2, d: int = 128,
             head_groups: int = 0) -> float:
    """Max relative error of impl="auto" (head_groups 0) or of the packed cuDNN form in that many
    head groups, against impl="xla"."""
    rng = np.random.default_rng(b)
    seg = np.stack([np.repeat(np.arange(40), rng.integers(1, t // 4, 40))[:t] for _ in range(b)])
    seg = jnp.asarray(seg, jnp.int32)
    keys = jax.random.split(jax.random.key(b), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, n, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, n, d), jnp.bfloat16)
    do = jax.random.normal(keys[3], (b, t, h, d), jnp.bfloat16)

    def attend(impl):
        return lambda q, k, v: softmax_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                 impl=impl)

    def run(f):
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(do))

    ours = attend("auto")
    if head_groups:
        ours = lambda q, k, v: softmax_cudnn.packed_cudnn(  # noqa: E731
            q, k, v, seg, lambda: jnp.full(q.shape, jnp.nan, q.dtype), max_segments=64 * b,
            head_groups=head_groups)
    got, want = jax.jit(lambda: run(ours))(), jax.jit(lambda: run(attend("xla")))()
    errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - w.astype(jnp.float32)))
                  / float(jnp.max(jnp.abs(w.astype(jnp.float32))))) for a, w in zip(got, want)]
    print(f"op B={b} head groups {head_groups or 'auto'}: errors o/dq/dk/dv "
          f"{' '.join(f'{e:.2e}' for e in errs)} "
          f"{'PASS' if max(errs) < 2e-2 else 'FAIL'}", flush=True)
    return max(errs)


def step_check() -> None:
    from flax import nnx

    from benchmarks.long_context import packed_batch
    from minimax_jax import MiniMaxForCausalLM
    from minimax_jax.training.config import load_train_config
    from minimax_jax.training.optimizer import make_optimizer
    from minimax_jax.training.step import TrainState, train_step

    losses = {}
    variants = {"auto": [], "xla": ["model.softmax_impl=xla", "model.lightning_impl=chunked",
                                    "model.moe_impl=xla"]}
    for impl, overrides in variants.items():
        tcfg, mcfg = load_train_config("configs/small.yaml", ["seq_len=2048", "batch_size=4", *overrides])
        model = MiniMaxForCausalLM(mcfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        opt = make_optimizer(tcfg)
        state = TrainState(params, jax.jit(opt.init)(params), jnp.zeros((), jnp.int32),
                           jax.random.key_data(jax.random.key(0)))
        batch = jax.device_put(packed_batch(2048, mcfg.vocab_size, 4))
        _, m = train_step(state, batch, graphdef=graphdef, optimizer=opt, grad_accum=1,
                          aux_coef=mcfg.router_aux_loss_coef)
        losses[impl] = (float(m["loss"]), float(m["grad_norm"]))
        print(f"train step, ops {impl}: loss {losses[impl][0]:.5f} grad norm "
              f"{losses[impl][1]:.5f} finite {bool(m['finite'])}", flush=True)


if __name__ == "__main__":
    for b in (1, 2, 4):
        op_check(b)
    op_check(1, head_groups=2)
    op_check(2, h=64, n=8, head_groups=8)
    if "--ops" not in sys.argv:
        step_check()
