"""The Grain input pipeline: local documents -> tokens -> packed rows with segment ids -> batches.

Documents come from text files (one file, one document), .jsonl (one `text` field per line) and
.parquet (a `text` column). Each document becomes BOS + tokens + EOS. Rows of `seq_len + 1` tokens
are cut from the concatenated stream (a document may continue in the next row); segment ids keep
documents apart (the softmax mask and the lightning-state reset). `packed_batches` also packs
documents that carry more per-token features (a conversation's `loss_mask`,
`minimax_jax.training.conversations`), those features cut and padded with the tokens. The iterator is deterministic
and its state is a small JSON-able dict that goes into every checkpoint.

In a multi-process job every process runs the same pipeline (so the iterator state is the same
everywhere) and `global_batch` hands each process's devices only the rows they hold.
"""

from __future__ import annotations

import functools
import json
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from minimax_jax.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")


def default_corpus() -> list[Path]:
    """The running interpreter's standard-library Python sources (present on every machine)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)


def find_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into the sorted list of document files they hold."""
    if not paths:
        return default_corpus()
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; supported: {list(SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"data path not found: {p}")
    if not files:
        raise ValueError(f"no data files ({', '.join(SUFFIXES)}) under {[str(p) for p in paths]}")
    return files


class DocumentSource:
    """Random access to documents: (file, locator) pairs indexed once at start-up. Every .jsonl
    line is parsed then: one that is not a JSON object with a string `text` is a ValueError
    naming the file and the line number.

    Implements grain's RandomAccessDataSource protocol (`__len__`, `__getitem__` -> str).
    """

    def __init__(self, files: Sequence[Path]):
        self._docs: list[tuple[Path, int]] = []
        for f in files:
            if f.suffix == ".jsonl":
                with f.open("rb") as fh:
                    offset = 0
                    for number, line in enumerate(fh, 1):
                        if line.strip():
                            _jsonl_text(line, f, f"line {number}")
                            self._docs.append((f, offset))
                        offset += len(line)
            elif f.suffix == ".parquet":
                import pyarrow.parquet as pq

                try:
                    table = pq.ParquetFile(f)
                except (OSError, ValueError) as e:
                    raise ValueError(f"{f}: not a readable parquet file: {e}") from None
                if "text" not in table.schema_arrow.names:
                    raise ValueError(f"{f}: no 'text' column (columns: {table.schema_arrow.names})")
                self._docs.extend((f, i) for i in range(table.metadata.num_rows))
            else:
                self._docs.append((f, 0))

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:
        path, loc = self._docs[index]
        if path.suffix == ".jsonl":
            with path.open("rb") as fh:
                fh.seek(loc)
                return _jsonl_text(fh.readline(), path, f"byte {loc}")
        if path.suffix == ".parquet":
            return _parquet_text(path)[loc]
        return path.read_text(encoding="utf-8", errors="replace")


def _jsonl_text(line: bytes, path: Path, where: str) -> str:
    """The `text` of one .jsonl line (`where`: "line N" or "byte N"); anything else is a
    ValueError naming `path` and `where`."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} {where}: invalid JSON: {getattr(e, 'msg', e)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path} {where}: expected a JSON object with a string 'text'")
    return record["text"]


@functools.lru_cache(maxsize=2)
def _parquet_text(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["text"])
    return table.column("text").to_pylist()


def split_indices(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic document split -> (train indices, validation indices); both non-empty."""
    if n < 2:
        raise ValueError(f"need at least 2 documents for a train/validation split, found {n}")
    every = max(2, round(1 / val_fraction))
    idx = np.arange(n)
    val = idx[idx % every == every // 2]
    if len(val) == 0:
        val = idx[-1:]
    return np.setdiff1d(idx, val), val


def _encode(text: str, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text), tokenizer.eos_token_id]
    return {"tokens": np.asarray(ids, np.int32)}


def packed_batches(element: Callable[[int], dict[str, np.ndarray]], n: int, *, seq_len: int, batch_size: int,
                   seed: int, shuffle: bool, features: tuple[str, ...] = ("tokens",),
                   whole: bool = False) -> grain.IterDataset:
    """Batches of packed rows: {"tokens", "segment_ids", "positions"} and the other `features`
    (e.g. "loss_mask"), each int32 `[batch, seq_len + 1]`, from documents `element(i)`, i < n
    (a dict of int32 `[n_i]` arrays, one per feature).

    Documents are shuffled per epoch (when `shuffle`) and repeated forever. By default they are
    concatenated and rows cut every seq_len + 1 tokens (a document may continue in the next
    row); with `whole` each document sits whole in one row (first fit over `batch_size` rows,
    the rest of a row padded with segment id 0), so a document must have at most seq_len + 1
    tokens.
    """
    ds = grain.MapDataset.range(n).map(element)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None).to_iter_dataset()
    lengths = {f: seq_len + 1 for f in features}
    if whole:
        ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=batch_size,
                                                        shuffle_bins=False)
    else:
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    ds = ds.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"],
                           "positions": r["tokens_positions"], **{f: r[f] for f in features if f != "tokens"}})
    return ds.batch(batch_size, drop_remainder=True)


class DataPipeline:
    """Train and validation iterators over the same documents, with checkpointable train state."""

    def __init__(self, files: Sequence[Path], tokenizer: Tokenizer, *, seq_len: int,
                 batch_size: int, val_fraction: float, seed: int):
        self.source = DocumentSource(files)
        self.train_idx, self.val_idx = split_indices(len(self.source), val_fraction)
        self.summary = (f"{len(self.source)} documents from {len(files)} files "
                        f"({len(self.val_idx)} held out for validation)")
        self._start(lambda i: _encode(self.source[i], tokenizer), seq_len=seq_len, batch_size=batch_size,
                    seed=seed)

    def _start(self, element: Callable[[int], dict[str, np.ndarray]], **packing: Any) -> None:
        """Build the train and validation datasets over `train_idx` / `val_idx` (`packing`: the
        keyword arguments of `packed_batches` besides shuffle)."""
        train, val = self.train_idx, self.val_idx
        self._train_ds = packed_batches(lambda i: element(int(train[i])), len(train), shuffle=True, **packing)
        self._val_ds = packed_batches(lambda i: element(int(val[i])), len(val), shuffle=False, **packing)
        self.train: Iterator[dict[str, np.ndarray]] = iter(self._train_ds)

    def validation(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        """The first `num_batches` validation batches (the same ones every time)."""
        it = iter(self._val_ds)
        return [next(it) for _ in range(num_batches)]

    def get_state(self) -> dict[str, Any]:
        return self.train.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.train.set_state(state)


def process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> slice:
    """The rows (first dimension) of a global array of `shape` that this process's devices hold
    under `sharding`; a ValueError when they are not one contiguous range."""
    spans = sorted({(idx[0].start or 0, shape[0] if idx[0].stop is None else idx[0].stop)
                    for idx in sharding.addressable_devices_indices_map(shape).values()})
    end = spans[0][0]
    for start, stop in spans:
        if start > end:
            raise ValueError(f"this process's devices hold rows {spans} of a {shape[0]}-row batch, not one "
                             f"contiguous range; order the mesh so each process's devices are adjacent")
        end = max(end, stop)
    return slice(spans[0][0], end)


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """A global batch (the same on every process) as jax.Arrays split by `sharding`, each process
    putting only its own rows (`process_rows`) on its own devices."""
    out = {}
    for key, x in batch.items():
        out[key] = jax.make_array_from_process_local_data(sharding, x[process_rows(sharding, x.shape)], x.shape)
    return out
