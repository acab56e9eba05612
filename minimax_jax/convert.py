"""Convert MiniMax-01 weights between HF safetensors and our Orbax checkpoints, streaming.

    python -m minimax_jax.convert --hf-dir HF --out CKPT [--dtype bfloat16] [--quantize int8|fp8] [--allow-non-finite]
    python -m minimax_jax.convert --to-hf --ckpt CKPT --out HF [--dtype ...] [--max-shard-gib 2] [--no-verify]
    python -m minimax_jax.convert --merge-lora ADAPTER_DIR --out CKPT [--ckpt BASE] [--dtype ...] [--no-verify]

Both directions go through the one table of `hf_names` and hold one tensor at a time. Memory
bound: peak RSS <= (the same conversion of a tiny model) + 4 x the largest single tensor + 64 MiB,
whatever the number of layers, experts or shards (the tensor as read, its dtype cast, and
tensorstore's chunk copy and encode buffer; measured 2.8x for a 98 MiB tensor). For
MiniMax-Text-01 in bfloat16 the largest tensor is embed_tokens / lm_head, 2.3 GiB. Outputs are built in a temporary sibling directory and
renamed into place at the end, so an interrupted conversion leaves nothing that loads. Our
checkpoints record a crc32 per written block (`checksums.json`), which the export and
`load_model` check; NaN / Inf weights are refused in both directions unless allowed.
`--quantize` stores the expert and attention projections as int8 / fp8 values with float32
scales per output channel (`quant`; separate params, each with its checksums), quantized block by
block from the HF tensors' own values; `load_model` reads such a checkpoint back quantized, and
the export refuses it. A MiniMax-VL-01 checkpoint (a `config.json` with `vision_config`)
converts the same way, with the VL key set of `vision.hf_names`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from minimax_jax import quant
from minimax_jax.checkpoint import (
    INDEX_FILE, MARKER, STATE_DIR, CheckpointError, ChecksumVerifier, HFPlan, OrbaxReader, OrbaxWriter,
    atomic_directory, check_finite, copy_aux_files, param_name, param_shapes, parse_dtype,
    quantized_layout, read_checksums, read_quantization, write_checksums, write_quantization,
    write_safetensors,
)
from minimax_jax.config import ConfigError
from minimax_jax.hf_names import REMOTE, Entry, ParamPath
from minimax_jax.lora_checkpoint import merge_checkpoint
from minimax_jax.vision.config import read_model_config
from minimax_jax.vision.hf_names import hf_entries


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hf_to_orbax(hf_dir: str | Path, out: str | Path, *, dtype: str | None = None,
                quantize: str | None = None, progress: bool = True,
                allow_non_finite: bool = False) -> Path:
    """Convert an HF directory (either layout, sharded or not) to our Orbax checkpoint at `out`.

    dtype: "float32" | "bfloat16" | "float16", or None to keep each tensor's dtype. quantize:
    "int8" | "fp8" stores the expert and attention projections quantized (values + float32
    scales, see `quant`; the other params in `dtype`) and writes `quantization.json`. Copies the
    tokenizer files; writes `config.json` from the parsed config and `checksums.json` (crc32 of
    every written block). A tensor with NaN / Inf is an error unless `allow_non_finite`.
    Returns `out`.
    """
    hf_dir, target = Path(hf_dir), parse_dtype(dtype)
    quant.check_mode(quantize)
    if not hf_dir.is_dir():
        problem = "is not a directory" if hf_dir.exists() else "does not exist"
        raise CheckpointError(f"HF directory {hf_dir} {problem} (expected config.json and *.safetensors in one)")
    cfg = read_model_config(hf_dir)
    quantized = {p: quant.stored_param(p, s, quantize) for p, s in param_shapes(cfg).items()}
    plan = HFPlan(hf_dir, cfg, target, {p: np.dtype(np.float32) for p, q in quantized.items() if q})
    n_index = {e.path: len(e.index) for es in plan.entries.values() for e in es}
    shapes, dtypes = quantized_layout(plan.shapes, plan.dtypes, quantize)
    for path, q in quantized.items():
        if q is not None:
            n_index[q.weight] = n_index[q.scale] = n_index.pop(path)
    _log(f"converting {len(plan.entries)} tensors ({plan.layout} layout, "
         f"{len(set(plan.reader.file.values()))} file(s)) from {hf_dir} to {out}"
         + (f", projections quantized to {quantize}" if quantize else ""))
    with atomic_directory(Path(out)) as tmp:
        writer = OrbaxWriter(tmp / STATE_DIR, shapes, dtypes, n_index)
        for entry, block in plan.blocks(progress, allow_non_finite):
            q = quantized[entry.path]
            if q is None:
                writer.write(entry.path, entry.index, block)
            else:
                values, scale = quant.quantize_array(block, q.contracted, quantize)
                writer.write(q.weight, entry.index, np.asarray(values))
                writer.write(q.scale, entry.index, np.asarray(scale))
        write_checksums(tmp, writer.finish())
        if quantize is not None:
            write_quantization(tmp, quantize)
        embed = next(p for p in plan.dtypes if p[-1] == "embed_tokens")
        stored = cfg.replace(param_dtype=plan.dtypes[embed].name)
        (tmp / "config.json").write_text(json.dumps(stored.to_hf_config(), indent=2))
        copied = copy_aux_files(hf_dir, tmp)
        (tmp / MARKER).write_text(json.dumps(
            {"source": str(hf_dir.absolute()), "layout": plan.layout, "tensors": len(plan.entries),
             "copied": copied}, indent=2))
    _log(f"wrote {out}")
    return Path(out)


def _natural_key(name: str) -> list[int | str]:
    """Sort key putting model.layers.2 before model.layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def orbax_to_hf(ckpt: str | Path, out: str | Path, *, dtype: str | None = None,
                max_shard_bytes: int = 2 << 30, progress: bool = True, verify: bool = True,
                allow_non_finite: bool = False) -> Path:
    """Export our Orbax checkpoint `ckpt` to an HF directory at `out` in the remote layout.

    Shards `model-XXXXX-of-YYYYY.safetensors` of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own) plus `model.safetensors.index.json`, `config.json` (written last)
    and the tokenizer files. dtype as in `hf_to_orbax`. Every param is checked against the
    checkpoint's checksums.json as it is read (unless `verify=False`) and every exported tensor
    for NaN / Inf (unless `allow_non_finite`). Returns `out`.
    """
    ckpt, target = Path(ckpt), parse_dtype(dtype)
    if not (ckpt / MARKER).is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no {MARKER})")
    if (mode := read_quantization(ckpt)) is not None:
        raise CheckpointError(f"{ckpt}: holds {mode}-quantized weights ({quant.QUANTIZATION_FILE}); "
                              f"export an unquantized checkpoint instead")
    cfg = read_model_config(ckpt)
    reader = OrbaxReader(ckpt / STATE_DIR)
    entries: list[Entry] = [es[0] for _, es in sorted(hf_entries(cfg, REMOTE).items(),
                                                        key=lambda kv: _natural_key(kv[0]))]
    reader.check(param_shapes(cfg))
    checksums = read_checksums(ckpt) if verify else {}
    verifiers: dict[ParamPath, ChecksumVerifier] = {}
    specs = []
    for e in entries:
        dt = target if target is not None else np.dtype(reader.store(e.path).dtype.numpy_dtype)
        specs.append((e.hf_name, e.rule.hf_shape(cfg), dt))
    sizes = [math.prod(shape) * dt.itemsize for _, shape, dt in specs]
    shards: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(sizes):
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    _log(f"exporting {len(specs)} tensors from {ckpt} to {out} in {len(shards)} shard(s)")

    def tensors(ids: list[int]) -> Iterator[np.ndarray]:
        for i in ids:
            e = entries[i]
            block = reader.read(e.path, e.index)
            if verify:
                verifiers.setdefault(e.path, _verifier(e.path, reader, checksums, ckpt)).update(block)
            tensor = e.rule.to_hf(block, cfg).astype(specs[i][2], copy=False)
            check_finite(tensor, e.hf_name, ckpt, allow_non_finite)
            yield tensor
            bar.update()

    weight_map = {}
    with atomic_directory(Path(out)) as tmp, tqdm(total=len(specs), desc=ckpt.name, unit="tensor",
                                                  disable=not progress) as bar:
        for n, ids in enumerate(shards):
            file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / file, [specs[i] for i in ids], tensors(ids))
            weight_map.update({specs[i][0]: file for i in ids})
        for verifier in verifiers.values():
            verifier.finish()
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
        copy_aux_files(ckpt, tmp)
        param_dtype = specs[0][2].name if target is None else dtype
        (tmp / "config.json").write_text(json.dumps(cfg.replace(param_dtype=param_dtype).to_hf_config(), indent=2))
    _log(f"wrote {out}")
    return Path(out)


