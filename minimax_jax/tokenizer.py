"""Tokenizers: byte-level by default (nothing to download), or a local HF `tokenizer.json`.

Both map the MiniMax special strings (`<beginning_of_sentence>`, `<end_of_sentence>`) to single ids.
Both save as a Hugging Face `tokenizer.json` + `tokenizer_config.json` that give exactly the
same ids (the byte tokenizer as a byte-level BPE without merges whose ids are the byte values),
so clients such as transformers' `AutoTokenizer` read any checkpoint this project writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

BOS, EOS = "<beginning_of_sentence>", "<end_of_sentence>"
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer(Protocol):
    """What training and serving need of a tokenizer."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def hf_json(self) -> str: ...

    def save(self, directory: str | Path) -> None: ...


def byte_alphabet() -> dict[int, str]:
    """Byte value -> the printable character byte-level BPE vocabularies spell it with: printable
    Latin-1 bytes stand for themselves, the other 68 take U+0100, U+0101, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def hf_tokenizer_config(tokenizer: Tokenizer) -> dict:
    """The `tokenizer_config.json` that makes transformers read `tokenizer.json` as is: no BOS or
    EOS added by encode, no clean-up of spaces on decode."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"]}


def write_hf_files(tokenizer: Tokenizer, directory: str | Path, *, overwrite: bool = True) -> list[str]:
    """Write `tokenizer.json` and `tokenizer_config.json` for `tokenizer` into `directory`
    (with `overwrite=False` only those missing); returns the names written."""
    directory = Path(directory)
    written = []
    for name, text in ((HF_TOKENIZER_FILE, tokenizer.hf_json),
                       (HF_CONFIG_FILE, lambda: json.dumps(hf_tokenizer_config(tokenizer), indent=2))):
        if overwrite or not (directory / name).is_file():
            (directory / name).write_text(text())
            written.append(name)
    return written


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

    def hf_json(self) -> str:
        """This tokenizer as an HF `tokenizer.json`: byte-level, one pre-token for the whole text
        (no regex split), a BPE vocabulary of the 256 bytes (id = byte value) without merges,
        BOS and EOS as special added tokens."""
        alphabet = byte_alphabet()
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return json.dumps({
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in self._special.items()],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {alphabet[b]: b for b in range(256)}, "merges": []},
        }, ensure_ascii=False, indent=1)

    def save(self, directory: str | Path) -> None:
        """Write the HF files (`write_hf_files`) and `byte_tokenizer.json`, which `load_tokenizer`
        reads back as this class."""
        write_hf_files(self, directory)
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
        """text -> ids (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """ids -> text, special tokens kept."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def hf_json(self) -> str:
        """The `tokenizer.json` text."""
        return self._tok.to_str()

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json`."""
        write_hf_files(self, directory)


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """A `tokenizer.json` file, or a directory holding one (a directory with `byte_tokenizer.json`
    or no tokenizer file at all: the byte tokenizer); None: bytes."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        if (path / HF_TOKENIZER_FILE).is_file() and not (path / BYTE_TOKENIZER_FILE).is_file():
            return HFTokenizer(path / HF_TOKENIZER_FILE)
        return ByteTokenizer()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return HFTokenizer(path)
