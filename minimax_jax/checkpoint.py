"""Weights on disk, read and written one tensor at a time, and `load_model`.

Two formats:
- an HF directory: `config.json` + `*.safetensors` (optionally `model.safetensors.index.json`),
  in the remote layout (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`) or the native one
  (`mlp.experts.gate_up_proj` / `down_proj`); see `hf_names`.
- our checkpoint directory: `config.json` (`MiniMaxConfig.to_hf_config()`), tokenizer files,
  `state/` (an Orbax PyTree checkpoint of `nnx.state(model, nnx.Param)`, restorable with
  `ocp.StandardCheckpointer().restore(dir / "state", abstract_state)`), and `COMPLETE`, written
  last. A directory without `COMPLETE` is never loaded.

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
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from tqdm import tqdm

from minimax_jax.config import MiniMaxConfig
from minimax_jax.hf_names import IGNORED, Entry, ParamPath, detect_layout, expected_entries
from minimax_jax.model import MiniMaxForCausalLM

STATE_DIR = "state"
MARKER = "COMPLETE"
INDEX_FILE = "model.safetensors.index.json"
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json",
             "chat_template.jinja", "chat_template.json")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
ST_DTYPES = {"F64": np.dtype(np.float64), "F32": DTYPES["float32"], "BF16": DTYPES["bfloat16"],
             "F16": DTYPES["float16"]}
MAX_CHUNK_BYTES = 1 << 28  # zarr chunks of at most 256 MiB
MAX_LISTED = 20  # problems listed in one error message
MAX_HEADER_BYTES = 100 << 20


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


def param_shapes(cfg: MiniMaxConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Shape of every parameter of `MiniMaxForCausalLM(cfg)`, by path (computed abstractly)."""
    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return {path: tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----- HF safetensors --------------------------------------------------------------------------
def read_safetensors_header(file: Path) -> tuple[int, dict[str, dict]]:
    """(byte offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, file.stat().st_size - 8):
            raise CheckpointError(f"{file}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data_bytes = file.stat().st_size - 8 - n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = ST_DTYPES.get(info["dtype"])
        if end > data_bytes or (dtype is not None and end - begin != math.prod(info["shape"]) * dtype.itemsize):
            raise CheckpointError(f"{file}: tensor {name} has data offsets {[begin, end]} that do not fit "
                                  f"its shape {info['shape']} / dtype {info['dtype']} or the file")
    return 8 + n, header


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
            weight_map = json.loads(index.read_text())["weight_map"]
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
    `dtypes[path]`: the dtype each param is stored in (`dtype`, or its HF tensors' dtype).
    Missing, unexpected (decay buffers aside), wrongly shaped or wrongly typed tensors are all
    reported together in one `CheckpointError`.
    """

    def __init__(self, hf_dir: Path, cfg: MiniMaxConfig, dtype: np.dtype | None):
        self.reader = HFReader(hf_dir)
        self.layout = detect_layout(set(self.reader.file))
        self.entries = expected_entries(cfg, self.layout)
        self.shapes = param_shapes(cfg)
        present = set(self.reader.file)
        problems = [f"missing tensor {n}" for n in sorted(set(self.entries) - present)]
        problems += [f"unexpected tensor {n}" for n in sorted(present - set(self.entries))
                     if not IGNORED.fullmatch(n)]
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

    def blocks(self, progress: bool = False) -> Iterator[tuple[Entry, np.ndarray]]:
        """(entry, block of our param in its stored dtype) for every HF tensor, shard by shard.

        Holds one HF tensor and the blocks made from it at a time.
        """
        names = sorted(self.entries, key=lambda n: (self.reader.file[n].name, n))
        for name in tqdm(names, desc=f"{self.reader.dir.name}", unit="tensor", disable=not progress):
            array = self.reader.read(name)
            for entry in self.entries[name]:
                shape = self.shapes[entry.path][len(entry.index):]
                yield entry, entry.rule.to_ours(array, shape).astype(self.dtypes[entry.path], copy=False)


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
    """

    def __init__(self, state_dir: Path, shapes: dict[ParamPath, tuple[int, ...]],
                 dtypes: dict[ParamPath, np.dtype], n_index: dict[ParamPath, int]):
        self.dir, self.shapes = Path(state_dir), shapes
        self.dir.mkdir(parents=True)
        self.stores = {}
        for path, shape in shapes.items():
            self.stores[path] = ts.open({
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(self.dir / ".".join(_tree_key(path)))},
                "metadata": {"shape": list(shape), "chunks": _chunks(shape, n_index[path], dtypes[path].itemsize),
                             "compressor": {"id": "zstd", "level": 1}},
            }, create=True, dtype=ts.dtype(dtypes[path].name)).result()

    def write(self, path: ParamPath, index: tuple[int, ...], block: np.ndarray) -> None:
        """Write `block` into `param[index]` on disk."""
        self.stores[path][index].write(block).result()

    def finish(self) -> None:
        """Write Orbax's tree metadata (`_METADATA`), which makes `state/` restorable."""
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


class OrbaxReader:
    """Blocks of the params of an Orbax PyTree checkpoint of `nnx.state(model, nnx.Param)`
    (ours, or one saved by Orbax itself, with or without OCDBT), read one at a time."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir).absolute()
        meta_file = self.dir / "_METADATA"
        if not meta_file.is_file():
            raise CheckpointError(f"{self.dir}: not an Orbax checkpoint (no _METADATA)")
        meta = json.loads(meta_file.read_text())
        self.use_ocdbt, self.use_zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
        self.names = {tuple(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()}
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
            self.stores[path] = ts.open({"driver": "zarr3" if self.use_zarr3 else "zarr",
                                         "kvstore": kvstore}, open=True).result()
        return self.stores[path]

    def read(self, path: ParamPath, index: tuple[int, ...]) -> np.ndarray:
        """`param[index]` of the param at `path`, in its stored dtype."""
        return self.store(path)[index].read().result()


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
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / generation files present in `src` to `dst`; returns their names."""
    names = [n for n in AUX_FILES if (Path(src) / n).is_file()]
    for name in names:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return names


def is_orbax_dir(path: Path) -> bool:
    """True for a directory of ours (complete or not), False for an HF one."""
    return (Path(path) / STATE_DIR).exists() or (Path(path) / MARKER).exists()


def load_model(path: str | os.PathLike, *, dtype: str = "float32") -> MiniMaxForCausalLM:
    """Load a `MiniMaxForCausalLM` from an HF directory or one of our Orbax checkpoints.

    Params are cast to `dtype` ("float32" | "bfloat16" | "float16"), which also becomes the
    config's `dtype` and `param_dtype`; they live on the default device. Calling the model
    as `model(input_ids [B, T])` gives float32 logits `[B, T, V]`.
    """
    path = Path(path)
    parse_dtype(dtype)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    orbax = is_orbax_dir(path)
    if orbax and not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER}; was its conversion interrupted?)")
    cfg = MiniMaxConfig.from_hf_config(path, dtype=dtype, param_dtype=dtype)
    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    abstract = nnx.state(model, nnx.Param)
    if orbax:
        OrbaxReader(path / STATE_DIR).check({p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract)})
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore((path / STATE_DIR).absolute(), target)
    else:
        plan = HFPlan(path, cfg, DTYPES[dtype])
        arrays = {p: np.empty(shape, DTYPES[dtype]) for p, shape in plan.shapes.items()}
        for entry, block in plan.blocks():
            arrays[entry.path][entry.index] = block
        state = nnx.from_flat_state(
            [(p, v.replace(jnp.asarray(arrays.pop(p)))) for p, v in nnx.to_flat_state(abstract)]
        )
    nnx.update(model, state)
    return model


def save_model(model: MiniMaxForCausalLM, path: str | os.PathLike, *, tokenizer=None) -> Path:
    """Save a live model as a checkpoint that `load_model` reads (Orbax params, config.json, the
    tokenizer's file, the completion marker written last). An existing checkpoint at `path` is
    replaced only once the new one is complete. Returns the path."""
    out = Path(path).absolute()
    staging = out.parent / f"{out.name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    with atomic_directory(staging) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((tmp / STATE_DIR).absolute(), nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2))
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
