"""Supervised fine-tuning on conversations: rendering with the chat template, the loss mask on
the assistant's tokens (zero gradient elsewhere), bad rows, long conversations, the embedded
standard-library example and `train.py --config configs/sft-tiny.yaml`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax import MiniMaxForCausalLM
from minimax_jax.config import ConfigError
from minimax_jax.loss import chunked_cross_entropy
from minimax_jax.serving.chat import ChatTemplate
from minimax_jax.serving.tools import M1_FORMAT
from minimax_jax.tokenizer import EOS, ByteTokenizer
from minimax_jax.training.config import load_train_config
from minimax_jax.training.conversations import (ConversationPipeline, ConversationSource, encode_example,
                                                parse_row, render_examples, training_template)
from minimax_jax.training.data import packed_batches
from minimax_jax.training.loop import run
from minimax_jax.training.stdlib_conversations import conversations
from minimax_jax.training.step import loss_fn, split_batch
from tests.conftest import FULL, LIN, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def chat(*turns: str, system: str | None = None) -> list[dict]:
    """Alternating user / assistant messages (after an optional system prompt)."""
    roles = ["user", "assistant"] * len(turns)
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": t} for r, t in zip(roles, turns)]


def trained_text(example: dict) -> str:
    return TOK.decode(example["tokens"][example["loss_mask"] == 1].tolist())


def test_text01_example_masks_exactly_the_replies_after_the_server_prompts():
    template = ChatTemplate()
    messages = chat("Q1", "A1", "Q2", "A2", system="S")
    [pieces] = render_examples(template, messages)
    ex = encode_example(pieces, TOK)
    assert TOK.decode(ex["tokens"].tolist()) == template.render(messages, add_generation_prompt=False)
    assert trained_text(ex) == f"A1{EOS}\nA2{EOS}\n"  # spec §11: a turn ends with EOS and a newline
    for i, trained_before in ((2, 0), (4, len(TOK.encode(f"A1{EOS}\n")))):
        prompt = TOK.encode(template.render(messages[:i]))  # what the server sends for that turn
        assert ex["tokens"][:len(prompt)].tolist() == prompt
        assert ex["loss_mask"][:len(prompt)].sum() == trained_before and ex["loss_mask"][len(prompt)] == 1


def test_tool_calls_train_on_the_call_and_the_answer_each_after_its_own_prompt():
    row = {"tools": [TOOL], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "1+2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "assistant", "content": "It is 3."}]}
    template = ChatTemplate()
    messages, tools = parse_row(json.dumps(row))
    examples = [encode_example(p, TOK) for p in render_examples(template, messages, tools)]
    # Text-01's format writes the tools after the conversation, so each turn is its own example.
    assert len(examples) == 2
    call = "<function_call>```typescript\nfunctions.add({\"a\": 1, \"b\": 2})\n```"
    assert [trained_text(e) for e in examples] == [f"{call}{EOS}\n", f"It is 3.{EOS}\n"]
    for ex, i in zip(examples, (1, 3)):
        prompt = TOK.encode(template.render(messages[:i], tools))
        assert ex["tokens"][:len(prompt)].tolist() == prompt and not ex["loss_mask"][:len(prompt)].any()
    assert '{"name": "add", "response": "3"}' in TOK.decode(examples[1]["tokens"].tolist())
    # MiniMax-M1's format writes the tools up front: one example, both replies trained
    [m1] = [encode_example(p, TOK) for p in render_examples(ChatTemplate(format=M1_FORMAT), messages, tools)]
    m1_call = '<tool_calls>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_calls>'
    assert trained_text(m1) == f"{m1_call}{EOS}\nIt is 3.{EOS}\n"
    assert TOK.decode(m1["tokens"].tolist()) == ChatTemplate(format=M1_FORMAT).render(messages, tools, add_generation_prompt=False)


def test_checkpoint_template_is_used_and_its_turn_ends_are_trained(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    template = training_template(None, str(tmp_path), "minimax")
    assert template.source == CHATML
    [pieces] = render_examples(template, chat("Q1", "A1", "Q2", "A2"))
    ex = encode_example(pieces, TOK)
    assert trained_text(ex) == "A1<|im_end|>\nA2<|im_end|>\n"
    assert TOK.decode(ex["tokens"].tolist()) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n")
    assert training_template(None, None, "minimax").source is None  # no template shipped: the format


def write_rows(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_rows_are_reported_with_file_and_line_and_skipped(tmp_path, caplog):
    good = json.dumps({"messages": chat("Q", "A")})
    path = write_rows(tmp_path / "chats.jsonl", [
        good,
        '{"messages": [',  # line 2: not JSON
        json.dumps({"messages": [{"role": "robot", "content": "x"}, *chat("Q", "A")]}),  # 3: unknown role
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 4: nothing to train on
        "",
        json.dumps({"messages": chat("Q", "A") + [{"role": "assistant", "content": "B", "weight": 0}]}),
        json.dumps({"messages": [{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A", "weight": 0}]}),
    ])
    with caplog.at_level(logging.WARNING, logger="minimax_jax.training"):
        source = ConversationSource([path], ChatTemplate(), TOK, max_tokens=1000, truncate=True)
    assert dict(source.skipped) == {"invalid_json": 1, "unknown_role": 1, "no_assistant_tokens": 2}
    assert (len(source), source.rows) == (2, 2)
    for line, what in ((2, "invalid JSON"), (3, "unknown role 'robot'"), (4, "no assistant"), (7, "no assistant")):
        assert any(f"{path} line {line}: " in r.message and what in r.message for r in caplog.records), line
    assert trained_text(source[1]) == f"A{EOS}\n"  # the weight-0 reply is context only
    with pytest.raises(ValueError, match="conversations are read from .jsonl"):
        ConversationSource([write_rows(tmp_path / "notes.txt", ["x"])], ChatTemplate(), TOK, max_tokens=10,
                           truncate=True)


@pytest.mark.parametrize("truncate", [True, False])
def test_long_conversations_truncated_or_split_and_counted(tmp_path, truncate):
    long_row = json.dumps({"messages": chat("Q", "x" * 70)})
    path = write_rows(tmp_path / "chats.jsonl", [long_row, json.dumps({"messages": chat("Q", "short")})])
    full = encode_example(render_examples(ChatTemplate(), *parse_row(long_row))[0], TOK)
    source = ConversationSource([path], ChatTemplate(), TOK, max_tokens=64, truncate=truncate)
    assert source.long == 1 and len(full["tokens"]) > 64
    assert source.truncated_tokens == (len(full["tokens"]) - 64 if truncate else 0)
    assert ("truncated: " if truncate else "split across rows") in source.describe()
    rows = next(iter(packed_batches(source.__getitem__, len(source), seq_len=63, batch_size=2, seed=0,
                                    shuffle=False, features=("tokens", "loss_mask"), whole=truncate)))
    first = rows["segment_ids"][0] == 1
    if truncate:  # whole in one row, cut to 64 tokens
        np.testing.assert_array_equal(rows["tokens"][0], full["tokens"][:64])
        np.testing.assert_array_equal(rows["loss_mask"][0], full["loss_mask"][:64])
        assert rows["segment_ids"][1].max() == 1 and rows["positions"][1][0] == 0  # the short one on its own row
    else:  # packed end to end: the long one continues in the next row
        assert first.all()
        cont = rows["segment_ids"][1] == 1
        tokens = np.concatenate([rows["tokens"][0], rows["tokens"][1][cont]])
        mask = np.concatenate([rows["loss_mask"][0], rows["loss_mask"][1][cont]])
        np.testing.assert_array_equal(tokens, full["tokens"])
        np.testing.assert_array_equal(mask, full["loss_mask"])


def conversation_batch(tmp_path: Path, seq_len: int = 95) -> dict[str, np.ndarray]:
    rows = [json.dumps({"messages": chat(f"Q{i}", "answer " * (i + 1), system="S" if i % 2 else None)})
            for i in range(6)]
    source = ConversationSource([write_rows(tmp_path / "c.jsonl", rows)], ChatTemplate(), TOK,
                                max_tokens=seq_len + 1, truncate=True)
    return next(iter(packed_batches(source.__getitem__, len(source), seq_len=seq_len, batch_size=2, seed=0,
                                    shuffle=False, features=("tokens", "loss_mask"), whole=True)))


def test_masked_tokens_get_exactly_zero_gradient_and_the_loss_counts_only_replies(tmp_path):
    batch = conversation_batch(tmp_path)
    b = split_batch({k: jnp.asarray(v) for k, v in batch.items()})
    mask = np.asarray(b["mask"])
    # the counted targets are exactly the assistant tokens that continue their own conversation
    expected = (batch["loss_mask"][:, 1:] == 1) & (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])
    np.testing.assert_array_equal(mask, expected)
    assert 0 < mask.sum() < (batch["segment_ids"][:, 1:] != 0).sum()

    cfg = tiny_config(vocab_size=264, max_position_embeddings=512, num_hidden_layers=2, layer_types=[LIN, FULL])
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    hidden = jax.jit(lambda p, b: nnx.merge(graphdef, p).hidden_states(
        b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])[0])
    h, lm_head = hidden(params, b), model.lm_head[...]
    ce = lambda h: chunked_cross_entropy(h, lm_head, b["targets"], b["mask"].astype(jnp.float32), block_size=64)
    d_h = np.asarray(jax.grad(ce)(h))
    assert np.all(d_h[~mask] == 0.0)  # exactly zero, not merely small
    assert np.all(np.abs(d_h[mask]).sum(-1) > 0)

    # the training loss equals a float64 reference over the assistant targets only
    logits = np.asarray(jnp.einsum("btd,dv->btv", h, lm_head), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.asarray(b["targets"])
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    reference = nll[mask].sum()
    _, metrics = jax.jit(lambda p, bt: loss_fn(p, graphdef, bt, 0.0, jnp.float32(1.0)))(
        params, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(metrics["nll_sum"]), reference, rtol=1e-5)
    np.testing.assert_allclose(float(ce(h)), reference, rtol=1e-5)


def test_stdlib_example_is_fixed_valid_and_holds_out_whole_conversations(tmp_path):
    rows = conversations()
    assert rows == conversations() and len(rows) > 300
    asked = [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    assert len(set(asked)) == len(asked)  # every function in one row only: nothing held out leaks
    assert sum("tools" in r for r in rows) > 50 and sum(len(r["messages"]) == 4 and "tools" not in r for r in rows) > 50
    path = write_rows(tmp_path / "stdlib.jsonl", [json.dumps(r) for r in rows])
    pipe = ConversationPipeline([path], TOK, ChatTemplate(), seq_len=767, batch_size=2, val_fraction=0.1, seed=0,
                                truncate=True)
    assert not pipe.source.skipped and pipe.source.rows == len(rows)
    row_of = np.asarray(pipe.source.row_of)
    assert not set(row_of[pipe.train_idx]) & set(row_of[pipe.val_idx])
    assert len(set(row_of[pipe.val_idx])) == round(len(rows) / 10)


def test_sft_tiny_config_trains_evaluates_and_replies_through_the_chat_path(tmp_path):
    with pytest.raises(ConfigError, match="data_format must be one of"):
        load_train_config(ROOT / "configs/sft-tiny.yaml", ["data_format=chat"])
    with pytest.raises(ConfigError, match="long_conversations must be one of"):
        load_train_config(ROOT / "configs/sft-tiny.yaml", ["long_conversations=drop"])
    tcfg, mcfg = load_train_config(ROOT / "configs/sft-tiny.yaml", [
        f"run_dir={tmp_path}", "steps=2", "seq_len=255", "batch_size=2", "eval_every=2", "eval_batches=1",
        "sample_tokens=4", "save_every=2", "progress=false"])
    summary = run(tcfg, mcfg)
    assert np.isfinite(summary["val_loss"]) and summary["sample"].startswith(f"user: {tcfg.sample_prompt}\nassistant: ")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)
    assert (tmp_path / "stdlib_conversations.jsonl").is_file() and (tmp_path / "model" / "config.json").is_file()
