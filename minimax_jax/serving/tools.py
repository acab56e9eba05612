"""The MiniMax chat formats: how a conversation (with tools, tool calls and tool results) is
written for the model, the grammar of a forced tool call, and how the model's output splits
into reasoning, content and tool calls (incrementally, for streaming).

- Text-01 / VL-01 (`TEXT_01_FORMAT`): turns `<beginning_of_sentence>{role line}\\n{text}<end_of_sentence>\\n`;
  one `system function_setting=functions` turn per tool after the conversation; a call is
  `<function_call>` + a fenced `functions.NAME({json})`; a result is a `system
  function_response=functions` turn holding `{"name": ..., "response": ...}`.
- MiniMax-M1 (`M1_FORMAT`): `<begin_of_document>` first; the tools in a `system
  tool_setting=tools` turn after the system prompt; calls are a `<tool_calls>` block of one
  `{"name": ..., "arguments": {...}}` per line; results a `tool name=tools` turn; the answer
  starts with `<think>...</think>` reasoning, returned apart from the content (the tags never
  appear in either, and a `<tool_calls>` inside the reasoning is not a call).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from minimax_jax.config import M1, TEXT_01
from minimax_jax.serving.structured import json_value, lark_literal
from minimax_jax.tokenizer import BOS, EOS

ROLE_LINES = {"system": "system ai_setting=assistant", "user": "user name=user",
              "assistant": "ai name=assistant"}
GENERATION_PROMPT = f"{BOS}{ROLE_LINES['assistant']}\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
M1_DOCUMENT = "<begin_of_document>"
M1_TOOLS_INTRO = "You are provided with these tools:\n<tools>\n"
M1_TOOLS_OUTRO = ("</tools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, "
                  "and provide tool-name and json-object of arguments, following the format below:\n"
                  "<tool_calls>\n{\"name\": <tool-name-1>, \"arguments\": <args-json-object-1>}\n...\n</tool_calls>")


def dumps(value: Any) -> str:
    """JSON as the templates write it: `, ` and `: ` separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


@dataclasses.dataclass
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        """The OpenAI `tool_calls` entry (with `index`, as a streamed delta carries it)."""
        entry = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return entry if index is None else {"index": index, **entry}


@dataclasses.dataclass
class ChatDelta:
    """What a piece of output adds to the message: reasoning, content and whole tool calls."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def __add__(self, other: "ChatDelta") -> "ChatDelta":
        return ChatDelta(self.reasoning + other.reasoning, self.content + other.content,
                         self.tool_calls + other.tool_calls)


def parse_arguments(text: str) -> str | None:
    """`text` stripped when it is a JSON object, else None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return text.strip() if isinstance(value, dict) else None


def partial_tail(text: str, markers: list[str]) -> int:
    """The length of the longest end of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class ChatFormat:
    """A MiniMax chat format (see the module docstring); subclasses give the specifics.

    Messages are dicts: role system | user | assistant | tool, content (text), for an assistant
    message tool_calls ([{"name", "arguments" (JSON text)}]) and for a tool message the name of
    the function it answers. Functions are OpenAI function objects (name, description,
    parameters)."""

    model_type: str
    call_open: str  # where a tool-call section starts
    think: bool = False  # the output starts with a <think> block

    def render(self, messages: list[dict], functions: list[dict]) -> str:
        """The prompt text of a conversation offering `functions`, ending with the generation
        prompt."""
        raise NotImplementedError

    def render_calls(self, calls: list[dict]) -> str:
        """An assistant message's tool calls as the model writes them."""
        raise NotImplementedError

    def call_rules(self, functions: list[dict], parallel: bool) -> str:
        """Lark rules defining `calls`: one tool-call section (one call, or one or more when
        `parallel`) to one of `functions`, its arguments valid against the function's
        parameters schema."""
        raise NotImplementedError

    def parse_calls(self, section: str, final: bool) -> tuple[list[ToolCall], int, bool]:
        """The calls complete in `section` (text after `call_open`): (calls, characters used,
        whether the section closed there); `final`: the output ended."""
        raise NotImplementedError

    def parser(self, tools: bool, parallel: bool = True) -> "OutputParser":
        """A fresh parser of one output; `tools`: look for tool calls (only the first one
        unless `parallel`)."""
        return OutputParser(self, tools, parallel)


def arguments_schema(function: dict) -> dict:
    """The JSON schema a function's arguments must satisfy (an object when none is given)."""
    return function.get("parameters") or {"type": "object"}


