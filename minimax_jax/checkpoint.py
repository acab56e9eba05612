"""Weights on disk, read and written one tensor at a time, and `load_model`.

Two formats:
- an HF directory: `config.json` + `*.safetensors` (optionally `model.safetensors.index.json`),
  in the remote layout (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`) or the native one
  (`mlp.experts.gate_up_proj` / `down_proj`); see `hf_names`.
- our checkpoint directory: `config.json` (`MiniMaxConfig.to_hf_config()`), tokenizer files,
  `state/` (an Orbax PyTree checkpoint of `nnx.state(model, nnx.Param)`, restorable with
  `ocp.StandardCheckpointer().restore(dir / "state", abstract_state)`), `checksums.json` (per
  param: the crc32 of each of N equal contiguous parts of its C-order bytes in the stored dtype,
  N = the blocks it was written in) and `COMPLETE`, written last. A directory without `COMPLETE`
  is never loaded; `load_model` checks every param against `checksums.json` and refuses NaN / Inf.
  A quantized checkpoint (`convert --quantize`, or `save_model` of a quantized model) also has
  `quantization.json` (`{"mode": "int8" | "fp8"}`); each quantized weight (see `quant`) is stored
  as two params, its values `<path>.weight` and its float32 scales `<path>.scale`.

`state/` is written without Orbax's save path (which needs whole arrays in memory): every param
is a zarr array (Orbax's `use_ocdbt=False` layout) whose chunks tile the per-layer / per-expert
blocks, so each HF tensor is written straight into its slice on disk; `_METADATA` is the tree
metadata Orbax reads on restore.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from minimax_jax import quant
from minimax_jax.config import MiniMaxConfig, parse_json
from minimax_jax.hf_names import IGNORED, Entry, ParamPath
from minimax_jax.memory import require_memory
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.tokenizer import (BYTE_TOKENIZER_FILE, HF_CONFIG_FILE, HF_TOKENIZER_FILE, load_tokenizer,
                                   write_hf_files)
from minimax_jax.vision.config import MiniMaxVLConfig, read_model_config
from minimax_jax.vision.hf_names import detect_text_layout, hf_entries, text_name
from minimax_jax.vision.model import MiniMaxVLForConditionalGeneration
from sharding.mesh import local_devices_first, param_shardings, placed_bytes

STATE_DIR = "state"
MARKER = "COMPLETE"
CHECKSUM_FILE = "checksums.json"
INDEX_FILE = "model.safetensors.index.json"
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json",
             "chat_template.jinja", "chat_template.json", BYTE_TOKENIZER_FILE)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
ST_DTYPES = {"F64": np.dtype(np.float64), "F32": DTYPES["float32"], "BF16": DTYPES["bfloat16"],
             "F16": DTYPES["float16"]}
MAX_CHUNK_BYTES = 1 << 28  # zarr chunks of at most 256 MiB
MAX_LISTED = 20  # problems listed in one error message
MAX_HEADER_BYTES = 100 << 20
SCAN_BYTES = 64 << 20  # bytes of a tensor made contiguous at a time for checksums and NaN checks


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the config; the message names it."""


