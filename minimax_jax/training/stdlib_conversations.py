"""The embedded fine-tuning example: conversations about the running interpreter's standard
library (questions about its functions answered from their docstrings and signatures), written
as a `.jsonl` file of OpenAI-style `messages` rows. Nothing is downloaded.

Three shapes, chosen per function in a fixed order: a question answered from the docstring's
first paragraph (with or without a system prompt); a question answered after a tool call that
looks the signature up (`tools` offered, an assistant `tool_calls`, a `tool` result); and two
questions in one conversation.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

MODULES = ("base64", "binascii", "bisect", "builtins", "calendar", "codecs", "colorsys", "contextlib", "copy",
           "csv", "datetime", "difflib", "fnmatch", "functools", "glob", "gzip", "heapq", "html", "inspect",
           "ipaddress", "itertools", "json", "keyword", "locale", "math", "operator", "os", "os.path", "platform",
           "pprint", "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tarfile",
           "tempfile", "textwrap", "time", "traceback", "unicodedata", "urllib.parse", "uuid", "warnings",
           "zipfile", "zlib")
TYPES = (str, bytes, list, dict, set, tuple, int, float)  # their methods too, as `str.split`
SYSTEM = "You answer questions about the Python standard library briefly."
QUESTIONS = ("What does `{name}` do?", "Explain `{name}`.", "What is `{name}` for?",
             "Tell me about `{name}`.", "In Python, what does `{name}` do?")
SIGNATURE_TOOL = {"type": "function", "function": {
    "name": "signature", "description": "Signature of a function",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
MAX_ANSWER = 200  # characters of docstring per answer


def stdlib_functions() -> list[tuple[str, str, str]]:
    """(qualified name, signature text or "", first docstring paragraph) of the public functions
    of MODULES and the methods of TYPES that have a docstring, sorted by name; a paragraph that
    two names share (a function exported twice) is kept once, under the first name."""
    spaces = [(m, vars(importlib.import_module(m))) for m in MODULES] + [(t.__name__, vars(t)) for t in TYPES]
    found, seen = [], set()
    for prefix, names in spaces:
        for name, fn in sorted(names.items()):
            if name.startswith("_") or not callable(fn) or inspect.isclass(fn) or not inspect.getdoc(fn):
                continue
            paragraph = " ".join(inspect.getdoc(fn).split("\n\n")[0].split())[:MAX_ANSWER]
            if paragraph in seen:
                continue
            seen.add(paragraph)
            try:
                signature = f"{prefix}.{name}{inspect.signature(fn)}"
            except (TypeError, ValueError):
                signature = ""
            found.append((f"{prefix}.{name}", signature, paragraph))
    return sorted(found)


def _question(name: str, i: int) -> dict:
    return {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(name=name)}


def conversations() -> list[dict]:
    """The example's rows ({"messages"} and, for the tool-call shape, "tools"), in a fixed order;
    each function appears in one row only."""
    functions = stdlib_functions()
    rows, i = [], 0
    while i < len(functions):
        name, signature, doc = functions[i]
        if i % 4 == 1 and signature:
            call = {"id": f"call_{i}", "type": "function",
                    "function": {"name": "signature", "arguments": json.dumps({"name": name})}}
            rows.append({"tools": [SIGNATURE_TOOL], "messages": [
                {"role": "user", "content": f"How do I call `{name}`?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": signature},
                {"role": "assistant", "content": f"Call it as `{signature}`. {doc}"}]})
        elif i % 4 == 3 and i + 1 < len(functions):
            other, _, other_doc = functions[i + 1]
            rows.append({"messages": [_question(name, i), {"role": "assistant", "content": doc},
                                      _question(other, i + 1), {"role": "assistant", "content": other_doc}]})
            i += 1
        else:
            system = [{"role": "system", "content": SYSTEM}] if i % 2 == 0 else []
            rows.append({"messages": [*system, _question(name, i), {"role": "assistant", "content": doc}]})
        i += 1
    return rows


def write_conversations(path: str | Path) -> Path:
    """Write `conversations()` to `path` as .jsonl (one row per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in conversations()))
    os.replace(staging, path)  # the processes of a job write the same file: each replaces it whole
    return path
