"""Every checkpoint carries a Hugging Face `tokenizer.json` + `tokenizer_config.json` giving our
tokenizer's ids exactly: the byte tokenizer's, read back by `tokenizers` and by transformers'
AutoTokenizer, on varied text (unicode, specials, whitespace, control bytes)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from minimax_jax.checkpoint import copy_aux_files
from minimax_jax.tokenizer import BOS, EOS, ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "  two  spaces\n\ttab\r\n", "héllo wörld — 世界 🎉 \u0000 \x7f \u00ad \u0100",
         f"{BOS}user{EOS}\n{BOS}", f"<end_of_sentence {EOS}<beginning_of", "ÿþ" * 3 + "\U0010ffff", ""]
BROKEN = [[0xE2, 0x82], [0xE2, 256, 0x41], [0xFF, 0xFE, 65], [0xED, 0xA0, 0x80], [0xC0, 0xAF, 257]]


def test_byte_tokenizer_files_give_the_same_ids(tmp_path):
    ours = ByteTokenizer()
    ours.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size(with_added_tokens=True) == ours.vocab_size
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == ours.decode(ids) == text
    for ids in BROKEN:  # invalid UTF-8 decodes to the same replacement characters
        assert hf.decode(ids, skip_special_tokens=False) == ours.decode(ids)
    view = HFTokenizer(tmp_path / "tokenizer.json")
    assert (view.bos_token_id, view.eos_token_id, view.vocab_size) == (256, 257, 258)


def test_transformers_reads_the_checkpoint_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    ByteTokenizer().save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id) == (256, 257)
    for text in TEXTS:
        ids = ByteTokenizer().encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, text
        assert auto.encode(text) == ids  # no BOS / EOS added: the server adds BOS itself
        assert auto.decode(ids) == text


def test_conversion_outputs_carry_the_tokenizer_files(tmp_path):
    src, dst, hf_src, hf_dst = (tmp_path / n for n in ("src", "dst", "hf_src", "hf_dst"))
    for d in (src, dst, hf_src, hf_dst):
        d.mkdir()
    copy_aux_files(src, dst)  # a source without a tokenizer: the byte tokenizer's files
    assert json.loads((dst / "tokenizer_config.json").read_text())["eos_token"] == EOS
    assert Tokenizer.from_file(str(dst / "tokenizer.json")).encode("é").ids == [0xC3, 0xA9]
    (hf_src / "tokenizer.json").write_text(ByteTokenizer().hf_json())  # tokenizer.json without a config
    assert copy_aux_files(hf_src, hf_dst) == ["tokenizer.json"]
    assert (hf_dst / "tokenizer.json").read_text() == (hf_src / "tokenizer.json").read_text()
    assert json.loads((hf_dst / "tokenizer_config.json").read_text())["add_bos_token"] is False
