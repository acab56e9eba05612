"""HF <-> Orbax conversion and load_model: round trips, layouts, errors, atomicity, peak memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from minimax_jax import MiniMaxConfig, MiniMaxForCausalLM
from minimax_jax.checkpoint import (
    MARKER, STATE_DIR, CheckpointError, HFReader, OrbaxReader, load_model, param_shapes, save_model,
)
from minimax_jax.config import ConfigError
from minimax_jax.convert import hf_to_orbax, orbax_to_hf
from minimax_jax.hf_names import IGNORED, NATIVE, REMOTE, expected_entries

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
L, F = "linear_attention", "full_attention"
TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 64}',
             "chat_template.jinja": "{{ messages }}"}
# Runs the CLI in a child and prints its own peak RSS (VmHWM, KiB; ru_maxrss would carry the
# parent's RSS across exec) on stderr; SLOW_WRITES slows each block write.
CHILD = """
import os, re, sys, time
from minimax_jax import checkpoint
from minimax_jax.convert import main
if os.environ.get("SLOW_WRITES"):
    write = checkpoint.OrbaxWriter.write
    checkpoint.OrbaxWriter.write = lambda self, *a: (time.sleep(0.02), write(self, *a))[1]
rc = main(sys.argv[1:])
hwm = re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)
print("PEAK_KIB", hwm, file=sys.stderr)
sys.exit(rc)
"""


def hf_config(**kw) -> "transformers.MiniMaxConfig":
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=48, num_local_experts=4,
                num_experts_per_tok=2, layer_types=[L, L, L, F] * 2, block_size=4,
                max_position_embeddings=256)
    return transformers.MiniMaxConfig(**{**base, **kw})


def save_sharded(tensors: dict[str, np.ndarray], out: Path, n_shards: int) -> None:
    """Hand-written sharded safetensors with an index (safetensors' own writer)."""
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        file = f"model-{s:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def read_hf(d: Path) -> dict[str, np.ndarray]:
    r = HFReader(d)
    return {n: r.read(n) for n in r.file if not IGNORED.fullmatch(n)}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *args, "--no-progress"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def peak_kib(proc: subprocess.CompletedProcess) -> int:
    return int(proc.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """remote: transformers' save_pretrained (w1/w2/w3 + decay buffers, float32);
    native: the same weights in the fused in-memory layout, 3 shards with an index;
    bf16: save_pretrained in bfloat16; ckpt: remote converted to Orbax."""
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(hf_config()).eval()
    with torch.no_grad():  # non-trivial norm scales, so a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = {k: root / k for k in ("remote", "native", "bf16")}
    model.save_pretrained(out["remote"])
    for name, text in TOKENIZER.items():
        (out["remote"] / name).write_text(text)
    out["native"].mkdir()
    shutil.copy(out["remote"] / "config.json", out["native"])
    save_sharded({k: v.numpy() for k, v in model.state_dict().items()}, out["native"], 3)
    model.to(torch.bfloat16).save_pretrained(out["bf16"])
    out["ckpt"] = hf_to_orbax(out["remote"], root / "ckpt", progress=False)
    return out


def test_remote_layout_is_what_save_pretrained_writes(dirs):
    names = set(load_file(str(dirs["remote"] / "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.self_attn.diagonal_decay" in names  # ignored by the conversion
    assert any(".mlp.experts.gate_up_proj" in n for n in read_hf(dirs["native"]))


@pytest.mark.parametrize("layout", [REMOTE, NATIVE])
@pytest.mark.parametrize("size", ["tiny", "Text-01"])
def test_table_fills_every_param_block_exactly_once(layout, size):
    cfg = MiniMaxConfig.from_hf_config(hf_config().to_dict()) if size == "tiny" else MiniMaxConfig()
    shapes = param_shapes(cfg)
    if size == "Text-01" and layout == REMOTE:  # spec §9.4: 80 layers x 103 keys + 3
        assert len(expected_entries(cfg, layout)) == 8243
    filled = {}
    for entries in expected_entries(cfg, layout).values():
        for e in entries:
            filled.setdefault(e.path, []).append(e.index)
    assert filled.keys() == shapes.keys()
    for path, indices in filled.items():
        n = len(indices[0])
        assert sorted(indices) == list(np.ndindex(*shapes[path][:n])), path


@pytest.mark.parametrize("source", ["remote", "bf16"])
def test_hf_orbax_hf_round_trip_is_bit_identical(dirs, tmp_path, source):
    ckpt = dirs["ckpt"] if source == "remote" else hf_to_orbax(dirs[source], tmp_path / "ckpt", progress=False)
    back = orbax_to_hf(ckpt, tmp_path / "back", max_shard_bytes=64 << 10, progress=False)
    a, b = read_hf(dirs[source]), read_hf(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(back.glob("model-*.safetensors"))
    assert len(shards) > 5 and set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in b.values())
    biggest = max(v.nbytes for v in b.values())
    assert all(p.stat().st_size <= max(64 << 10, biggest) + 16 << 10 for p in shards)
    for name, text in TOKENIZER.items() if source == "remote" else ():
        assert (back / name).read_text() == text and (ckpt / name).read_text() == text
    # transformers itself reads the export
    reloaded = transformers.MiniMaxForCausalLM.from_pretrained(back)
    assert reloaded.config.layer_types == [L, L, L, F] * 2


def test_params_are_the_hf_tensors_after_the_stated_transforms(dirs):
    model = load_model(dirs["remote"])
    hf = read_hf(dirs["remote"])
    cfg = model.config
    d, h, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    f = cfg.intermediate_size
    np.testing.assert_array_equal(model.embed_tokens[...], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(model.lm_head[...], hf["lm_head.weight"].T)
    np.testing.assert_array_equal(model.norm.scale[...], hf["model.norm.weight"])
    for l in range(cfg.num_hidden_layers):
        b, layer = l // 4, model.blocks.layers[l % 4]
        w = lambda name: hf[f"model.layers.{l}.{name}"]  # noqa: E731
        a = layer.self_attn
        np.testing.assert_array_equal(layer.input_layernorm.scale[b], w("input_layernorm.weight"))
        np.testing.assert_array_equal(layer.post_attention_layernorm.scale[b], w("post_attention_layernorm.weight"))
        if l % 4 < 3:
            qkv = w("self_attn.qkv_proj.weight")  # rows: per head [q|k|v]
            for head in range(h):
                for j in range(3):
                    rows = qkv[(3 * head + j) * k:(3 * head + j + 1) * k]
                    np.testing.assert_array_equal(a.qkv_proj[b][:, head, j, :], rows.T)
            np.testing.assert_array_equal(a.output_gate[b].reshape(d, h * k), w("self_attn.output_gate.weight").T)
            np.testing.assert_array_equal(a.norm.scale[b].reshape(-1), w("self_attn.norm.weight"))
            np.testing.assert_array_equal(a.out_proj[b].reshape(h * k, d), w("self_attn.out_proj.weight").T)
        else:
            np.testing.assert_array_equal(a.q_proj[b].reshape(d, h * k), w("self_attn.q_proj.weight").T)
            np.testing.assert_array_equal(a.k_proj[b].reshape(d, n * k), w("self_attn.k_proj.weight").T)
            np.testing.assert_array_equal(a.o_proj[b].reshape(h * k, d), w("self_attn.o_proj.weight").T)
        moe = layer.block_sparse_moe
        np.testing.assert_array_equal(moe.gate[b], w("block_sparse_moe.gate.weight").T)
        for e in range(cfg.num_local_experts):
            for name in ("w1", "w2", "w3"):
                expert = w(f"block_sparse_moe.experts.{e}.{name}.weight")
                np.testing.assert_array_equal(getattr(moe, name)[b, e], expert.T)
    assert model.blocks.layers[0].block_sparse_moe.w1.shape == (2, 4, d, f)


def test_hf_and_orbax_dirs_load_identically(dirs):
    ids = jnp.array([[3, 17, 9, 120, 5, 5, 64, 1, 0, 33, 8], [7, 7, 2, 90, 11, 3, 4, 5, 6, 7, 8]])
    a, b = load_model(dirs["remote"]), load_model(dirs["ckpt"])
    graphdef, state_a = nnx.split(a)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))  # one compile for both
    la, lb = forward(state_a, ids), forward(nnx.state(b), ids)
    assert la.shape == (2, 11, 128) and la.dtype == jnp.float32
    np.testing.assert_array_equal(la, lb)
    half = load_model(dirs["ckpt"], dtype="bfloat16")
    assert half.config.param_dtype == half.config.dtype == "bfloat16"
    assert half.lm_head[...].dtype == jnp.bfloat16
    assert jax.eval_shape(lambda: half(ids)).dtype == jnp.float32


def test_dtype_option_casts_the_stored_params(dirs, tmp_path):
    ckpt = hf_to_orbax(dirs["remote"], tmp_path / "ckpt", dtype="bfloat16", progress=False)
    reader = OrbaxReader(ckpt / STATE_DIR)
    assert reader.read(("embed_tokens",), ()).dtype == ml_dtypes.bfloat16
    hf = read_hf(dirs["remote"])
    model = load_model(ckpt)  # float32 params holding the bfloat16 values
    np.testing.assert_array_equal(
        model.blocks.layers[2].block_sparse_moe.w2[1, 3],
        hf["model.layers.6.block_sparse_moe.experts.3.w2.weight"].T.astype(ml_dtypes.bfloat16).astype(np.float32))
    back = read_hf(orbax_to_hf(ckpt, tmp_path / "back", dtype="float16", progress=False))
    assert {v.dtype for v in back.values()} == {np.dtype(np.float16)}


def test_native_and_remote_layouts_load_to_identical_params(dirs):
    flat = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))  # noqa: E731
    a, b = flat(load_model(dirs["remote"])), flat(load_model(dirs["native"]))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path][...], b[path][...], err_msg=str(path))
    # and the native directory converts to the same Orbax checkpoint contents
    native = hf_to_orbax(dirs["native"], dirs["native"].parent / "ckpt_native", progress=False)
    back = read_hf(orbax_to_hf(native, native.parent / "native_back", progress=False))
    remote = read_hf(dirs["remote"])
    assert back.keys() == remote.keys()
    assert all(back[n].tobytes() == remote[n].tobytes() for n in remote)


