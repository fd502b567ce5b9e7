"""Streaming text out of tokens: incremental detokenization and stop strings that never leak."""

from __future__ import annotations

from typing import Callable, Sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, never emitting half of a UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        # Decode a window that starts one token back, so tokenizers that treat a leading space specially agree.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty while a character is still partial)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            piece = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left undecoded at the end (a dangling partial character decodes to U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]


class StopStringMatcher:
    """Holds back text that could still become a stop string; reports when one is complete."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add decoded text; return what is safe to emit. After a stop string, `stopped` is True."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        keep = self._held_suffix_length()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """Release held-back text at the end of generation (it never became a stop string)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _held_suffix_length(self) -> int:
        text = self._pending
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
