"""int8 / fp8 weight quantization: rounding bounds, the quantized matmuls (projections and the
grouped matmul), model logits, quantized checkpoints (save, convert, load) and serving."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from starlette.testclient import TestClient

from conftest import LIN, tiny_config
from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM, generate, quant
from minimax_jax.checkpoint import CheckpointError, load_model, save_model
from minimax_jax.convert import hf_to_orbax, main as convert_main, orbax_to_hf
from minimax_jax.tokenizer import ByteTokenizer
from pallas_kernels.grouped_matmul import QuantizedWeights, grouped_matmul

F32_EPS = 2.0 ** -24  # float32 unit roundoff


def rounding_bound(w: np.ndarray, scale: np.ndarray, contracted: tuple[int, ...], mode: str) -> np.ndarray:
    """The largest |w - dequantized w| the rounding allows, per element (module docstring of
    `quant`), plus float32 slack for computing w / s."""
    s = np.expand_dims(scale, contracted)
    if mode == "int8":
        bound = s / 2
    else:  # 3 mantissa bits: half a step of 2^-3 relative; subnormals below 2^-6 s: 2^-10 s
        bound = np.maximum(np.abs(w) / 16, s / 1024)
    return bound + 4 * F32_EPS * np.abs(w)


def weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian weights with per-column magnitudes spread over 1e-3 .. 1 (per-channel scales
    matter) and one all-zero column."""
    w = rng.standard_normal(shape) * np.exp(rng.uniform(np.log(1e-3), 0, shape[-1]))
    w[..., 0] = 0.0
    return w.astype(np.float32)


def weight_pairs(model: MiniMaxForCausalLM,
                 quantized: MiniMaxForCausalLM) -> list[tuple[nnx.Param, quant.QuantizedWeight]]:
    """(float param of `model`, the QuantizedWeight at the same path of `quantized`)."""
    modules = dict(nnx.iter_modules(model))
    return [(getattr(modules[path[:-1]], path[-1]), q) for path, q in nnx.iter_modules(quantized)
            if isinstance(q, quant.QuantizedWeight)]


def float_copy_with(model: MiniMaxForCausalLM, quantized: MiniMaxForCausalLM) -> MiniMaxForCausalLM:
    """`model` (float) with each quantized weight of `quantized` replaced by its dequantized value."""
    for p, q in weight_pairs(model, quantized):
        p[...] = q.dequantized()
    return model


@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("shape, contracted", [((64, 4, 16), (-3,)), ((4, 16, 64), (-3, -2)),
                                               ((2, 3, 64, 48), (-2,))])
def test_rounding_error_is_within_its_bound(rng, mode, shape, contracted):
    w = weights(rng, shape)
    values, scale = quant.quantize_array(w, contracted, mode)
    assert values.dtype == quant.VALUE_DTYPES[mode] and scale.dtype == jnp.float32
    assert scale.shape == quant.scale_shape(shape, contracted)
    v = np.asarray(values.astype(jnp.float32))
    assert np.max(np.abs(v)) <= quant.QMAX[mode]
    # the channel's largest weight maps onto the largest value (nothing of the range is wasted)
    assert np.allclose(np.max(np.abs(v), axis=contracted)[..., 1:], quant.QMAX[mode])
    assert np.all(v[..., 0] == 0) and np.all(np.asarray(scale)[..., 0] == 1)  # the zero column
    err = np.abs(w - np.asarray(quant.dequantize(values, scale, contracted)))
    assert np.all(err <= rounding_bound(w, np.asarray(scale), contracted, mode))