class Text01Format(ChatFormat):
    model_type = TEXT_01
    call_open = "<function_call>"
    _fence = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
    _call = re.compile(r"^\s*(?:functions\.)?([A-Za-z0-9_.\-]+)\((.*)\)\s*$", re.DOTALL)

    def render(self, messages: list[dict], functions: list[dict]) -> str:
        turns = []
        for m in messages:
            if m["role"] == "tool":
                response = dumps({"name": m["name"], "response": m["content"]})
                turns.append(f"{BOS}system function_response=functions\n{response}{EOS}\n")
            else:
                text = m["content"] + self.render_calls(m.get("tool_calls") or [])
                turns.append(f"{BOS}{ROLE_LINES[m['role']]}\n{text}{EOS}\n")
        turns += [f"{BOS}system function_setting=functions\n{dumps(f)}{EOS}\n" for f in functions]
        return "".join(turns) + GENERATION_PROMPT

    def render_calls(self, calls: list[dict]) -> str:
        return "".join(f"{self.call_open}```typescript\nfunctions.{c['name']}({c['arguments']})\n```" for c in calls)

    def call_rules(self, functions: list[dict], parallel: bool) -> str:
        names = [f"fn{i}" for i in range(len(functions))]
        rules = [f"calls: call{'+' if parallel else ''}",
                 f"call: {lark_literal(self.call_open + '```typescript' + chr(10) + 'functions.')} "
                 f"({' | '.join(names)}) {lark_literal(')' + chr(10) + '```')}"]
        rules += [f"{n}: {lark_literal(f['name'] + '(')} {json_value(arguments_schema(f))}"
                  for n, f in zip(names, functions)]
        return "\n".join(rules) + "\n"

    def parse_calls(self, section: str, final: bool) -> tuple[list[ToolCall], int, bool]:
        calls, used = [], 0
        for match in self._fence.finditer(section):
            used = match.end()
            call = self._call.match(match.group(1))
            if call and (args := parse_arguments(call.group(2))) is not None:
                calls.append(ToolCall(call.group(1), args))
        if final and (call := self._call.match(section[used:].replace(self.call_open, ""))):
            if (args := parse_arguments(call.group(2))) is not None:  # a call written without its fence
                calls.append(ToolCall(call.group(1), args))
                used = len(section)
        return calls, used, False


class M1Format(ChatFormat):
    model_type = M1
    call_open, call_close = "<tool_calls>", "</tool_calls>"
    think = True

    def render(self, messages: list[dict], functions: list[dict]) -> str:
        parts = [M1_DOCUMENT]
        rest = messages
        if messages and messages[0]["role"] == "system":
            parts.append(f"{BOS}{ROLE_LINES['system']}\n{messages[0]['content']}{EOS}\n")
            rest = messages[1:]
        if functions:
            lines = "".join(dumps(f) + "\n" for f in functions)
            parts.append(f"{BOS}system tool_setting=tools\n{M1_TOOLS_INTRO}{lines}{M1_TOOLS_OUTRO}{EOS}\n")
        for i, m in enumerate(rest):
            if m["role"] == "tool":
                opens = i == 0 or rest[i - 1]["role"] != "tool"
                closes = i == len(rest) - 1 or rest[i + 1]["role"] != "tool"
                parts.append((f"{BOS}tool name=tools\n" if opens else "")
                             + f"tool name: {m['name']}\ntool result: {m['content']}\n\n"
                             + (f"{EOS}\n" if closes else ""))
            else:
                text = m["content"] + self.render_calls(m.get("tool_calls") or [])
                parts.append(f"{BOS}{ROLE_LINES[m['role']]}\n{text}{EOS}\n")
        return "".join(parts) + GENERATION_PROMPT

    def render_calls(self, calls: list[dict]) -> str:
        if not calls:
            return ""
        lines = "".join(dumps({"name": c["name"], "arguments": json.loads(c["arguments"])}) + "\n" for c in calls)
        return f"{self.call_open}\n{lines}{self.call_close}"

    def call_rules(self, functions: list[dict], parallel: bool) -> str:
        one = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                            "arguments": arguments_schema(f)},
                          "required": ["name", "arguments"], "additionalProperties": False} for f in functions]}
        more = f' ({lark_literal(chr(10))} call)*' if parallel else ""
        return (f"calls: {lark_literal(self.call_open + chr(10))} call{more} {lark_literal(chr(10) + self.call_close)}\n"
                f"call: {json_value(one)}\n")

    def parse_calls(self, section: str, final: bool) -> tuple[list[ToolCall], int, bool]:
        end = section.find(self.call_close)
        closed = end >= 0
        body = section[:end] if closed else section
        calls, used, pending = [], 0, ""
        for line in body.splitlines(keepends=True):
            if not line.endswith("\n") and not (closed or final):
                break  # an unfinished line
            pending += line
            used += len(line)
            if not pending.strip():
                pending = ""
                continue
            try:
                value = json.loads(pending)
            except json.JSONDecodeError:
                continue  # a call may span lines
            pending = ""
            if isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("arguments"), dict):
                calls.append(ToolCall(value["name"], dumps(value["arguments"])))
        used -= len(pending)
        if closed and not pending:
            used = end + len(self.call_close)
        return calls, used, closed and not pending


