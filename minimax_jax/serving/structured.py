"""Constrained decoding: the tokens a request may sample next, from a grammar over the
tokenizer's vocabulary (llguidance), as a bool mask the engine applies to the logits.

A grammar is Lark text (llguidance's dialect, where `%json {schema}` is a JSON value valid
against a JSON schema); `json_grammar` builds one for `response_format`, and the chat formats
(`minimax_jax.serving.tools`) build one for forced tool calls. The grammar allows EOS only once
it is complete, so a constrained generation ends with EOS (or max_tokens) on text that the
grammar accepts, e.g. JSON that parses and validates.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

import numpy as np

from minimax_jax.tokenizer import Tokenizer

# JSON compiler options: no free whitespace between tokens (a model cannot pad forever)
JSON_OPTIONS = {"whitespace_flexible": False}


def json_value(schema: dict[str, Any]) -> str:
    """The Lark expression of one JSON value valid against `schema` (compact separators)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, separators=(",", ":"))


def json_grammar(schema: dict[str, Any]) -> str:
    """A grammar whose texts are exactly the JSON values valid against `schema`."""
    return f"start: {json_value(schema)}\n"


def lark_literal(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text)


class GrammarMask:
    """One request's position in a grammar: `allowed()` -> bool `[V]` (the model's V ids: ids
    past the tokenizer's are never allowed), `accept(token)` advances. When the grammar is in
    an error state (not expected: only allowed tokens are fed), only EOS is allowed."""

    def __init__(self, matcher, vocab_size: int, eos: int):
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos

    def allowed(self) -> np.ndarray:
        """bool `[V]`: the tokens the grammar allows next."""
        out = np.zeros(self.vocab_size, np.bool_)
        if self.matcher.is_error():
            out[self.eos] = True
            return out
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
        n = min(len(bits), self.vocab_size)
        out[:n] = bits[:n]
        return out

    def accept(self, token: int) -> None:
        """Advance past `token` (the one sampled)."""
        self.matcher.consume_token(token)


class Grammars:
    """Grammars over one tokenizer, for a model of `vocab_size` ids. The llguidance view of the
    vocabulary is built on first use (about a second for a 200k vocabulary), then shared."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._lltok = None

    def _vocabulary(self):
        import llguidance

        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self.tokenizer.hf_json(),
                                                     eos_token=self.tokenizer.eos_token_id)
            return self._lltok

    def check(self, grammar: str) -> None:
        """Raise ValueError with llguidance's message when `grammar` (Lark text) is invalid, e.g.
        holds an unsupported or contradictory JSON schema."""
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar),
                                                      self._vocabulary())
        if error:
            raise ValueError(error)

    def constraint(self, grammar: str) -> Callable[[], GrammarMask]:
        """A checked grammar -> a factory of fresh `GrammarMask`s (one per generated choice)."""
        import llguidance

        self.check(grammar)
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        vocabulary = self._vocabulary()
        return lambda: GrammarMask(llguidance.LLMatcher(vocabulary, compiled, log_level=0), self.vocab_size,
                                   self.tokenizer.eos_token_id)