@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("spec, shape, contracted, x_shape", [
    ("btd,dhk->bthk", (64, 4, 16), (-3,), (2, 5, 64)),
    ("bthk,hkd->btd", (4, 16, 64), (-3, -2), (2, 5, 4, 16)),
])
def test_quantized_projection_is_within_the_rounding_bound(rng, mode, spec, shape, contracted, x_shape):
    """|x @ W - quantized(x @ W)| <= |x| @ (per-element bound of W), elementwise."""
    w = weights(rng, shape)
    x = rng.standard_normal(x_shape).astype(np.float32)
    p = quant.quantize_param(nnx.Param(jnp.asarray(w)), "q_proj" if len(contracted) == 1 else "o_proj", mode)
    got = np.asarray(quant.einsum(spec, jnp.asarray(x), p), np.float64)
    exact = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
    bound = np.einsum(spec, np.abs(x), rounding_bound(w, np.asarray(p.scale[...]), contracted, mode))
    n = math.prod(shape[a] for a in contracted)  # float32 accumulation of n products
    slack = 2 * n * F32_EPS * np.einsum(spec, np.abs(x), np.abs(w))
    assert np.all(np.abs(got - exact) <= bound + slack)


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_grouped_matmul_equals_the_reference(rng, mode):
    """x rows grouped by expert (an empty group, rows past the groups) times w1 | w3 quantized:
    the same as each group's rows times its dequantized weights, for every impl."""
    g, k, n, m = 4, 64, 48, 40
    sizes = np.array([9, 0, 17, 8], np.int32)  # 34 of 40 rows
    x = rng.standard_normal((m, k)).astype(np.float32)
    ws = [quant.quantize_array(weights(rng, (g, k, n)), (-2,), mode) for _ in range(2)]
    deq = [np.asarray(quant.dequantize(v, s, (-2,)), np.float64) for v, s in ws]
    want = np.zeros((m, 2 * n))
    start = 0
    for e, size in enumerate(sizes):
        rows = slice(start, start + size)
        want[rows] = np.concatenate([x[rows].astype(np.float64) @ d[e] for d in deq], axis=1)
        start += size
    qws = [QuantizedWeights(v, s) for v, s in ws]
    slack = 2 * k * F32_EPS * (np.abs(x) @ np.concatenate([np.abs(d) for d in deq], axis=2)).max()
    for impl in ("xla", "pallas", "auto"):  # quantized weights always take the XLA form
        got = np.asarray(grouped_matmul(jnp.asarray(x), qws, jnp.asarray(sizes), impl=impl))
        np.testing.assert_allclose(got, want, rtol=0, atol=slack)
        assert np.all(got[sizes.sum():] == 0)
    with pytest.raises(ValueError, match="all arrays or all QuantizedWeights"):
        grouped_matmul(jnp.asarray(x), [qws[0], jnp.asarray(deq[1], jnp.float32)], jnp.asarray(sizes))


def quantize_copy(cfg: MiniMaxConfig, mode: str, seed: int = 0) -> tuple[MiniMaxForCausalLM, MiniMaxForCausalLM]:
    """(float model, its quantized copy) from the same seed."""
    return (MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(seed)),
            quant.quantize_model(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(seed)), mode))