def _verifier(path: ParamPath, reader: OrbaxReader, checksums: dict[str, list[int]], ckpt: Path) -> ChecksumVerifier:
    """A checksum verifier for the param at `path`, to be fed its blocks in C order."""
    store = reader.store(path)
    nbytes = math.prod(store.shape) * np.dtype(store.dtype.numpy_dtype).itemsize
    return ChecksumVerifier(param_name(path), nbytes, checksums, ckpt)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors print one line `error: ...` (the traceback with --debug) and return 1."""
    parser = argparse.ArgumentParser(prog="python -m minimax_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", help="HF directory to convert (config.json + *.safetensors)")
    parser.add_argument("--to-hf", action="store_true", help="export --ckpt to an HF directory instead")
    parser.add_argument("--ckpt", help="our Orbax checkpoint directory to export (with --to-hf), or the base "
                                       "of --merge-lora (default: the base the adapters record)")
    parser.add_argument("--merge-lora", metavar="ADAPTER_DIR",
                        help="merge the LoRA adapters in ADAPTER_DIR into their base and write a plain checkpoint")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: keep the source dtype)")
    parser.add_argument("--quantize", choices=quant.MODES,
                        help="store the expert and attention projections as int8 / fp8 with float32 "
                             "per-channel scales (not with --to-hf)")
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="HF shard size bound (with --to-hf)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-verify", action="store_true", help="do not check --ckpt against its checksums.json")
    parser.add_argument("--allow-non-finite", action="store_true", help="convert weights holding NaN / Inf")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        if args.merge_lora:
            if args.to_hf or args.hf_dir or args.quantize:
                raise CheckpointError("--merge-lora takes --out, --ckpt, --dtype and --no-verify, not "
                                      "--to-hf, --hf-dir or --quantize")
            merge_checkpoint(args.merge_lora, args.out, base=args.ckpt, dtype=args.dtype, verify=not args.no_verify)
        elif args.to_hf:
            if not args.ckpt:
                raise CheckpointError("--to-hf needs --ckpt CKPT")
            if args.quantize:
                raise CheckpointError("--quantize applies to the conversion from HF, not to --to-hf")
            orbax_to_hf(args.ckpt, args.out, dtype=args.dtype, progress=not args.no_progress,
                        max_shard_bytes=int(args.max_shard_gib * (1 << 30)), verify=not args.no_verify,
                        allow_non_finite=args.allow_non_finite)
        else:
            if not args.hf_dir:
                raise CheckpointError("give --hf-dir HF (or --to-hf --ckpt CKPT)")
            hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, quantize=args.quantize,
                        progress=not args.no_progress, allow_non_finite=args.allow_non_finite)
    except (CheckpointError, ConfigError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
