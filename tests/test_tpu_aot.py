"""Ahead-of-time compilation for a TPU v5p slice on this CPU machine, with libtpu (the test extra):
`jax.experimental.topologies` describes a 4-chip v5p (no TPU present) and XLA's TPU compiler
compiles for it, Mosaic kernels included. Interpret mode does not check the TPU's tiling and
memory limits; this compile does, so a kernel that does not lower or compile for TPU fails here.

Two programs: the three Pallas TPU kernel paths (the megablox grouped matmul, splash attention,
the lightning kernels) forward and backward under a mesh, and a sharded train step of the tiny
model, in which the ops' impl="auto" must take those kernels (the host's default backend is the
CPU: the choice is made where the program is lowered)."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no Cloud TPU metadata server to ask
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may load libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.tpu_aot import HBM_BYTES, compile_and_measure, lower_train, model_config, tpu_mesh  # noqa: E402
from pallas_kernels import grouped_matmul, lightning_attention, softmax_attention  # noqa: E402
from sharding import DEFAULT_RULES  # noqa: E402

MESH = {"fsdp": 2, "expert": 2}  # 4 chips; rows split 4 ways, the recommended training axes
SPLASH = {"splash_mqa_fwd_segmented_residuals", "splash_mqa_dq_segmented_no_residuals",
          "splash_mqa_dkv_segmented_no_residuals"}
LIGHTNING = {"_scan_kernel", "_reverse_kernel"}  # pallas_kernels.lightning_tpu's forward / backward


@pytest.fixture(scope="module")
def mesh():
    """A mesh over the 4 chips of a described v5p 2x2x1 slice."""
    return tpu_mesh("2x2x1", MESH)


def kernel_names(lowered_text: str) -> set[str]:
    """The Mosaic kernels a lowered program calls, by their names."""
    return set(re.findall(r'kernel_name = "([^"]+)"', lowered_text))


def kernels_step(x, w, sizes, q, kv, seg, lq, s0):
    """Gradients of one loss over the three kernel paths, each through its public op."""
    def loss(x, w, q, k, v, lq, s0):
        moe = jax.shard_map(lambda x, w, s: grouped_matmul(x, (w, w), s, impl="auto"),
                            in_specs=(P(("fsdp", "expert")), P(), P()), out_specs=P(("fsdp", "expert")),
                            check_vma=False)(x, w, sizes)
        att = softmax_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="auto")
        o, state = lightning_attention(lq, lq, lq, jnp.full((lq.shape[2],), 0.3), initial_state=s0,
                                       segment_ids=seg, impl="auto")
        return sum(jnp.sum(a.astype(jnp.float32) ** 2) for a in (moe, att, o, state))

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6))(x, w, q, kv, kv, lq, s0)


def test_kernels_compile_for_v5p(mesh):
    """The megablox gmm / tgmm (bf16, rows of an expert not a multiple of the tile), splash's
    forward, dq and dkv (GQA 8 over 2 heads, segment ids) and the lightning forward and backward
    (head dim 128, segment ids, initial state), rows split over the 4 chips, compile for TPU."""
    rows = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, P(("fsdp", "expert"))))
    whole = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, P()))
    args = (rows(4 * 1000, 512), whole(8, 512, 1024), whole(8, dtype=jnp.int32),
            rows(4, 1024, 8, 128), rows(4, 1024, 2, 128), rows(4, 1024, dtype=jnp.int32),
            rows(4, 1024, 2, 128), rows(4, 2, 128, 128, dtype=jnp.float32))
    with jax.set_mesh(mesh):
        lowered = jax.jit(kernels_step).lower(*args)
    text = lowered.as_text()
    names = kernel_names(text)
    assert SPLASH <= names and LIGHTNING <= names, names
    assert len(re.findall(r"call @gmm\w*\(", text)) == 4 and len(re.findall(r"call @tgmm\w*\(", text)) == 2
    result = compile_and_measure(lowered, HBM_BYTES["v5p"])
    assert "tpu_custom_call" in result["compiler_custom_calls"] and result["fits"]


def test_tiny_train_step_compiles_for_v5p_with_the_kernels(mesh):
    """`train.py`'s step (forward, loss, backward, AdamW) of configs/tiny.yaml with head dim 64
    (one the lightning kernel takes), 4 rows of 256 tokens over fsdp x expert: lowered with the
    ops' impl="auto", it calls the TPU kernels (splash, lightning, megablox: experts through the
    expert-parallel exchange), and it compiles for the v5p slice."""
    cfg = model_config("configs/tiny.yaml", None).replace(head_dim=64)
    assert (cfg.lightning_impl, cfg.softmax_impl, cfg.moe_impl) == ("auto",) * 3
    lowered = lower_train(cfg, mesh, DEFAULT_RULES, rows=4, seq_len=256)
    text = lowered.as_text()
    names = kernel_names(text)
    assert SPLASH <= names and LIGHTNING <= names, names
    assert re.search(r"call @gmm\w*\(", text) and re.search(r"call @tgmm\w*\(", text)
    result = compile_and_measure(lowered, HBM_BYTES["v5p"])
    assert "tpu_custom_call" in result["compiler_custom_calls"] and result["fits"]
    assert result["collectives"]["all-to-all"] > 0  # the experts' exchange over `expert`