def test_orbax_restores_our_checkpoint_and_we_read_orbax_saved_ones(dirs, tmp_path):
    model = load_model(dirs["remote"])
    abstract = nnx.state(nnx.eval_shape(lambda: MiniMaxForCausalLM(model.config, rngs=nnx.Rngs(0))), nnx.Param)
    restored = ocp.StandardCheckpointer().restore(dirs["ckpt"] / STATE_DIR, abstract)
    ours = nnx.state(model, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, restored, ours)
    # an nnx.State saved by Orbax itself (OCDBT) is read block by block
    saved = tmp_path / "orbax_saved"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(saved, ours)
    reader = OrbaxReader(saved)
    w1 = model.blocks.layers[1].block_sparse_moe.w1[...]
    np.testing.assert_array_equal(reader.read(("blocks", "layers", 1, "block_sparse_moe", "w1"), (1, 2)), w1[1, 2])


def broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_mapping_errors_are_reported_together(dirs, tmp_path):
    def edit(t):
        del t["model.layers.5.block_sparse_moe.experts.2.w3.weight"]
        t["model.layers.1.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
        t["model.layers.3.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)

    bad = broken_copy(dirs["remote"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        load_model(bad)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "missing tensor model.layers.5.block_sparse_moe.experts.2.w3.weight" in msg
    assert "unexpected tensor model.layers.1.self_attn.extra.weight" in msg
    assert ("shape mismatch for model.layers.3.self_attn.k_proj.weight: "
            "checkpoint has [48, 64], config expects [32, 64]") in msg
    proc = run_cli("--hf-dir", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and msg in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_truncated_shard_is_an_error(dirs, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(dirs["remote"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* do not fit"):
        load_model(bad)


def test_orbax_checkpoint_not_matching_its_config_is_an_error(dirs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dirs["ckpt"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    expected = ("shape mismatch for blocks.layers.0.block_sparse_moe.w1.value: "
                "checkpoint has [2, 4, 64, 48], config expects [2, 4, 64, 40]")
    with pytest.raises(CheckpointError, match=r"12 problem\(s\)") as err:
        load_model(ckpt)
    assert expected in str(err.value)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        orbax_to_hf(ckpt, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_cli_user_errors(dirs, tmp_path):
    proc = run_cli("--hf-dir", str(dirs["remote"]), "--out", str(tmp_path / "o"), "--dtype", "float8")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown dtype 'float8'; valid: ['bfloat16', 'float16', 'float32']" in proc.stderr
    no_config = tmp_path / "no_config"
    shutil.copytree(dirs["remote"], no_config)
    (no_config / "config.json").unlink()
    proc = run_cli("--hf-dir", str(no_config), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "missing config" in proc.stderr and "config.json" in proc.stderr
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load_model(dirs["ckpt"], dtype="int8")


def test_interrupted_conversion_leaves_nothing_loadable(dirs, tmp_path, monkeypatch):
    from minimax_jax import checkpoint

    calls = []

    def failing_write(self, path, index, block):
        calls.append(path)
        if len(calls) == 40:
            raise OSError("disk full")
        original(self, path, index, block)

    original = checkpoint.OrbaxWriter.write
    monkeypatch.setattr(checkpoint.OrbaxWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        hf_to_orbax(dirs["remote"], tmp_path / "ckpt", progress=False)
    assert sorted(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "ckpt")
    monkeypatch.undo()

    # an export that fails at its second shard leaves no HF directory either
    from minimax_jax import convert

    shards = []

    def failing_shard(*args):
        shards.append(args[0])
        if len(shards) == 2:
            raise OSError("boom")
        checkpoint.write_safetensors(*args)

    monkeypatch.setattr(convert, "write_safetensors", failing_shard)
    with pytest.raises(OSError, match="boom"):
        orbax_to_hf(dirs["ckpt"], tmp_path / "hf", max_shard_bytes=64 << 10, progress=False)
    assert sorted(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> tuple[Path, int]:
    """~420 MB of float32 weights in 24 shards (hand-written); returns (dir, largest tensor bytes)."""
    root = tmp_path_factory.mktemp("big") / "hf"
    root.mkdir()
    cfg = hf_config(vocab_size=4096, hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64, intermediate_size=512, num_local_experts=16)
    cfg.save_pretrained(root)
    rng = np.random.default_rng(0)
    d, hk, f = 512, 256, 512
    tensors = {"model.embed_tokens.weight": (4096, d), "lm_head.weight": (4096, d), "model.norm.weight": (d,)}
    for l, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{l}."
        tensors.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                        p + "block_sparse_moe.gate.weight": (16, d)})
        if kind == L:
            tensors.update({p + "self_attn.qkv_proj.weight": (3 * hk, d), p + "self_attn.output_gate.weight": (hk, d),
                            p + "self_attn.norm.weight": (hk,), p + "self_attn.out_proj.weight": (d, hk)})
        else:
            tensors.update({p + "self_attn.q_proj.weight": (hk, d), p + "self_attn.k_proj.weight": (128, d),
                            p + "self_attn.v_proj.weight": (128, d), p + "self_attn.o_proj.weight": (d, hk)})
        for e in range(16):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors.update({q + "w1.weight": (f, d), q + "w3.weight": (f, d), q + "w2.weight": (d, f)})
    arrays = {n: rng.standard_normal(s, dtype=np.float32) for n, s in tensors.items()}
    save_sharded(arrays, root, 24)
    total = sum(a.nbytes for a in arrays.values())
    assert total > 400e6 and len(list(root.glob("*.safetensors"))) == 24
    return root, max(a.nbytes for a in arrays.values())


def test_conversion_peak_memory_is_bounded(dirs, many_shards, tmp_path):
    """Stated bound: peak RSS <= RSS of converting a tiny model + 4 x the largest tensor + 64 MiB."""
    big, largest = many_shards
    small = run_cli("--hf-dir", str(dirs["remote"]), "--out", str(tmp_path / "small"))
    proc = run_cli("--hf-dir", str(big), "--out", str(tmp_path / "big"))
    assert small.returncode == 0 and proc.returncode == 0, proc.stderr
    base, peak = peak_kib(small) * 1024, peak_kib(proc) * 1024
    bound = base + 4 * largest + (64 << 20)
    size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    print(f"baseline {base / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, "
          f"largest tensor {largest / 2**20:.0f} MiB, checkpoint {size / 2**20:.0f} MiB")
    assert peak <= bound
    assert (tmp_path / "big" / MARKER).is_file()
    reader = OrbaxReader(tmp_path / "big" / STATE_DIR)
    expected = HFReader(big).read("model.layers.6.block_sparse_moe.experts.9.w1.weight").T
    np.testing.assert_array_equal(reader.read(("blocks", "layers", 2, "block_sparse_moe", "w1"), (1, 9)), expected)


def test_killed_conversion_leaves_nothing_loadable(many_shards, tmp_path):
    big, _ = many_shards
    out = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, "--hf-dir", str(big), "--out", str(out), "--no-progress"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "SLOW_WRITES": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # killed once it has written 20 blocks, however long its start takes on a loaded machine
    while child.poll() is None and not any(
            len(list(p.rglob("0.*"))) > 20 for p in tmp_path.glob(".ckpt.partial-*")):
        time.sleep(0.05)
    assert child.poll() is None, "the conversion ended before it could be killed mid-write"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    partial = list(tmp_path.glob(".ckpt.partial-*"))
    assert not out.exists() and len(partial) == 1
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_model(partial[0])
    with pytest.raises(CheckpointError):
        load_model(out)


def flip_bytes(file: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of `file` (silent corruption of its data)."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    file.write_bytes(bytes(data))


def convert_main(capsys, *args: str) -> tuple[int, str]:
    """(exit code, its `error: ...` line or "") of the conversion CLI run in this process,
    asserting that it printed at most one error line and no traceback."""
    from minimax_jax.convert import main

    code = main([*args, "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) <= 1, err
    return code, errors[0] if errors else ""


def test_corrupt_byte_in_checkpoint_data_is_named(dirs, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dirs["ckpt"], ckpt)
    tensors = json.loads((ckpt / "checksums.json").read_text())["tensors"]
    assert len(tensors["blocks.layers.0.block_sparse_moe.w1.value"]) == 2 * 4  # one crc32 per written block
    target = ckpt / STATE_DIR / "blocks.layers.1.block_sparse_moe.w2.value"
    flip_bytes(max((f for f in target.iterdir() if f.name[0].isdigit()), key=lambda f: f.stat().st_size))
    with pytest.raises(CheckpointError, match=f"{ckpt}: tensor blocks.layers.1.block_sparse_moe.w2.value "
                                              "does not match its checksum"):
        load_model(ckpt)
    load_model(ckpt, verify=False, allow_non_finite=True)  # the escape hatches load it as it is
    code, err = convert_main(capsys, "--to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"))
    assert code == 1 and "tensor blocks.layers.1.block_sparse_moe.w2.value does not match" in err
    assert not (tmp_path / "hf").exists()
    # a model saved by save_model (Orbax's own OCDBT files) is checked as well: the flipped bytes
    # land in a compressed block (which block is largest varies with how Orbax laid out the
    # files), and either its decompression or the checksum names the tensor
    saved = tmp_path / "saved"
    save_model(load_model(dirs["ckpt"]), saved)
    flip_bytes(max((f for f in (saved / STATE_DIR).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size))
    with pytest.raises(CheckpointError, match=f"{saved}(/{STATE_DIR})?: (tensor .* does not match its checksum|"
                                              r"cannot read param \S+ \(corrupt or missing data\))"):
        load_model(saved)


def test_non_finite_weights_are_refused_unless_allowed(dirs, tmp_path, capsys):
    name = "model.layers.2.block_sparse_moe.experts.1.w3.weight"

    def edit(t):
        t[name][3, 5] = np.nan

    bad = broken_copy(dirs["remote"], tmp_path / "nan", edit)
    with pytest.raises(CheckpointError, match=f"tensor {re.escape(name)} has 1 non-finite value"):
        load_model(bad)
    code, err = convert_main(capsys, "--hf-dir", str(bad), "--out", str(tmp_path / "out"))
    assert code == 1 and name in err and "--allow-non-finite" in err
    assert not (tmp_path / "out").exists()
    code, _ = convert_main(capsys, "--hf-dir", str(bad), "--out", str(tmp_path / "out"), "--allow-non-finite")
    assert code == 0
    with pytest.raises(CheckpointError, match="tensor blocks.layers.2.block_sparse_moe.w3.value has 1 non-finite"):
        load_model(tmp_path / "out")
    model = load_model(tmp_path / "out", allow_non_finite=True)
    assert np.isnan(model.blocks.layers[2].block_sparse_moe.w3[0, 1]).sum() == 1
    # a cast that overflows counts too
    with pytest.raises(CheckpointError, match="after the cast to float16"):
        hf_to_orbax(broken_copy(dirs["remote"], tmp_path / "big", lambda t: t[name].__setitem__((0, 0), 1e6)),
                    tmp_path / "half", dtype="float16", progress=False)


@pytest.mark.parametrize("entry", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_directory_is_refused(dirs, tmp_path, entry):
    hf = tmp_path / "hf"
    shutil.copytree(dirs["native"], hf)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = entry
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"entry model.norm.weight -> {re.escape(entry)} points outside {hf}"):
        load_model(hf)


def _write_header(file: Path, edit) -> None:
    """Rewrite the JSON header of safetensors `file` after `edit(header dict)`."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


BAD_HF_INPUTS = {
    "invalid config.json": (lambda d: (d / "config.json").write_text('{"vocab_size": 128,'),
                            r"config.json: invalid JSON at line 1 column \d+"),
    "num_hidden_layers: eight": (
        lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "num_hidden_layers": "eight"})),
        "config.json: num_hidden_layers='eight' is not a valid int"),
    "header without data_offsets": (
        lambda d: _write_header(d / "model.safetensors", lambda h: h["lm_head.weight"].pop("data_offsets")),
        "model.safetensors: tensor lm_head.weight has a malformed header entry"),
    "header not JSON": (lambda d: (d / "model.safetensors").write_bytes((8).to_bytes(8, "little") + b"{nojson}" + bytes(64)),
                        r"model.safetensors \(safetensors header\): invalid JSON"),
    "broken index": (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": '),
                     "model.safetensors.index.json: invalid JSON"),
    "index without weight_map": (lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
                                 "model.safetensors.index.json: expected"),
}


@pytest.mark.parametrize("case", sorted(BAD_HF_INPUTS))
def test_bad_conversion_inputs_are_one_line_errors(dirs, tmp_path, capsys, case):
    edit, message = BAD_HF_INPUTS[case]
    hf = tmp_path / "hf"
    shutil.copytree(dirs["native" if "index" in case else "remote"], hf)
    edit(hf)
    code, err = convert_main(capsys, "--hf-dir", str(hf), "--out", str(tmp_path / "out"))
    assert code == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()
    with pytest.raises((CheckpointError, ConfigError), match=message):
        load_model(hf)


def test_bad_paths_are_one_line_errors_and_debug_shows_the_traceback(dirs, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    code, err = convert_main(capsys, "--hf-dir", str(a_file), "--out", str(tmp_path / "out"))
    assert code == 1 and err == f"error: HF directory {a_file} is not a directory (expected config.json and *.safetensors in one)"
    code, err = convert_main(capsys, "--hf-dir", str(dirs["remote"]), "--out", str(a_file / "out"))
    assert code == 1 and f"cannot create output {a_file / 'out'}" in err
    with pytest.raises(CheckpointError, match="cannot create output"):
        convert_main(capsys, "--hf-dir", str(dirs["remote"]), "--out", str(a_file / "out"), "--debug")


def test_broken_orbax_checkpoints_raise_checkpoint_errors_naming_the_file(dirs, tmp_path):
    cases = {
        "no checksums": (lambda c: (c / "checksums.json").unlink(), "no checksums.json"),
        "checksums not JSON": (lambda c: (c / "checksums.json").write_text("{"), "checksums.json: invalid JSON"),
        "checksum missing": (lambda c: (c / "checksums.json").write_text('{"tensors": {}}'),
                             "checksums.json has no checksum for tensor"),
        "metadata not JSON": (lambda c: (c / STATE_DIR / "_METADATA").write_text("[1,"), "_METADATA: invalid JSON"),
        "metadata wrong": (lambda c: (c / STATE_DIR / "_METADATA").write_text("{}"), "_METADATA: not Orbax tree metadata"),
        "param files gone": (lambda c: shutil.rmtree(c / STATE_DIR / "norm.scale.value"),
                             "norm.scale.value: cannot read param norm.scale.value"),
    }
    for case, (edit, message) in cases.items():
        ckpt = tmp_path / case.replace(" ", "_")
        shutil.copytree(dirs["ckpt"], ckpt)
        edit(ckpt)
        with pytest.raises(CheckpointError, match=message) as err:
            load_model(ckpt)
        assert str(ckpt) in str(err.value) and "\n" not in str(err.value), case
    load_model(tmp_path / "no_checksums", verify=False)


def test_a_model_larger_than_the_memory_is_refused_before_loading(tmp_path):
    # MiniMax-Text-01's config and no weights: the memory check speaks before any file is looked for
    (tmp_path / "config.json").write_text(json.dumps(MiniMaxConfig().to_hf_config()))
    with pytest.raises(ConfigError, match=r"loading the 80-layer model .* needs 849\.\d GiB but .* GiB are available"):
        load_model(tmp_path, dtype="bfloat16")


def test_checksums_hold_whatever_blocks_the_bytes_arrive_in(rng, monkeypatch):
    from minimax_jax import checkpoint

    monkeypatch.setattr(checkpoint, "SCAN_BYTES", 96)  # many small pieces, splitting rows too
    array = rng.standard_normal((6, 5, 7)).astype(np.float32)
    assert checkpoint.crc32(array.transpose(1, 0, 2)) == checkpoint.crc32(np.ascontiguousarray(array.transpose(1, 0, 2)))
    sums = {"t": [checkpoint.crc32(array[i]) for i in range(6)]}
    checkpoint.verify_tensor("t", array, sums, "ckpt")  # one block covering every part
    verifier = checkpoint.ChecksumVerifier("t", array.nbytes, sums, "ckpt")
    for i, j in np.ndindex(6, 5):  # blocks finer than the parts
        verifier.update(array[i, j])
    verifier.finish()
    array[4, 2, 3] += 1
    with pytest.raises(CheckpointError, match=r"ckpt: tensor t does not match its checksum in checksums.json \(part 5 of 6\)"):
        checkpoint.verify_tensor("t", array, sums, "ckpt")
