"""Forcing what a served model generates: the engine's steps run and sample as usual, then each
slot's token is replaced by the next token of a script (EOS once it is spent), so tests of
output parsing (tool calls, reasoning) see exactly the text they set."""

from __future__ import annotations

import dataclasses

import numpy as np

from minimax_jax.serving.engine import Engine
from minimax_jax.serving.sampling import Sampled
from minimax_jax.tokenizer import Tokenizer


class ScriptedOutput:
    """Installed on `engine`'s steps; `text` None lets the model generate freely."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.ids: list[int] | None = None
        steps = engine.steps
        self._prefill, self._decode = steps.prefill, steps.decode
        steps.prefill, steps.decode = self.prefill, self.decode

    def set(self, text: str | None) -> None:
        """Every request generates `text` then EOS (None: the model's own tokens)."""
        self.ids = None if text is None else [*self.tokenizer.encode(text), self.tokenizer.eos_token_id]

    def _force(self, sampled: Sampled, slots) -> Sampled:
        if self.ids is None:
            return sampled
        token = np.array(sampled.token)
        for row, slot in enumerate(slots):
            request = self.engine._slots[int(slot)]
            if request is not None:
                token[row] = self.ids[min(len(request.generated), len(self.ids) - 1)]
        return dataclasses.replace(sampled, token=token)

    def prefill(self, rows, tokens, mask, active, sampling, targets=None, images=None):
        sampled, scores = self._prefill(rows, tokens, mask, active, sampling, targets, images)
        return self._force(sampled, np.asarray(rows)), scores

    def decode(self, tokens, running, protect_rows, protect, sampling):
        return self._force(self._decode(tokens, running, protect_rows, protect, sampling),
                           range(self.engine.max_batch))
