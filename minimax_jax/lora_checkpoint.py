"""LoRA adapters on disk, beside (not inside) their base checkpoint, and their merge into it.

An adapter directory holds `adapter.safetensors` (each factor float32, named by its dotted path
in the model's state), `checksums.json` (crc32 of each) and `adapter_config.json`
({"lora": the LoraConfig, "base": the base checkpoint's absolute path or null}).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.checkpoint import (
    CheckpointError, HFReader, atomic_directory, crc32, load_model, read_checksums, report,
    save_model, verify_tensor, write_checksums, write_safetensors,
)
from minimax_jax.config import ConfigError, MiniMaxConfig, parse_json
from minimax_jax.lora import LoraConfig, LoraParam, add_adapters, adapter_shapes, merge_adapters
from minimax_jax.tokenizer import load_tokenizer

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


def _name(path: tuple) -> str:
    """A factor's tensor name: its dotted path in the model's state."""
    return ".".join(map(str, path))


def save_adapters(model: nnx.Module, path: str | os.PathLike, cfg: LoraConfig, *,
                  base: str | os.PathLike | None) -> Path:
    """Write `model`'s adapter factors to the directory `path` (see the module docstring),
    recording `cfg` and the `base` checkpoint. It appears complete or not at all; an adapter
    directory already there is replaced once the new one is complete (any other existing path
    is a CheckpointError). Returns it."""
    flat = [(_name(p), np.asarray(jax.device_get(v[...]), np.float32))
            for p, v in nnx.to_flat_state(nnx.state(model, LoraParam))]
    if not flat:
        raise ValueError("model has no LoRA adapters to save")
    out = Path(path).absolute()
    if out.exists() and not (out / CONFIG_FILE).is_file():
        raise CheckpointError(f"output {out} exists and is not an adapter directory; remove it or choose another path")
    staging = out.parent / f"{out.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    with atomic_directory(staging) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, [(n, a.shape, a.dtype) for n, a in flat], (a for _, a in flat))
        write_checksums(tmp, {n: [crc32(a)] for n, a in flat})
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"lora": cfg.to_dict(), "base": None if base is None else str(Path(base).absolute())}, indent=2))
    if not out.exists():
        os.rename(staging, out)
        return out
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old)
    return out


def read_adapter_config(path: str | os.PathLike) -> tuple[LoraConfig, str | None]:
    """(the LoraConfig, the base checkpoint's path or None) of the adapter directory `path`."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not an adapter directory (no {CONFIG_FILE})")
    raw = parse_json(file.read_bytes(), file, CheckpointError)
    if not isinstance(raw, dict) or not isinstance(raw.get("lora"), dict) or not isinstance(
            raw.get("base"), (str, type(None))):
        raise CheckpointError(f"{file}: expected {{\"lora\": {{rank, alpha, targets, ...}}, \"base\": path or null}}")
    try:
        return LoraConfig.from_mapping(raw["lora"]), raw["base"]
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def load_adapters(model: nnx.Module, path: str | os.PathLike, *, verify: bool = True) -> nnx.Module:
    """Add to `model` (in place; returns it) the adapters saved in the directory `path`, each
    checked against its checksums unless `verify=False`. Missing, extra or misshapen tensors
    are one CheckpointError naming them all; NaN / Inf in a factor is refused."""
    path = Path(path)
    cfg, _ = read_adapter_config(path)
    add_adapters(model, cfg, rngs=nnx.Rngs(0))
    reader = HFReader(path)
    expected = {_name(p): s for p, s in adapter_shapes(model).items()}
    problems = [f"missing tensor {n}" for n in sorted(set(expected) - set(reader.shape))]
    problems += [f"unexpected tensor {n}" for n in sorted(set(reader.shape) - set(expected))]
    problems += [f"tensor {n} has shape {list(reader.shape[n])}, the model needs {list(s)}"
                 for n, s in expected.items() if n in reader.shape and reader.shape[n] != s]
    if problems:
        raise report(path, problems)
    checksums = read_checksums(path) if verify else {}
    flat = []
    for p, v in nnx.to_flat_state(nnx.state(model, LoraParam)):
        array = reader.read(_name(p))
        if verify:
            verify_tensor(_name(p), array, checksums, path)
        if not np.all(np.isfinite(array)):
            raise CheckpointError(f"{path}: adapter tensor {_name(p)} holds NaN or Inf")
        flat.append((p, v.replace(jnp.asarray(array, jnp.float32))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def merge_checkpoint(adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                     base: str | os.PathLike | None = None, dtype: str | None = None,
                     verify: bool = True) -> Path:
    """Merge the adapters of `adapter_dir` into their base checkpoint (`base`, default the one
    recorded in adapter_config.json) and write the result to `out`: a plain checkpoint
    `load_model` reads, in `dtype` (default: the base's param dtype), with the base's tokenizer.
    The merge runs in float32 on the whole model in host memory. Returns `out`."""
    _, recorded = read_adapter_config(adapter_dir)
    base = base or recorded
    if base is None:
        raise CheckpointError(f"{adapter_dir}: records no base checkpoint; pass --ckpt BASE")
    if Path(out).exists():
        raise CheckpointError(f"output {Path(out).absolute()} already exists; remove it or choose another path")
    stored = MiniMaxConfig.from_hf_config(base).param_dtype if Path(base, "config.json").is_file() else None
    target = dtype or stored or "float32"
    model = load_model(base, dtype="float32", verify=verify)
    merge_adapters(load_adapters(model, adapter_dir, verify=verify))
    if target != "float32":
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x.astype(target), state))
        model.config = model.config.replace(dtype=target, param_dtype=target)
    return save_model(model, out, tokenizer=load_tokenizer(base))
