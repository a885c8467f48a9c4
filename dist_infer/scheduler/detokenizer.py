"""Incremental detokenization and stop strings, per request.

Decoding the whole output every step is O(n^2) in the output length. Instead
each new token is decoded within a short window: the text of
ids[prefix:read] is already known, the text of ids[prefix:] is decoded, and
the difference is the new text. A window ending in an incomplete UTF-8
character (U+FFFD) waits for the next token.

With stop strings, the last len(longest stop) - 1 characters are held back
from the stream until the request finishes, so a stop string that spans two
tokens is never half-streamed: streamed text always equals the final text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.text_ends: list[int] = []  # len(text) after each token
        self.prefix = self.read = 0
        self.emitted = 0                # characters of text already returned to the stream
        self.stopped_at: int | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> None:
        """Append one token; afterwards `stopped_at` is set if a stop string appeared."""
        self.ids.append(token_id)
        known = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        before = len(self.text)
        if len(window) > len(known) and not window.endswith(REPLACEMENT):
            self.text += window[len(known):]
            self.prefix, self.read = self.read, len(self.ids)
        self.text_ends.append(len(self.text))
        if len(self.text) > before:
            self._check_stop(before)

    def _check_stop(self, before: int) -> None:
        if not self.stop or self.stopped_at is not None:
            return
        start = max(0, before - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped_at = min(hits)
            self.text = self.text[:self.stopped_at]

    def _flush(self) -> None:
        """At the end, tokens still waiting for the rest of a character are decoded as they are."""
        if self.stopped_at is None and self.read < len(self.ids):
            known = self._decode(self.ids[self.prefix:self.read])
            before = len(self.text)
            self.text += self._decode(self.ids[self.prefix:])[len(known):]
            self.prefix = self.read = len(self.ids)
            self._check_stop(before)

    def delta(self, finished: bool) -> str:
        """New text for the stream since the last call (all of it once finished)."""
        if finished:
            self._flush()
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def ids_before_stop(self) -> int:
        """How many leading tokens lie wholly before the stop string: the stop
        string's tokens are cut from the output ids, as from the text."""
        if self.stopped_at is None:
            return len(self.ids)
        return next((i for i, end in enumerate(self.text_ends) if end > self.stopped_at), len(self.ids))
