"""Checks that need several devices, run as `python tests/sharded_worker.py CHECK` in a process with
8 CPU devices (`tests/test_sharding.py` starts it). Prints one JSON object: the largest relative
errors against the one-device result and facts about the compiled program or where the arrays lie."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pallas_kernels  # noqa: E402
from sharding import make_mesh  # noqa: E402
from sharding.tokens import zigzag_order  # noqa: E402

MESHES = ({"sequence": 8}, {"data": 2, "sequence": 4})
SERVING_MESH = {"data": 2, "tensor": 2, "expert": 2}


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


def saved_model(path: Path, cfg=None) -> Path:
    """Save a random model of `cfg` (default: `small_config()`) as our checkpoint at `path`: its
    weights drawn from N(0, 0.1^2), its norm scales from 1 + N(0, 0.1^2) (numpy, seed 0, so
    nothing is compiled)."""
    from flax import nnx

    from minimax_jax.checkpoint import model_class, save_model

    cfg = cfg or small_config()
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))
    state = nnx.from_flat_state([
        (p, v.replace(jnp.asarray((p[-1] == "scale") + 0.1 * rng.standard_normal(v.shape), v.dtype)))
        for p, v in nnx.to_flat_state(state)])
    return save_model(nnx.merge(graphdef, state), path)


def small_config(**overrides):
    """tests/conftest.py's tiny config with a two-layer block (lightning, softmax) scanned twice
    (a smaller program to compile), and `overrides`."""
    from conftest import FULL, LIN, tiny_config

    return tiny_config(**{"num_hidden_layers": 4, "layer_types": [LIN, FULL] * 2, **overrides})


def placement(model, mesh) -> dict:
    """Where `model`'s params lie on `mesh`: the params whose sharding differs from
    `param_shardings`' or whose addressable shards are not one per device of exactly the shard
    shape ("misplaced"), how many there are and how many are split (a device holds less than the
    whole), and the split ones among the quantized scales."""
    from flax import nnx

    from minimax_jax import quant
    from sharding import param_shardings

    state = nnx.state(model, nnx.Param)
    want = dict(nnx.to_flat_state(param_shardings(state, mesh)))
    misplaced, split, split_scales = [], 0, 0
    for path, v in nnx.to_flat_state(state):
        array, sharding = v[...], want[path]
        shards = array.addressable_shards
        if (array.sharding != sharding or len({s.device for s in shards}) != mesh.size
                or any(s.data.shape != sharding.shard_shape(array.shape) for s in shards)):
            misplaced.append(".".join(map(str, path)))
        smaller = shards[0].data.size < array.size
        split += smaller
        split_scales += smaller and path[-1] == quant.SCALE and path[-2] in quant.CONTRACTED
    return {"misplaced": misplaced, "params": len(want), "split": split, "split_scales": split_scales}


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids: jax.Array) -> jax.Array:
    from flax import nnx

    return nnx.merge(graphdef, state)(ids)


def forward(model, ids: jax.Array, mesh=None) -> jax.Array:
    """The logits of `model` (a VL model's text model) for ids int32 `[B, T]`, float32, compiled
    once per model structure and placement; under `mesh` when given."""
    from flax import nnx

    from minimax_jax.vision.model import text_model

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _apply(*nnx.split(text_model(model)), ids)


def load() -> dict:
    """`load_model(..., mesh=)` on data2 x tensor2 x expert2 of a random `small_config()` model
    (float32) saved as our checkpoint and exported as an HF directory, both also loaded
    int8-quantized, and of a tiny VL model: where the params lie (`placement`) and the largest
    relative logits error against the same load on one device."""
    from minimax_jax.checkpoint import load_model
    from minimax_jax.convert import orbax_to_hf
    from minimax_jax.vision import MiniMaxVLConfig, VisionConfig

    mesh = make_mesh(SERVING_MESH)
    cfg = small_config()
    ids = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (8, 32)), jnp.int32)
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=7, image_token_index=5)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = saved_model(Path(tmp) / "text")
        hf = orbax_to_hf(ckpt, Path(tmp) / "hf", progress=False)
        vl = saved_model(Path(tmp) / "vl", MiniMaxVLConfig(cfg, vision))
        for name, path, quantize in (("orbax", ckpt, None), ("hf", hf, None), ("orbax-int8", ckpt, "int8"),
                                     ("hf-int8", hf, "int8"), ("vl", vl, None)):
            model = load_model(path, quantize=quantize, mesh=mesh)
            out[name] = {**placement(model, mesh),
                         "logits": rel(forward(model, ids, mesh), forward(load_model(path, quantize=quantize), ids))}
    return out


def serve() -> dict:
    """The serving engine on a model loaded onto data2 x tensor2 x expert2 against the engine on
    the one-device model: greedy tokens of two prompts of 5 and 21 tokens (two prefill chunks of
    16) read together, then 8 tokens in one decode dispatch; the placement of its cache after
    those steps; and serve.py's --mesh errors (`cli_errors`) on the same checkpoint."""
    from conftest import run_jobs
    from minimax_jax.checkpoint import load_model
    from minimax_jax.serving.engine import Engine, SamplingParams, merge_outputs
    from minimax_jax.serving.steps import cache_shardings
    from minimax_jax.tokenizer import ByteTokenizer

    class NoEos(ByteTokenizer):
        eos_token_id = -1

    mesh = make_mesh(SERVING_MESH)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 256, n).tolist() for n in (5, 21)]
    greedy = SamplingParams(max_tokens=9, temperature=0.0)
    tokens, out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = saved_model(Path(tmp) / "text", small_config(vocab_size=320))  # the byte tokenizer's ids
        for name, model in (("one", load_model(ckpt)), ("mesh", load_model(ckpt, mesh=mesh))):
            engine = Engine(model, NoEos(), max_batch=4, max_context=64, prefill_chunk=16, prefill_rows=4,
                            decode_steps=8)
            engine.start()
            try:
                outputs = [merge_outputs(o) for o in run_jobs(engine, [(p, greedy) for p in prompts])]
                tokens[name] = [o.token_ids for o in outputs]
                out[f"{name}_finish"] = [(o.finish_reason, o.error) for o in outputs]
                if name == "mesh":
                    steps = engine.steps
                    want = cache_shardings(steps.cache, mesh)
                    out["cache_placed"] = all(a.sharding.is_equivalent_to(w, a.ndim) for a, w in
                                              zip(jax.tree.leaves(steps.cache), jax.tree.leaves(want)))
                    out["lightning_state_shard"] = list(steps.cache.lightning_state.addressable_shards[0].data.shape)
                    out["lightning_state"] = list(steps.cache.lightning_state.shape)
                    out["key_shard"] = list(steps.cache.key.addressable_shards[0].data.shape)
                    out["key"] = list(steps.cache.key.shape)
            finally:
                engine.stop()
        out["cli"] = cli_errors(ckpt)
    out["tokens"] = tokens
    return out


def cli_errors(ckpt: Path) -> dict:
    """serve.py on checkpoint `ckpt` with a --mesh whose sizes do not multiply to the 8 devices,
    with a --max-batch the mesh's expert axis cannot split and with a sequence axis: exit status
    and stderr of each."""
    import io

    from minimax_jax.serving import cli

    out = {}
    for name, args in (("bad_size", ["--mesh", "data=3,tensor=2"]),
                       ("bad_batch", ["--mesh", "data=2,tensor=2,expert=2", "--max-batch", "6"]),
                       ("sequence", ["--mesh", "data=2,tensor=2,sequence=2"])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["--checkpoint", str(ckpt), *args])
        out[name] = {"code": code, "stderr": err.getvalue()}
    return out


def load_and_serve() -> dict:
    """`load` and `serve`, in one process (one start-up)."""
    return {"load": load(), "serve": serve()}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps({"lightning": lightning, "softmax": softmax, "loss": loss, "model": model,
                      "experts": experts, "indivisible": indivisible,
                      "load_and_serve": load_and_serve}[sys.argv[1]]()))
