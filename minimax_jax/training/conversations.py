"""Conversations for supervised fine-tuning: OpenAI-style `messages` rows rendered with the
model's chat template, with a per-token loss mask that is 1 on the assistant's replies only.

A `.jsonl` row is `{"messages": [...], "tools": [...]}` (tools optional). A message has a `role`
(system, developer (= system), user, assistant, tool) and `content`: text, a list of text parts
(`{"type": "text", "text": ...}`) or, for an assistant that calls tools, null. An assistant's
`tool_calls` are OpenAI's (`{"id", "type": "function", "function": {"name", "arguments"}}`, the
arguments a JSON object or its text); a tool message answers one by `tool_call_id` (or names the
function in `name`). An assistant message with `"weight": 0` is context, not trained on.

Each assistant turn is trained in exactly the text the server gives the model for it: the
template's prompt for the messages before it (`ChatTemplate.render`, ending with the generation
prompt), then its reply (the text the template writes from there to the end of the turn). Where
the template writes the earlier turns the same way in the next turn's prompt (the usual case),
all turns of a conversation are one example; where it does not (Text-01's format puts the tool
definitions after the conversation), the turn starts a new example of its own.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from minimax_jax.generate import generate
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.serving.chat import ROLE_ALIASES, ROLES, ChatTemplate, load_template_source
from minimax_jax.serving.tools import chat_format, dumps, parse_arguments
from minimax_jax.tokenizer import Tokenizer
from minimax_jax.training.data import DataPipeline, split_indices

log = logging.getLogger("minimax_jax.training")

# Why a row is skipped (the counters of `ConversationSource.skipped`).
INVALID_JSON, UNKNOWN_ROLE, INVALID, NO_ASSISTANT, TEMPLATE = (
    "invalid_json", "unknown_role", "invalid_conversation", "no_assistant_tokens", "template_failed")


class ConversationError(ValueError):
    """A row that cannot be trained on; `reason` is one of the skip counters above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_row(line: bytes | str) -> tuple[list[dict], list[dict] | None]:
    """One `.jsonl` row -> (messages as `ChatTemplate.render` takes them, OpenAI tools or None).
    ConversationError (reason invalid_json, unknown_role or invalid_conversation) says what is
    wrong, naming the message by its index."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversationError(INVALID_JSON, f"invalid JSON: {getattr(e, 'msg', e)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ConversationError(INVALID, "expected a JSON object with a list 'messages'")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools)):
        raise ConversationError(INVALID, "'tools' must be a list of OpenAI tools "
                                "({\"type\": \"function\", \"function\": {\"name\", ...}})")
    messages, called = [], {}
    for i, m in enumerate(record["messages"]):
        messages.append(_message(m, f"messages[{i}]", called))
    return messages, tools or None


def _message(m: Any, where: str, called: dict[str, str]) -> dict:
    """One OpenAI message -> the dict `ChatTemplate.render` takes; `called` maps the ids of the
    tool calls made so far to their function names (updated)."""
    if not isinstance(m, dict):
        raise ConversationError(INVALID, f"{where} is not a JSON object")
    role = m.get("role")
    if ROLE_ALIASES.get(role, role) not in ROLES:
        raise ConversationError(UNKNOWN_ROLE, f"{where}: unknown role {role!r}; expected one of "
                                f"{sorted(ROLES + tuple(ROLE_ALIASES))}")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ConversationError(INVALID, f"{where}.content: only text parts "
                                    "({\"type\": \"text\", \"text\": ...}) "
                                    "are supported")
        content = "".join(p["text"] for p in content)
    elif content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ConversationError(INVALID, f"{where}.content must be text or a list of text parts")
    out: dict[str, Any] = {"role": role, "content": content}
    if "weight" in m:
        if m["weight"] not in (0, 1) or role != "assistant":
            raise ConversationError(INVALID, f"{where}.weight must be 0 or 1, on an assistant message")
        out["weight"] = int(m["weight"])
    calls = m.get("tool_calls") or []
    if calls and role != "assistant":
        raise ConversationError(INVALID, f"{where}: only assistant messages make tool calls")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ConversationError(INVALID, f"{where}.tool_calls[{j}] needs function.name")
        args = fn.get("arguments", "{}")
        args = dumps(args) if isinstance(args, dict) else args
        if not isinstance(args, str) or parse_arguments(args) is None:
            raise ConversationError(INVALID, f"{where}.tool_calls[{j}].function.arguments is not a JSON object")
        call_id = call.get("id") or f"call_{len(called)}"
        out.setdefault("tool_calls", []).append({"id": call_id, "name": fn["name"], "arguments": args})
        called[call_id] = fn["name"]
    if role == "tool":
        name = called.get(m.get("tool_call_id")) or m.get("name")
        if not isinstance(name, str):
            raise ConversationError(INVALID, f"{where}: a tool message needs the tool_call_id of an earlier call "
                                    "(or the function's name)")
        out.update(name=name, tool_call_id=m.get("tool_call_id"))
    return out


def render_examples(template: ChatTemplate, messages: list[dict],
                    tools: list[dict] | None = None) -> list[list[tuple[str, bool]]]:
    """A conversation -> its training examples, each a list of (text, trained) pieces whose
    concatenation is the example's text; trained pieces are the assistant replies (see the
    module docstring). ConversationError: no_assistant_tokens when no assistant message is
    trained on, template_failed when the template rejects the conversation or does not write
    an assistant reply after its prompt."""
    examples: list[list[tuple[str, bool]]] = []
    text = ""
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m.get("weight", 1) == 0:
                continue
            prompt = template.render(messages[:i], tools)
            before = template.render(messages[:i])
            through = template.render(messages[: i + 1], add_generation_prompt=False)
            if not through.startswith(before):
                raise ConversationError(TEMPLATE, f"messages[{i}]: the chat template does not write this assistant "
                                        "message after the prompt it gives for it")
            reply = through[len(before):]
            if examples and prompt.startswith(text):
                examples[-1].append((prompt[len(text):], False))
            else:
                examples.append([(prompt, False)])
            examples[-1].append((reply, True))
            text = prompt + reply
    except ValueError as e:  # the template's own error, or a ConversationError already
        raise e if isinstance(e, ConversationError) else ConversationError(TEMPLATE, str(e)) from None
    if not examples:
        raise ConversationError(NO_ASSISTANT, "no assistant message to train on")
    return examples


def encode_example(pieces: list[tuple[str, bool]], tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """(text, trained) pieces -> {"tokens", "loss_mask"} int32 `[n]`: each piece encoded on its
    own (so the mask follows token boundaries exactly), loss_mask 1 on the tokens of trained
    pieces."""
    ids = [tokenizer.encode(text) for text, _ in pieces]
    mask = [np.full(len(part), trained, np.int32) for part, (_, trained) in zip(ids, pieces)]
    return {"tokens": np.asarray([t for part in ids for t in part], np.int32),
            "loss_mask": np.concatenate(mask) if mask else np.zeros(0, np.int32)}


class ConversationSource:
    """Random access to the training examples of `.jsonl` conversation files. Every row is
    parsed, rendered and encoded once at start-up: one that cannot be trained on (not JSON, an
    unknown role, a malformed message, no assistant reply, a template that rejects it) is logged
    with its file and line and skipped, counted in `skipped` by reason. An example longer than
    `max_tokens` is counted in `long`; with `truncate` it keeps its first `max_tokens` tokens
    (the tokens cut counted in `truncated_tokens`; one left with no assistant token is skipped,
    counted as no_assistant_tokens_after_truncation).

    `source[i]` -> {"tokens", "loss_mask"} int32 `[n]`; `row_of[i]`: the conversation (valid
    row, numbered from 0) example i comes from.
    """

    LOGGED = 100  # rows skipped with a message of their own; the rest are counted only

    def __init__(self, files: Sequence[Path], template: ChatTemplate, tokenizer: Tokenizer, *,
                 max_tokens: int, truncate: bool):
        self.template, self.tokenizer, self.max_tokens, self.truncate = template, tokenizer, max_tokens, truncate
        self._examples: list[tuple[Path, int, int]] = []  # file, byte offset of the row, example in the row
        self.row_of: list[int] = []
        self.skipped: Counter[str] = Counter()
        self.problems: list[str] = []
        self.rows = self.long = self.truncated_tokens = 0
        for f in files:
            if f.suffix != ".jsonl":
                raise ValueError(f"{f}: conversations are read from .jsonl files "
                                 "(one {\"messages\": [...]} per line)")
            with f.open("rb") as fh:
                offset = 0
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        self._index(f, number, offset, line)
                    offset += len(line)
        if self.skipped:
            total = sum(self.skipped.values())
            log.warning("skipped %d conversation rows / examples: %s%s", total, dict(self.skipped),
                        f" (the first {self.LOGGED} named above)" if total > self.LOGGED else "")

    def _index(self, path: Path, number: int, offset: int, line: bytes) -> None:
        """Render one row and record its examples (or why it is skipped)."""
        try:
            examples = [encode_example(p, self.tokenizer) for p in render_examples(self.template, *parse_row(line))]
        except ConversationError as e:
            self._skip(e.reason, f"{path} line {number}: {e}")
            return
        kept = 0
        for k, ex in enumerate(examples):
            n = len(ex["tokens"])
            if n > self.max_tokens:
                self.long += 1
                if self.truncate:
                    self.truncated_tokens += n - self.max_tokens
                    if not ex["loss_mask"][: self.max_tokens].any():
                        self._skip(f"{NO_ASSISTANT}_after_truncation",
                                   f"{path} line {number}: example {k} has no assistant token in its first "
                                   f"{self.max_tokens} tokens")
                        continue
            self._examples.append((path, offset, k))
            self.row_of.append(self.rows)
            kept += 1
        self.rows += kept > 0

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.problems) < self.LOGGED:
            self.problems.append(message)
            log.warning("%s (skipped)", message)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path, offset, k = self._examples[index]
        with path.open("rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        ex = encode_example(render_examples(self.template, *parse_row(line))[k], self.tokenizer)
        if self.truncate:
            ex = {key: v[: self.max_tokens] for key, v in ex.items()}
        return ex

    def describe(self) -> str:
        """One line: what was read, skipped, too long and what happened to it."""
        long = (f"; {self.long} longer than a row of {self.max_tokens} tokens "
                + (f"(truncated: {self.truncated_tokens} tokens cut)" if self.truncate else "(split across rows)"))
        return (f"{len(self)} examples from {self.rows} conversations"
                + (f"; skipped {dict(self.skipped)}" if self.skipped else "") + long)


class ConversationPipeline(DataPipeline):
    """Train and validation iterators over conversations: rows {"tokens", "segment_ids",
    "positions", "loss_mask"} int32 `[batch, seq_len + 1]`. Whole conversations are held out
    (`val_fraction` of them). With `truncate` every example sits whole in one row (an over-long
    one cut to seq_len + 1 tokens); otherwise examples are packed end to end and a long one
    continues in the next row."""

    def __init__(self, files: Sequence[Path], tokenizer: Tokenizer, template: ChatTemplate, *, seq_len: int,
                 batch_size: int, val_fraction: float, seed: int, truncate: bool):
        self.source = ConversationSource(files, template, tokenizer, max_tokens=seq_len + 1, truncate=truncate)
        rows = np.asarray(self.source.row_of, np.int64)
        train_rows, val_rows = split_indices(self.source.rows, val_fraction)
        self.train_idx = np.flatnonzero(np.isin(rows, train_rows))
        self.val_idx = np.flatnonzero(np.isin(rows, val_rows))
        self.summary = (f"{len(files)} conversation file(s): {self.source.describe()}; {len(val_rows)} conversations "
                        f"({len(self.val_idx)} examples) held out for validation")
        self._start(self.source.__getitem__, seq_len=seq_len, batch_size=batch_size, seed=seed,
                    features=("tokens", "loss_mask"), whole=truncate)


def sample_reply(model: MiniMaxForCausalLM, tokenizer: Tokenizer, template: ChatTemplate, question: str, n: int,
                 seed: int) -> str:
    """The model's reply (at most `n` tokens, temperature 0.8, top_p 0.95) to one user message,
    as the server makes it: the chat template's prompt, `generate` until the end-of-sentence
    token, the output read in the model's chat format (its content: M1's reasoning left out, a
    tool call left as written)."""
    prompt = tokenizer.encode(template.render([{"role": "user", "content": question}]))
    out = generate(model, jnp.asarray([prompt], jnp.int32), n, temperature=0.8, top_p=0.95, seed=seed,
                   eos_token_id=tokenizer.eos_token_id)
    new = [int(t) for t in np.asarray(out[0])]
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    parser = template.format.parser(tools=False)
    return (parser.feed(tokenizer.decode(new)) + parser.finish()).content


def training_template(init_from: str | None, tokenizer: str | None, model_type: str) -> ChatTemplate:
    """The chat template conversations are rendered with, and the sample reply uses: the one
    shipped in `init_from`'s directory, else in the tokenizer's (`tokenizer`: a tokenizer.json
    or its directory), else the model's MiniMax chat format (by `model_type`)."""
    tokenizer_dir = None
    if tokenizer is not None:
        tokenizer_dir = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
    for directory in (init_from, tokenizer_dir):
        if directory is not None and load_template_source(directory) is not None:
            return ChatTemplate.from_dir(directory, chat_format(model_type))
    return ChatTemplate(format=chat_format(model_type))
