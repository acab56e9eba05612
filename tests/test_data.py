"""The Grain pipeline: document sources, packing with segment ids, split, checkpointable state."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minimax_jax.tokenizer import ByteTokenizer
from minimax_jax.training.data import DataPipeline, DocumentSource, find_files, split_indices


@pytest.fixture
def mixed_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two é"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row 0", "parquet row 1", "parquet row 2"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    return tmp_path


def test_sources_read_every_document(mixed_corpus):
    src = DocumentSource(find_files([mixed_corpus]))
    assert sorted(src[i] for i in range(len(src))) == sorted(
        ["alpha text file", "json one", "json two é", "parquet row 0", "parquet row 1", "parquet row 2"])


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        find_files([tmp_path / "missing.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv.*unsupported"):
        find_files([tmp_path / "x.csv"])


def test_packed_rows_keep_documents_apart(mixed_corpus):
    tok = ByteTokenizer()
    pipe = DataPipeline(find_files([mixed_corpus]), tok, seq_len=16, batch_size=2, val_fraction=0.2, seed=1)
    texts = {pipe.source[int(i)] for i in pipe.train_idx}
    for _ in range(6):
        batch = next(pipe.train)
        assert batch["tokens"].shape == (2, 17) and batch["segment_ids"].shape == (2, 17)
        for row, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
            for s in np.unique(seg):
                piece = row[seg == s]
                assert np.all(np.diff(pos[seg == s]) == 1)  # positions count up inside a document
                body = [t for t in piece if t < 256]
                text = bytes(body).decode("utf-8", errors="ignore")
                assert any(text in t for t in texts), text  # every segment is a piece of one document
    assert set(map(int, pipe.val_idx)).isdisjoint(map(int, pipe.train_idx))


def test_iterator_state_round_trips_through_json(mixed_corpus):
    pipe = DataPipeline(find_files([mixed_corpus]), ByteTokenizer(), seq_len=8, batch_size=2, val_fraction=0.2, seed=3)
    for _ in range(3):
        next(pipe.train)
    state = json.loads(json.dumps(pipe.get_state()))
    want = [next(pipe.train) for _ in range(4)]
    pipe.set_state(state)
    got = [next(pipe.train) for _ in range(4)]
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_split_is_deterministic_and_non_empty():
    train, val = split_indices(100, 0.02)
    assert len(val) == 2 and len(train) == 98
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_indices(1, 0.5)


def test_broken_documents_are_named_with_file_and_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n\n{"text": "two"\n')
    with pytest.raises(ValueError, match=f"{tmp_path / 'docs.jsonl'} line 3: invalid JSON"):
        DocumentSource([tmp_path / "docs.jsonl"])
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=f"{tmp_path / 'docs.jsonl'} line 2: expected a JSON object with a string 'text'"):
        DocumentSource([tmp_path / "docs.jsonl"])
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"rows.parquet: no 'text' column \(columns: \['body'\]\)"):
        DocumentSource([tmp_path / "rows.parquet"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="junk.parquet: not a readable parquet file"):
        DocumentSource([tmp_path / "junk.parquet"])