def parse_dtype(name: str | None) -> np.dtype | None:
    """"float32" | "bfloat16" | "float16" -> numpy dtype; None -> None (keep the source dtype)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def report(where: Path, problems: list[str]) -> CheckpointError:
    """One error listing (at most MAX_LISTED of) `problems` found in `where`."""
    shown = problems[:MAX_LISTED]
    more = f"; ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return CheckpointError(f"{where}: {len(problems)} problem(s): " + "; ".join(shown) + more)


def model_class(cfg: MiniMaxConfig | MiniMaxVLConfig) -> type[MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration]:
    """The model a config describes: `MiniMaxVLForConditionalGeneration` for a VL config, else
    `MiniMaxForCausalLM`."""
    return MiniMaxVLForConditionalGeneration if isinstance(cfg, MiniMaxVLConfig) else MiniMaxForCausalLM


def param_shapes(cfg: MiniMaxConfig | MiniMaxVLConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shape of every parameter of the model of `cfg` (`model_class`), by path (computed abstractly)."""
    model = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
    return {path: tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----- checksums and non-finite values ---------------------------------------------------------
def _pieces(array: np.ndarray) -> Iterator[np.ndarray]:
    """`array`'s elements in C order as 1-D contiguous pieces of at most ~SCAN_BYTES (slices
    along the leading axes), so a non-contiguous view is never copied whole."""
    if array.ndim <= 1 or array.nbytes <= SCAN_BYTES:
        yield np.ascontiguousarray(array).reshape(-1)
        return
    rows = SCAN_BYTES // max(array[0].nbytes, 1)
    if rows == 0:
        for sub in array:
            yield from _pieces(sub)
        return
    for i in range(0, array.shape[0], rows):
        yield np.ascontiguousarray(array[i:i + rows]).reshape(-1)


def crc32(array: np.ndarray) -> int:
    """crc32 of `array`'s bytes in C order (its own dtype, little-endian)."""
    crc = 0
    for piece in _pieces(array):
        crc = zlib.crc32(piece.view(np.uint8), crc)
    return crc


def check_finite(array: np.ndarray, name: str, where: Path | str, allow: bool) -> None:
    """Raise a CheckpointError naming tensor `name` in `where` if `array` holds NaN or Inf
    (unless `allow`)."""
    if allow:
        return
    bad = sum(int(np.count_nonzero(~np.isfinite(piece))) for piece in _pieces(array))
    if bad:
        raise CheckpointError(f"{where}: tensor {name} has {bad} non-finite value(s) (NaN or Inf); "
                              f"pass allow_non_finite=True (--allow-non-finite) to accept them")


class ChecksumVerifier:
    """Checks the C-order bytes (`nbytes` in all) of tensor `name` of the checkpoint `where`,
    fed in order in blocks of any size, against `checksums[name]`: the crc32 of each of its
    equal contiguous parts."""

    def __init__(self, name: str, nbytes: int, checksums: dict[str, list[int]], where: Path | str):
        if name not in checksums:
            raise CheckpointError(f"{where}: {CHECKSUM_FILE} has no checksum for tensor {name}")
        expected = checksums[name]
        if not expected or nbytes % len(expected):
            raise CheckpointError(f"{where}: {CHECKSUM_FILE} has {len(expected)} checksum(s) for "
                                  f"tensor {name} of {nbytes} bytes")
        self.name, self.expected, self.where = name, expected, where
        self.part_bytes = nbytes // len(expected)
        self.part = self.filled = self.crc = 0

    def update(self, array: np.ndarray) -> None:
        """Feed the next elements of the tensor (C order)."""
        for piece in _pieces(array):
            data = memoryview(piece.view(np.uint8))
            while data:
                if self.part == len(self.expected):
                    raise CheckpointError(f"{self.where}: tensor {self.name} is larger than {CHECKSUM_FILE} says")
                take = min(len(data), self.part_bytes - self.filled)
                self.crc = zlib.crc32(data[:take], self.crc)
                self.filled, data = self.filled + take, data[take:]
                if self.filled == self.part_bytes:
                    if self.crc != self.expected[self.part]:
                        part = f" (part {self.part + 1} of {len(self.expected)})" if len(self.expected) > 1 else ""
                        raise CheckpointError(
                            f"{self.where}: tensor {self.name} does not match its checksum in {CHECKSUM_FILE}"
                            f"{part}: the checkpoint is corrupt; restore it, or pass verify=False "
                            f"(--no-verify) to load it anyway")
                    self.part, self.filled, self.crc = self.part + 1, 0, 0

    def finish(self) -> None:
        """Raise unless every part has been fed and matched."""
        if self.part != len(self.expected):
            raise CheckpointError(f"{self.where}: tensor {self.name} was only partly checked")


def write_text_atomic(file: Path, text: str) -> None:
    """Write `text` to `file` through a temporary sibling renamed over it."""
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, file)


def read_checksums(ckpt: Path) -> dict[str, list[int]]:
    """{tensor name: crc32 list} from `ckpt`/checksums.json; a missing or malformed file is a
    CheckpointError naming it."""
    file = Path(ckpt) / CHECKSUM_FILE
    if not file.is_file():
        raise CheckpointError(f"{ckpt}: no {CHECKSUM_FILE}, so its tensors cannot be verified; "
                              f"pass verify=False (--no-verify) to load it unverified")
    data = parse_json(file.read_bytes(), file, CheckpointError)
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if not isinstance(tensors, dict) or not all(
            isinstance(v, list) and all(isinstance(c, int) for c in v) for v in tensors.values()):
        raise CheckpointError(f"{file}: expected {{\"tensors\": {{name: [crc32, ...]}}}}")
    return tensors


