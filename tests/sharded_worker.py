"""Checks that need several devices, run as `python tests/sharded_worker.py CHECK` in a process with
8 CPU devices (`tests/test_sharding.py` starts it). Prints one JSON object: the largest relative
errors against the one-device result and facts about the compiled program."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pallas_kernels  # noqa: E402
from sharding import make_mesh  # noqa: E402
from sharding.tokens import zigzag_order  # noqa: E402

MESHES = ({"sequence": 8}, {"data": 2, "sequence": 4})


def rel(a: jax.Array, b: jax.Array) -> float:
    """max |a - b| / max |b|."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def mesh_name(shape: dict[str, int], zigzag: bool = False) -> str:
    """"data2xsequence4" for {"data": 2, "sequence": 4}, "-zigzag" appended in zigzag order."""
    return "x".join(f"{a}{n}" for a, n in shape.items()) + ("-zigzag" if zigzag else "")


def zigzag_permutation(t: int, shards: int, zigzag: bool) -> tuple[np.ndarray, np.ndarray]:
    """(order, its inverse): x[:, order] is x in zigzag order over `shards` (the identity when
    not zigzag)."""
    order = zigzag_order(t, shards) if zigzag else np.arange(t)
    return order, np.argsort(order)


def all_gathers(hlo: str) -> list[str]:
    """The result shapes of the all-gathers in compiled HLO text."""
    return re.findall(r"= (\S+\[[0-9,]*\])\S* all-gather(?:-start)?\(", hlo)


def lightning() -> dict:
    """The lightning op on sequence meshes against one device: output, final state and the
    gradients of q, k, v and the initial state, float32; documents that start inside a shard
    and exactly at a shard boundary."""
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 128, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)) * 0.5, jnp.float32) for _ in range(3))
    slopes = jnp.asarray([0.05, 0.3], jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, d, d)) * 0.1, jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, 40:], seg[0, 80:], seg[1, 32:] = 2, 3, 2  # row 1: a document starts on a shard edge
    seg = jnp.asarray(seg)

    def loss(q, k, v, s0, seg, zigzag=False):
        o, s = pallas_kernels.lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=seg,
                                                  impl="chunked", zigzag=zigzag)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s), (o, s)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True),
                   static_argnames="zigzag")
    (_, (o1, s1)), g1 = step(q, k, v, s0, seg)
    out = {}
    for shape, zigzag in ((m, z) for m in MESHES for z in (False, True)):
        mesh = make_mesh(shape)
        tokens = NamedSharding(mesh, P(None, "sequence"))
        order, back = zigzag_permutation(t, shape["sequence"], zigzag)
        args = (*(jax.device_put(x[:, order], tokens) for x in (q, k, v)), s0,
                jax.device_put(seg[:, order], tokens))
        with jax.set_mesh(mesh):
            (_, (o, s)), g = step(*args, zigzag=zigzag)
            hlo = step.lower(*args, zigzag=zigzag).compile().as_text()
        g = [x[:, back] for x in g[:3]] + [g[3]]
        out[mesh_name(shape, zigzag)] = {
            "o": rel(o[:, back], o1), "state": rel(s, s1),
            "grads": max(rel(a, c) for a, c in zip(g, g1)), "all_gathers": all_gathers(hlo)}
    return out


def softmax() -> dict:
    """Softmax attention (GQA, segment ids with documents across shard edges) on sequence meshes
    against one device: output and the gradients of q, k and v, float32."""
    rng = np.random.default_rng(1)
    b, t, h, n, d = 2, 128, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for _ in range(2))
    seg = np.ones((b, t), np.int32)
    seg[0, 40:], seg[0, 90:], seg[1, 64:] = 2, 3, 2
    seg = jnp.asarray(seg)

    def loss(q, k, v, seg, zigzag=False):
        o = pallas_kernels.softmax_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla",
                                             block_q=8, block_k=8, zigzag=zigzag)
        return jnp.sum(o * jnp.cos(o)), o

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnames="zigzag")
    (_, o1), g1 = step(q, k, v, seg)
    out = {}
    for shape, zigzag in ((m, z) for m in MESHES for z in (False, True)):
        mesh = make_mesh(shape)
        tokens = NamedSharding(mesh, P(None, "sequence"))
        order, back = zigzag_permutation(t, shape["sequence"], zigzag)
        args = tuple(jax.device_put(x[:, order], tokens) for x in (q, k, v, seg))
        with jax.set_mesh(mesh):
            (_, o), g = step(*args, zigzag=zigzag)
            hlo = step.lower(*args, zigzag=zigzag).compile().as_text()
        out[mesh_name(shape, zigzag)] = {
            "o": rel(o[:, back], o1), "grads": max(rel(a[:, back], c) for a, c in zip(g, g1)),
            "all_gathers": all_gathers(hlo), "permutes": hlo.count("collective-permute")}
    return out