def test_only_the_projections_are_quantized():
    _, q = quantize_copy(tiny_config(), "int8")
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(q, nnx.Param))}
    quantized = {k for k, v in flat.items() if v.dtype == jnp.int8}
    assert {k.split(".")[-2] for k in quantized} == set(quant.CONTRACTED)
    for k in quantized:
        assert flat[k[:-len("weight")] + "scale"].dtype == jnp.float32
    kept = [k for k in flat if k.endswith(("gate", "embed_tokens", "lm_head")) or "norm" in k]
    assert kept and all(flat[k].dtype == jnp.float32 for k in kept)  # router, embeddings, norms
    assert quant.quantization_mode(q) == "int8"
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_model(q, "fp8")
    with pytest.raises(ValueError, match="unknown quantize value 'int4'; valid: int8, fp8"):
        quant.quantize_model(MiniMaxForCausalLM(tiny_config(), rngs=nnx.Rngs(0)), "int4")


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_logits_equal_the_float_model_on_the_dequantized_weights(mode):
    """The matmuls read the quantized values and scales exactly: the quantized model is the float
    model with weights values * scale, up to float32 rounding."""
    cfg = tiny_config()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    model, q = quantize_copy(cfg, mode)
    want = float_copy_with(model, q)(ids)
    got = q(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_logits_stay_within_the_rounding_error(mode):
    """Relative logits error <= 2 sqrt(N) delta: delta is the largest relative rounding error
    ||W - Q s|| / ||W|| of a quantized weight, N the quantized matmuls a token passes through
    (lightning layer: qkv, gate, out; softmax: q, k, v, o; each MoE: w1, w3, w2). Independent
    roundings add in quadrature, so sqrt(N) delta is the expected relative error; the factor 2
    is the allowance for the gains of the layers between them."""
    cfg = tiny_config()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    model, q = quantize_copy(cfg, mode)
    pairs = weight_pairs(model, q)
    assert len(pairs) == 3 * 3 + 4 + 4 * 3  # the block of 3 lightning + 1 softmax layers, 4 MoEs
    delta = max(float(jnp.linalg.norm(p[...] - w.dequantized()) / jnp.linalg.norm(p[...])) for p, w in pairs)
    n = sum((3 if t == LIN else 4) + 3 for t in cfg.layer_types)
    ref, got = model(ids), q(ids)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    print(f"{mode}: delta {delta:.4f}, N {n}, relative logits error {err:.4f}, bound {2 * math.sqrt(n) * delta:.4f}")
    assert 0 < err <= 2 * math.sqrt(n) * delta


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A float tiny model (configs/tiny.yaml, the byte tokenizer) saved as our checkpoint."""
    model = MiniMaxForCausalLM(MiniMaxConfig.from_yaml("configs/tiny.yaml"), rngs=nnx.Rngs(3))
    return model, save_model(model, tmp_path_factory.mktemp("float") / "tiny", tokenizer=ByteTokenizer())


def flat_params(model) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_checkpoints_save_convert_and_load_back(saved, tmp_path, mode):
    model, ckpt = saved
    want = flat_params(quant.quantize_model(MiniMaxForCausalLM(model.config, rngs=nnx.Rngs(3)), mode))
    loaded = load_model(ckpt, quantize=mode)  # quantized as it is read
    assert flat_params(loaded).keys() == want.keys()
    for p, v in flat_params(loaded).items():
        assert v.dtype == want[p].dtype and np.array_equal(v.view(np.uint8), want[p].view(np.uint8)), p
    # save_model of the quantized model, and conversion from HF with --quantize: both load back
    resaved = save_model(loaded, tmp_path / "resaved")
    hf = orbax_to_hf(ckpt, tmp_path / "hf", progress=False)
    assert convert_main(["--hf-dir", str(hf), "--out", str(tmp_path / "converted"), "--quantize", mode,
                         "--no-progress"]) == 0
    for d in (resaved, tmp_path / "converted"):
        assert json.loads((d / quant.QUANTIZATION_FILE).read_text())["mode"] == mode
        checksums = json.loads((d / "checksums.json").read_text())["tensors"]
        assert "blocks.layers.0.block_sparse_moe.w1.scale.value" in checksums
        back = load_model(d)
        assert quant.quantization_mode(back) == mode
        for p, v in flat_params(back).items():
            assert v.dtype == want[p].dtype and np.array_equal(v.view(np.uint8), want[p].view(np.uint8)), (d, p)
    with pytest.raises(CheckpointError, match=f"holds {mode} weights"):
        load_model(resaved, quantize="fp8" if mode == "int8" else "int8")
    with pytest.raises(CheckpointError, match="export an unquantized checkpoint"):
        orbax_to_hf(resaved, tmp_path / "hf2", progress=False)


def test_a_corrupt_scale_is_refused(saved, tmp_path):
    _, ckpt = saved
    out = tmp_path / "q"
    hf_to_orbax(orbax_to_hf(ckpt, tmp_path / "hf", progress=False), out, quantize="int8", progress=False)
    name = "blocks.layers.3.self_attn.o_proj.scale.value"
    checksums = json.loads((out / "checksums.json").read_text())
    checksums["tensors"][name][0] ^= 1
    (out / "checksums.json").write_text(json.dumps(checksums))
    with pytest.raises(CheckpointError, match=f"tensor {name} does not match its checksum"):
        load_model(out)
    with pytest.raises(ValueError, match="unknown quantize value 'int4'; valid: int8, fp8"):
        load_model(ckpt, quantize="int4")


def test_an_int8_checkpoint_generates_and_serves(saved, tmp_path, monkeypatch):
    """The int8 model's cached decode (`generate`) is greedy under its own full forward pass,
    and `serve.py --quantize int8` serves it with the same greedy tokens."""
    _, ckpt = saved
    model = load_model(ckpt, quantize="int8")
    tok = ByteTokenizer()
    prompt = [tok.bos_token_id, *tok.encode("def quantize(")]
    new = [int(t) for t in generate(model, jnp.asarray([prompt], jnp.int32), 8)[0]]
    logits = model(jnp.asarray([prompt + new], jnp.int32))[0]
    assert new == [int(t) for t in jnp.argmax(logits[len(prompt) - 1:-1], axis=-1)]

    import uvicorn

    from minimax_jax.serving import cli

    served = {}

    def run(app, **_):
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={
                "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "logprobs": 0})
            served["response"] = r.json()

    monkeypatch.setattr(uvicorn, "run", run)
    assert cli.main(["--checkpoint", str(ckpt), "--quantize", "int8", "--max-batch", "2", "--max-context", "64",
                     "--prefill-chunk", "16", "--page-size", "8", "--model-name", "tiny"]) == 0
    choice = served["response"]["choices"][0]
    assert choice["logprobs"]["tokens"] == [tok.decode([t]) for t in new]