TEXT_01_FORMAT, M1_FORMAT = Text01Format(), M1Format()
FORMATS = {f.model_type: f for f in (TEXT_01_FORMAT, M1_FORMAT)}


def chat_format(model_type: str) -> ChatFormat:
    """The chat format of a model type ("minimax" or "minimax_m1")."""
    return FORMATS[model_type]


class OutputParser:
    """Splits one output into reasoning, content and tool calls as it arrives: `feed(text)`
    and, at the end, `finish()` each return a `ChatDelta`. Text that may be the start of a
    marker (`<think>`, `</think>`, the call section's opening) is held back until it is known;
    a tool call is released whole, once complete. A call section that holds no valid call is
    returned as content, as written."""

    def __init__(self, fmt: ChatFormat, tools: bool, parallel: bool = True):
        self.fmt, self.tools, self.parallel = fmt, tools, parallel
        self.state = "start" if fmt.think else "content"
        self.buf = ""
        self.calls = 0  # tool calls released
        self.section, self.section_calls = "", 0  # the current call section's text used, its calls
        self.strip = False  # drop the whitespace that opens the reasoning or follows it
        markers = [THINK_OPEN, THINK_CLOSE] if fmt.think else []
        self.markers = markers + ([fmt.call_open] if tools else [])

    def feed(self, text: str) -> ChatDelta:
        """Add output text; returns what is known of the message now."""
        self.buf += text
        return self._run(final=False)

    def finish(self) -> ChatDelta:
        """The output ended: everything still held back."""
        return self._run(final=True)

    def _take_calls(self, calls: list[ToolCall], out: ChatDelta) -> None:
        for call in calls:
            self.section_calls += 1
            if self.parallel or self.calls == 0:
                out.tool_calls.append(call)
                self.calls += 1

    def _run(self, final: bool) -> ChatDelta:
        out = ChatDelta()
        while True:
            if self.state == "start":
                if self.buf.startswith(THINK_OPEN):
                    self.buf, self.state, self.strip = self.buf[len(THINK_OPEN):], "reasoning", True
                elif THINK_OPEN.startswith(self.buf) and not final:
                    return out
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if self.strip:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        return out
                    self.strip = False
                end = self.buf.find(THINK_CLOSE)
                if end >= 0:
                    out.reasoning += self.buf[:end]
                    self.buf, self.state, self.strip = self.buf[end + len(THINK_CLOSE):], "content", True
                    continue
                keep = 0 if final else partial_tail(self.buf, [THINK_CLOSE])
                out.reasoning += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            elif self.state == "content":
                if self.strip:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        return out
                    self.strip = False
                hits = [(i, m) for m in self.markers if (i := self.buf.find(m)) >= 0]
                if hits:
                    i, marker = min(hits)
                    out.content += self.buf[:i]
                    self.buf = self.buf[i + len(marker):]
                    if marker == self.fmt.call_open:
                        self.state, self.section, self.section_calls = "calls", "", 0
                    continue
                keep = 0 if final else partial_tail(self.buf, self.markers)
                out.content += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            else:  # calls
                calls, used, closed = self.fmt.parse_calls(self.buf, final)
                self._take_calls(calls, out)
                self.section += self.buf[:used]
                self.buf = self.buf[used:]
                if closed:
                    self.state = "content"
                    continue
                if final and self.buf.strip():
                    if self.section_calls == 0:  # not a call after all: the text as written
                        out.content += self.fmt.call_open + self.section + self.buf
                    self.buf = ""
                return out