def verify_tensor(name: str, array: np.ndarray, checksums: dict[str, list[int]], where: Path | str) -> None:
    """Raise a CheckpointError naming tensor `name` and `where` unless `array` (its stored
    dtype) matches `checksums[name]`."""
    verifier = ChecksumVerifier(name, array.nbytes, checksums, where)
    verifier.update(array)
    verifier.finish()


def write_checksums(ckpt: Path, checksums: dict[str, list[int]]) -> None:
    """Record `checksums` ({tensor name: crc32 per part}) in `ckpt`/checksums.json."""
    write_text_atomic(Path(ckpt) / CHECKSUM_FILE, json.dumps({"algorithm": "crc32", "tensors": checksums}))


# ----- HF safetensors --------------------------------------------------------------------------
def read_safetensors_header(file: Path) -> tuple[int, dict[str, dict]]:
    """(byte offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, file.stat().st_size - 8):
            raise CheckpointError(f"{file}: not a safetensors file (header length {n})")
        header = parse_json(f.read(n), f"{file} (safetensors header)", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = file.stat().st_size - 8 - n
    for name, info in header.items():
        if not _valid_header_entry(info):
            raise CheckpointError(f"{file}: tensor {name} has a malformed header entry {str(info)[:200]} "
                                  f"(expected dtype, shape and data_offsets [begin, end])")
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES.get(info["dtype"])
        if end > data_bytes or (dtype is not None and end - begin != math.prod(info["shape"]) * dtype.itemsize):
            raise CheckpointError(f"{file}: tensor {name} has data offsets {[begin, end]} that do not fit "
                                  f"its shape {info['shape']} / dtype {info['dtype']} or the file")
    return 8 + n, header


def _valid_header_entry(info) -> bool:
    """True if a safetensors header entry has a string dtype, a shape of non-negative ints and
    data offsets [begin, end] with 0 <= begin <= end."""
    ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v)  # noqa: E731
    return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape"))
            and ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2
            and info["data_offsets"][0] <= info["data_offsets"][1])


def read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` {tensor: shard file} of a safetensors index; malformed JSON, a missing
    map or a shard outside the index's directory (absolute, or through "..") is a CheckpointError
    naming the file and the entry."""
    data = parse_json(index.read_bytes(), index, CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected {{\"weight_map\": {{tensor: shard file name}}}}")
    for key, name in weight_map.items():
        normal = os.path.normpath(name)
        if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
            raise CheckpointError(f"{index}: entry {key} -> {name} points outside {index.parent}")
    return weight_map


class HFReader:
    """The tensors of an HF directory: name -> file, shape, dtype from the safetensors headers
    (guided by `model.safetensors.index.json` when present); data read one tensor at a time.

    Data is read with `np.fromfile` at the header's offsets: one copy of the tensor in memory
    (`safetensors.safe_open(...).get_tensor` peaks at twice that while it maps and copies).
    """

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_weight_map(index)
            files = sorted(set(weight_map.values()))
        else:
            weight_map, files = None, sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        self.file: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self.offset: dict[str, int] = {}
        problems = []
        for name in files:
            path = self.dir / name
            if not path.is_file():
                problems.append(f"shard {name} listed in {INDEX_FILE} does not exist")
                continue
            start, header = read_safetensors_header(path)
            for key, info in header.items():
                self.file[key], self.shape[key] = path, tuple(info["shape"])
                self.dtype[key], self.offset[key] = info["dtype"], start + info["data_offsets"][0]
        for key, name in (weight_map or {}).items():
            if key not in self.file and (self.dir / name).is_file():
                problems.append(f"tensor {key} listed in {INDEX_FILE} is not in {name}")
        if problems:
            raise report(self.dir, problems)

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` in its stored shape and dtype (one of ST_DTYPES)."""
        shape = self.shape[name]
        with open(self.file[name], "rb") as f:
            f.seek(self.offset[name])
            return np.fromfile(f, dtype=ST_DTYPES[self.dtype[name]], count=math.prod(shape)).reshape(shape)


class HFPlan:
    """What an HF directory holds for `cfg`, checked before anything is read.

    `entries[name]`: the destinations of each HF tensor; `shapes[path]`: our param shapes;
    `dtypes[path]`: the dtype each param is stored in (`overrides[path]`, else `dtype`, or its HF
    tensors' dtype).
    Missing, unexpected (decay buffers aside), wrongly shaped or wrongly typed tensors are all
    reported together in one `CheckpointError`.
    """

    def __init__(self, hf_dir: Path, cfg: MiniMaxConfig | MiniMaxVLConfig, dtype: np.dtype | None,
                 overrides: dict[ParamPath, np.dtype] | None = None):
        self.reader = HFReader(hf_dir)
        self.layout = detect_text_layout(cfg, set(self.reader.file))
        self.entries = hf_entries(cfg, self.layout)
        self.shapes = param_shapes(cfg)
        present = set(self.reader.file)
        problems = [f"missing tensor {n}" for n in sorted(set(self.entries) - present)]
        problems += [f"unexpected tensor {n}" for n in sorted(present - set(self.entries))
                     if not IGNORED.fullmatch(text_name(cfg, n) or "")]
        sources: dict[ParamPath, list[np.dtype]] = {}
        for name in sorted(set(self.entries) & present):
            want, got = self.entries[name][0].rule.hf_shape(cfg), self.reader.shape[name]
            if got != want:
                problems.append(f"shape mismatch for {name}: checkpoint has {list(got)}, "
                                f"config expects {list(want)}")
            if self.reader.dtype[name] not in ST_DTYPES:
                problems.append(f"tensor {name} has dtype {self.reader.dtype[name]}; "
                                f"supported: {sorted(ST_DTYPES)}")
            for entry in self.entries[name]:
                sources.setdefault(entry.path, []).append(ST_DTYPES.get(self.reader.dtype[name]))
        if problems:
            raise report(self.reader.dir, problems)
        self.dtypes = {p: np.result_type(*sources[p]) if dtype is None else dtype for p in self.shapes}
        self.dtypes.update(overrides or {})

    def blocks(self, progress: bool = False, allow_non_finite: bool = False) -> Iterator[tuple[Entry, np.ndarray]]:
        """(entry, block of our param in its stored dtype) for every HF tensor, shard by shard.

        Holds one HF tensor and the blocks made from it at a time. A block with NaN or Inf
        (as read, or after the cast to the stored dtype) is a CheckpointError naming the HF
        tensor, unless `allow_non_finite`.
        """
        names = sorted(self.entries, key=lambda n: (self.reader.file[n].name, n))
        for name in tqdm(names, desc=f"{self.reader.dir.name}", unit="tensor", disable=not progress):
            array = self.reader.read(name)
            for entry in self.entries[name]:
                shape, dtype = self.shapes[entry.path][len(entry.index):], self.dtypes[entry.path]
                with np.errstate(over="ignore"):  # an overflowing cast is reported just below
                    block = entry.rule.to_ours(array, shape).astype(dtype, copy=False)
                cast = "" if dtype == array.dtype else f" (after the cast to {dtype.name})"
                check_finite(block, name + cast, self.reader.file[name], allow_non_finite)
                yield entry, block


def write_safetensors(file: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensors: Iterable[np.ndarray]) -> None:
    """Write a safetensors file whose header lists `specs` (name, shape, dtype) in order, then
    the data of `tensors` (the same order, shapes and dtypes), one tensor in memory at a time."""
    codes = {v: k for k, v in ST_DTYPES.items()}
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape, dtype), array in zip(specs, tensors, strict=True):
            if array.shape != shape or array.dtype != dtype:
                raise CheckpointError(f"{file.name}: tensor {name} is {array.dtype}{list(array.shape)}, "
                                      f"header says {dtype}{list(shape)}")
            f.write(np.ascontiguousarray(array).view(np.uint8).data)


# ----- our Orbax checkpoints -------------------------------------------------------------------
def _tree_key(path: ParamPath) -> tuple[str, ...]:
    """Key path of a param in the saved `nnx.State` (Orbax stores `Variable.value` leaves)."""
    return (*map(str, path), "value")


def param_name(path: ParamPath) -> str:
    """A param's name in messages and in checksums.json: its dotted key path in the saved state."""
    return ".".join(_tree_key(path))


def _chunks(shape: tuple[int, ...], n_index: int, itemsize: int) -> list[int]:
    """Zarr chunk shape: 1 along the `n_index` stack axes, the block halved until <= 256 MiB."""
    chunks = [1] * n_index + list(shape[n_index:])
    for axis in range(n_index, len(shape)):
        while chunks[axis] > 1 and math.prod(chunks) * itemsize > MAX_CHUNK_BYTES:
            chunks[axis] = -(-chunks[axis] // 2)
    return chunks


class OrbaxWriter:
    """Param zarr arrays of an Orbax checkpoint in `state_dir`, filled block by block.

    `n_index[path]` is the number of leading stack axes one block write covers (0 for global
    params), so every block covers whole chunks and no chunk is read back or held in memory.
    The crc32 of every block is kept, in the C order of the blocks, for checksums.json.
    """

    def __init__(self, state_dir: Path, shapes: dict[ParamPath, tuple[int, ...]],
                 dtypes: dict[ParamPath, np.dtype], n_index: dict[ParamPath, int]):
        self.dir, self.shapes = Path(state_dir), shapes
        self.dir.mkdir(parents=True)
        self.stores = {}
        self.crcs = {p: [None] * math.prod(shape[:n_index[p]]) for p, shape in shapes.items()}
        for path, shape in shapes.items():
            self.stores[path] = ts.open({
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(self.dir / ".".join(_tree_key(path)))},
                "metadata": {"shape": list(shape), "chunks": _chunks(shape, n_index[path], dtypes[path].itemsize),
                             "compressor": {"id": "zstd", "level": 1}},
            }, create=True, dtype=ts.dtype(dtypes[path].name)).result()

    def write(self, path: ParamPath, index: tuple[int, ...], block: np.ndarray) -> None:
        """Write `block` into `param[index]` on disk and keep its crc32."""
        self.stores[path][index].write(block).result()
        self.crcs[path][np.ravel_multi_index(index, self.shapes[path][:len(index)]) if index else 0] = crc32(block)

    def finish(self) -> dict[str, list[int]]:
        """Write Orbax's tree metadata (`_METADATA`), which makes `state/` restorable; returns the
        checksums {param name: crc32 of each block} for checksums.json."""
        tree = {}
        for path, shape in self.shapes.items():
            key = _tree_key(path)
            tree[str(key)] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in key],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                   "write_shape": list(shape)},
            }
        meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.dir / "_METADATA").write_text(json.dumps(meta))
        return {param_name(p): crcs for p, crcs in self.crcs.items()}


class OrbaxReader:
    """Blocks of the params of an Orbax PyTree checkpoint of `nnx.state(model, nnx.Param)`
    (ours, or one saved by Orbax itself, with or without OCDBT), read one at a time."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir).absolute()
        meta_file = self.dir / "_METADATA"
        if not meta_file.is_file():
            raise CheckpointError(f"{self.dir}: not an Orbax checkpoint (no _METADATA)")
        meta = parse_json(meta_file.read_bytes(), meta_file, CheckpointError)
        try:
            self.use_ocdbt, self.use_zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
            self.names = {tuple(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()}
        except (AttributeError, KeyError, TypeError):
            raise CheckpointError(f"{meta_file}: not Orbax tree metadata (no tree_metadata / key_metadata)") from None
        self.stores: dict[ParamPath, ts.TensorStore] = {}

    def check(self, shapes: dict[ParamPath, tuple[int, ...]]) -> None:
        """Raise one error listing the params missing, unexpected or shaped unlike `shapes`."""
        keys = {_tree_key(p): p for p in shapes}
        problems = [f"missing param {'.'.join(k)}" for k in sorted(keys.keys() - self.names)]
        problems += [f"unexpected param {'.'.join(k)}" for k in sorted(self.names - keys.keys())]
        for key in sorted(keys.keys() & self.names):
            got, want = tuple(self.store(keys[key]).shape), shapes[keys[key]]
            if got != want:
                problems.append(f"shape mismatch for {'.'.join(key)}: checkpoint has {list(got)}, "
                                f"config expects {list(want)}")
        if problems:
            raise report(self.dir, problems)

    def store(self, path: ParamPath) -> ts.TensorStore:
        """The (lazily opened) array of the param at `path`."""
        if path not in self.stores:
            key = _tree_key(path)
            if key not in self.names:
                raise CheckpointError(f"{self.dir}: no param {'.'.join(key)}")
            name = ".".join(key)
            kvstore = ({"driver": "ocdbt", "base": f"file://{self.dir}", "path": name} if self.use_ocdbt
                       else {"driver": "file", "path": str(self.dir / name)})
            try:
                self.stores[path] = ts.open({"driver": "zarr3" if self.use_zarr3 else "zarr",
                                             "kvstore": kvstore}, open=True).result()
            except ValueError as e:
                raise self._unreadable(path, e) from None
        return self.stores[path]

    def read(self, path: ParamPath, index: tuple[int, ...]) -> np.ndarray:
        """`param[index]` of the param at `path`, in its stored dtype."""
        store = self.store(path)
        try:
            return store[index].read().result()
        except ValueError as e:
            raise self._unreadable(path, e) from None

    def _unreadable(self, path: ParamPath, error: Exception) -> CheckpointError:
        """The error for a param whose files TensorStore cannot open or decode."""
        where = self.dir if self.use_ocdbt else self.dir / param_name(path)
        return CheckpointError(f"{where}: cannot read param {param_name(path)} (corrupt or missing data): "
                               f"{str(error).splitlines()[0][:300]}")


# ----- directories -----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; rename it to `out` only if the block succeeds.

    An exception removes it; a killed process leaves only `.{name}.partial-{pid}`.
    """
    out = Path(out).absolute()
    if out.exists():
        raise CheckpointError(f"output {out} already exists; remove it or choose another path")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"cannot create output {out} in {out.parent}: {e.strerror or e}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / generation files present in `src` to `dst`, then write the HF
    `tokenizer.json` / `tokenizer_config.json` of `src`'s tokenizer (`load_tokenizer`: the byte
    tokenizer when it has none) where they are missing; returns the names copied."""
    names = [n for n in AUX_FILES if (Path(src) / n).is_file()]
    for name in names:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    if not all((Path(dst) / n).is_file() for n in (HF_TOKENIZER_FILE, HF_CONFIG_FILE)):
        write_hf_files(load_tokenizer(src), dst, overwrite=False)
    return names


def is_orbax_dir(path: Path) -> bool:
    """True for a directory of ours (complete or not), False for an HF one."""
    return (Path(path) / STATE_DIR).exists() or (Path(path) / MARKER).exists()


def read_quantization(ckpt: Path) -> str | None:
    """The quantization mode of our checkpoint `ckpt` ("int8" | "fp8", from its
    quantization.json), or None when it has none; a malformed file is a CheckpointError naming it."""
    file = Path(ckpt) / quant.QUANTIZATION_FILE
    if not file.is_file():
        return None
    data = parse_json(file.read_bytes(), file, CheckpointError)
    mode = data.get("mode") if isinstance(data, dict) else None
    if mode not in quant.MODES:
        raise CheckpointError(f"{file}: expected {{\"mode\": one of {list(quant.MODES)}}}, got {str(data)[:200]}")
    return mode


def write_quantization(ckpt: Path, mode: str) -> None:
    """Mark `ckpt` as holding weights quantized in `mode` (its quantization.json)."""
    write_text_atomic(Path(ckpt) / quant.QUANTIZATION_FILE, json.dumps(
        {"mode": mode, "scales": "float32, per output channel (and expert)", "weights": sorted(quant.CONTRACTED)}))


def quantized_layout(shapes: dict[ParamPath, tuple[int, ...]], dtypes: dict[ParamPath, np.dtype],
                     mode: str | None) -> tuple[dict[ParamPath, tuple[int, ...]], dict[ParamPath, np.dtype]]:
    """The params as stored in `mode` (None: unchanged): each quantized weight of the float
    params (`shapes`, `dtypes`) becomes its values (`<path>.weight`, int8 / float8_e4m3fn) and
    scales (`<path>.scale`, float32). Returns (shapes, dtypes) by path."""
    out_shapes, out_dtypes = {}, {}
    for path, shape in shapes.items():
        stored = quant.stored_param(path, shape, mode)
        if stored is None:
            out_shapes[path], out_dtypes[path] = shape, dtypes[path]
        else:
            out_shapes[stored.weight], out_dtypes[stored.weight] = shape, stored.value_dtype
            out_shapes[stored.scale], out_dtypes[stored.scale] = stored.scale_shape, np.dtype(np.float32)
    return out_shapes, out_dtypes


def load_model(path: str | os.PathLike, *, dtype: str = "float32", quantize: str | None = None,
               verify: bool = True, allow_non_finite: bool = False, mesh: Mesh | None = None
               ) -> MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration:
    """Load a `MiniMaxForCausalLM` (a `MiniMaxVLForConditionalGeneration` for a MiniMax-VL-01
    checkpoint: `config.json` with a `vision_config`) from an HF directory or one of our Orbax
    checkpoints.

    Params are cast to `dtype` ("float32" | "bfloat16" | "float16"), which also becomes the
    config's `dtype` and `param_dtype`; they live on the default device, or with a `mesh` split
    over it as `sharding.param_shardings` places them (their logical axes through the rules):
    each param is read on the host, put straight into its shards (every device receives only its
    own) and its host copy dropped before the next, so the whole model never sits on one device
    (`jax.make_array_from_callback`, which also serves a multi-process mesh). `quantize` ("int8"
    | "fp8") quantizes the expert and attention projections as they are read (`quant`: values
    with float32 scales per output channel, quantized from the checkpoint's own values; on a
    mesh each weight is quantized in its shards, values and scales placed like the other params);
    the rest keep `dtype`. A quantized checkpoint loads quantized as stored (quantize None or its
    own mode). Calling the model as `model(input_ids [B, T])` gives float32 logits `[B, T, V]`
    (under `jax.set_mesh(mesh)` for a model on a mesh). Our checkpoints' params are checked
    against their checksums.json unless `verify=False`; NaN / Inf in any param is refused unless
    `allow_non_finite`. A broken checkpoint is a CheckpointError naming the file (a ConfigError
    for its config.json, or when the params cannot fit in the device memory: one device's, or on
    a mesh each device's shards against its devices); an unknown `quantize` is a ValueError
    listing the valid ones, a mesh axis that does not divide the dimension it splits a ValueError
    naming the param.
    """
    path = Path(path)
    target = parse_dtype(dtype)
    quant.check_mode(quantize)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    orbax = is_orbax_dir(path)
    if orbax and not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER}; was its conversion interrupted?)")
    stored_mode = read_quantization(path) if orbax else None
    if stored_mode is not None and quantize not in (None, stored_mode):
        raise CheckpointError(f"{path}: holds {stored_mode} weights ({quant.QUANTIZATION_FILE}), so it "
                              f"cannot load as {quantize}; pass quantize={stored_mode!r} or None, or "
                              f"quantize an unquantized checkpoint")
    mode = stored_mode or quantize
    cfg = read_model_config(path, dtype=dtype, param_dtype=dtype)
    create = lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    float_shapes = param_shapes(cfg)
    model = nnx.eval_shape(create if mode is None else lambda: quant.quantize_model(create(), mode))
    abstract = nnx.state(model, nnx.Param)
    shapes, dtypes = quantized_layout(float_shapes, {p: target for p in float_shapes}, mode)
    what = (f"loading the {cfg.num_hidden_layers}-layer model in {path} as {dtype}"
            + (f" with {mode} weights" if mode else ""))
    if mesh is None:
        shardings = None
        require_memory(sum(math.prod(s) * dtypes[p].itemsize for p, s in shapes.items()), what)
    else:
        shardings = dict(nnx.to_flat_state(param_shardings(abstract, mesh)))
        require_memory(placed_bytes([jax.ShapeDtypeStruct(s, dtypes[p]) for p, s in shapes.items()],
                                    [shardings[p] for p in shapes]),
                       f"{what} on mesh {dict(mesh.shape)}", local_devices_first(mesh))
    if stored_mode is not None:
        arrays = _read_orbax(path, shapes, dtypes, verify, allow_non_finite, shardings=shardings)
    elif orbax:
        arrays = _read_orbax(path, float_shapes, {p: target for p in float_shapes}, verify,
                             allow_non_finite, quantize, shardings)
    else:
        exact = {p: np.dtype(np.float32) for p, s in float_shapes.items() if quant.stored_param(p, s, mode)}
        plan = HFPlan(path, cfg, target, exact)
        blocks = {p: np.empty(shape, plan.dtypes[p]) for p, shape in plan.shapes.items()}
        for entry, block in plan.blocks(allow_non_finite=allow_non_finite):
            blocks[entry.path][entry.index] = block
        arrays = {}
        for p in plan.shapes:
            arrays.update(_as_loaded(p, blocks.pop(p), target, mode, shardings))
    state = nnx.from_flat_state(
        [(p, v.replace(jnp.asarray(arrays.pop(p)))) for p, v in nnx.to_flat_state(abstract)]
    )
    nnx.update(model, state)
    return model


def _place(host: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    """A host array on the default device (sharding None), or split as `sharding` says: each
    of its mesh's devices in this process receives only its own shard `host[index]`."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _as_loaded(path: ParamPath, array: np.ndarray, dtype: np.dtype, mode: str | None,
               shardings: dict[ParamPath, NamedSharding] | None = None) -> dict[ParamPath, jax.Array]:
    """A param of a float checkpoint as loaded: {its values path: values, its scales path:
    scales} when it is a weight quantized in `mode`, else {path: array cast to `dtype`}; on the
    default device, or placed as `shardings` (by path) says (a weight to be quantized is placed
    like its values and quantized in its shards)."""
    stored = quant.stored_param(path, array.shape, mode)
    if stored is None:
        return {path: _place(array.astype(dtype, copy=False), shardings and shardings[path])}
    values, scale = quant.quantize_array(_place(array, shardings and shardings[stored.weight]),
                                         stored.contracted, mode)
    if shardings is not None:
        values, scale = jax.device_put((values, scale), (shardings[stored.weight], shardings[stored.scale]))
    return {stored.weight: values, stored.scale: scale}


def _read_orbax(ckpt: Path, shapes: dict[ParamPath, tuple[int, ...]], dtypes: dict[ParamPath, np.dtype],
                verify: bool, allow_non_finite: bool, quantize: str | None = None,
                shardings: dict[ParamPath, NamedSharding] | None = None) -> dict[ParamPath, jax.Array]:
    """{path: param on the default device, or placed as `shardings` says} of our checkpoint
    `ckpt` (its params `shapes`), each cast to `dtypes[path]` or, for the weights `quantize`
    names, quantized (`_as_loaded`); read one param at a time and checked (in its stored dtype)
    against checksums.json when `verify` and for NaN / Inf unless `allow_non_finite`."""
    reader = OrbaxReader(ckpt / STATE_DIR)
    reader.check(shapes)
    checksums = read_checksums(ckpt) if verify else {}
    arrays = {}
    for path in shapes:
        stored = reader.read(path, ())
        if verify:
            verify_tensor(param_name(path), stored, checksums, ckpt)
        check_finite(stored, param_name(path), ckpt, allow_non_finite)
        arrays.update(_as_loaded(path, stored, dtypes[path], quantize, shardings))
    return arrays


def save_model(model: MiniMaxForCausalLM | MiniMaxVLForConditionalGeneration, path: str | os.PathLike, *,
               tokenizer=None) -> Path:
    """Save a live model as a checkpoint that `load_model` reads (Orbax params, config.json, the
    tokenizer's file, checksums.json, quantization.json for a quantized model, the completion
    marker written last). An existing checkpoint at `path` is replaced only once the new one is
    complete. Returns the path."""
    out = Path(path).absolute()
    staging = out.parent / f"{out.name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    state = nnx.state(model, nnx.Param)
    with atomic_directory(staging) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / STATE_DIR).absolute(), state)
        write_checksums(tmp, {param_name(p): [crc32(np.asarray(jax.device_get(v[...])))]
                              for p, v in nnx.to_flat_state(state)})
        checkpointer.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2))
        if (mode := quant.quantization_mode(model)) is not None:
            write_quantization(tmp, mode)
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": "save_model"}))
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old)
    else:
        os.rename(staging, out)
    return out
