"""Incremental detokenization with stop strings: turn a growing list of token ids into text
deltas, never emitting half a UTF-8 character or the start of what may become a stop string."""

from __future__ import annotations

from minimax_jax.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to, for now


class TextStream:
    """Text of one request's generated tokens, released as it becomes final.

    `push(token)` -> (new text, stopped): stopped when the text now contains one of `stop`; the
    text is then cut before the stop string, which is never emitted. `flush()` releases what was
    held back (a trailing partial character or a partial stop string) at the end.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already released
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token id; returns (text released now, whether a stop string was hit)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hit = self._first_stop()
        if hit is not None:
            delta = self.text[self.emitted:hit]
            self.text, self.emitted = self.text[:hit], hit
            return delta, True
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == REPLACEMENT:
            end -= 1
        end -= self._partial_stop(end)
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta, False

    def flush(self) -> str:
        """Release everything not yet emitted (at the end of generation)."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _first_stop(self) -> int | None:
        """Index of the earliest stop string that starts in text not yet emitted, or None."""
        hits = [i for s in self.stop if (i := self.text.find(s, self.emitted)) >= 0]
        return min(hits, default=None)

    def _partial_stop(self, end: int) -> int:
        """Length of the longest tail of text[emitted:end] that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.emitted), best, -1):
                if self.text.endswith(s[:k], 0, end):
                    best = k
                    break
        return best
