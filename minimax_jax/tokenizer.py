"""Tokenizers: byte-level by default (nothing to download), or a local HF `tokenizer.json`.

Both map the MiniMax special strings (`<beginning_of_sentence>`, `<end_of_sentence>`) to single ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

BOS, EOS = "<beginning_of_sentence>", "<end_of_sentence>"
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class Tokenizer(Protocol):
    """What training and serving need of a tokenizer."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS is 256, EOS is 257 (vocab_size 258)."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257
    _special = {BOS: 256, EOS: 257}
    _split = re.compile(f"({re.escape(BOS)}|{re.escape(EOS)})")

    def encode(self, text: str) -> list[int]:
        """text -> ids; the special strings become their single ids."""
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        """ids -> text; special ids become their strings, invalid UTF-8 becomes U+FFFD."""
        out, buf = [], bytearray()
        names = {v: k for k, v in self._special.items()}
        for i in ids:
            if i in names:
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(names[i])
                buf = bytearray()
            elif 0 <= i < 256:
                buf.append(i)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        Path(directory, BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes"}))


class HFTokenizer:
    """A local `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        self._tok = _Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._tok.token_to_id(BOS)
        self.eos_token_id = self._tok.token_to_id(EOS)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory) / "tokenizer.json"))


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """A `tokenizer.json` file, or a directory holding one (else the byte tokenizer); None: bytes."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        return ByteTokenizer()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return HFTokenizer(path)