def loss() -> dict:
    """The chunked cross-entropy on sequence meshes against one device: its value and the
    gradients of h, lm_head and the weights, float32 (blocks of 16 tokens, so a device's block
    never spans two devices' tokens)."""
    from minimax_jax.loss import chunked_cross_entropy

    rng = np.random.default_rng(3)
    b, t, d, v = 2, 128, 64, 96
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    lm_head = jnp.asarray(rng.standard_normal((d, v)) * 0.2, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.random((b, t)) < 0.8, jnp.float32)

    def f(h, lm_head, weights):
        return chunked_cross_entropy(h, lm_head, targets, weights, block_size=16)

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    value1, g1 = step(h, lm_head, weights)
    out = {}
    for shape in MESHES:
        mesh = make_mesh(shape)
        tokens = NamedSharding(mesh, P(None, "sequence"))
        args = (jax.device_put(h, tokens), lm_head, jax.device_put(weights, tokens))
        with jax.set_mesh(mesh):
            value, g = step(*args)
            hlo = step.lower(*args).compile().as_text()
        out[mesh_name(shape)] = {"value": rel(value, value1),
                                 "grads": max(rel(a, c) for a, c in zip(g, g1)),
                                 "all_gathers": all_gathers(hlo)}
    return out


def model(meshes=MESHES, b: int = 2) -> dict:
    """The tiny model (tests/conftest.py's, float32) on `meshes` against one device: the logits
    and the parameters' gradients of a loss over them (parameters placed by the sharding rules);
    b packed rows of two documents each."""
    from flax import nnx

    from conftest import tiny_config
    from minimax_jax import MiniMaxForCausalLM
    from sharding import param_shardings

    cfg = tiny_config()
    graphdef, params = nnx.split(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(2)
    t = 128
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, 50:], seg[1::2, 64:] = 2, 2
    seg = jnp.asarray(seg)

    def loss(params, ids, seg):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=seg)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, logits1), g1 = step(params, ids, seg)
    out = {}
    for shape in meshes:
        mesh = make_mesh(shape)
        tokens = NamedSharding(mesh, P(None, "sequence"))
        args = (jax.device_put(params, param_shardings(params, mesh)), jax.device_put(ids, tokens),
                jax.device_put(seg, tokens))
        with jax.set_mesh(mesh):
            (_, logits), g = step(*args)
            hlo = step.lower(*args).compile().as_text()
        name = "x".join(f"{a}{n}" for a, n in shape.items())
        out[name] = {"logits": rel(logits, logits1),
                     "grads": max(rel(a, c) for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(g1))),
                     "all_gathers": all_gathers(hlo), "all_to_alls": hlo.count("all-to-all(")}
    return out


def experts() -> dict:
    """`model` on meshes with an expert axis (the experts split over it), 8 rows."""
    return model(({"data": 2, "tensor": 2, "expert": 2}, {"expert": 2, "sequence": 4},
                  {"fsdp": 4, "expert": 2}), b=8)


def indivisible() -> dict:
    """The error for a mesh axis that does not divide the parameter dimension it shards."""
    from flax import nnx

    from conftest import tiny_config
    from minimax_jax import MiniMaxForCausalLM
    from sharding import param_shardings

    params = nnx.state(nnx.eval_shape(lambda: MiniMaxForCausalLM(tiny_config(), rngs=nnx.Rngs(0))), nnx.Param)
    try:
        param_shardings(params, make_mesh({"tensor": 8}))
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps({"lightning": lightning, "softmax": softmax, "loss": loss, "model": model,
                      "experts": experts,
                      "indivisible": indivisible}[sys.argv[1]]()))
