"""Streaming text out of generated token ids, and stop-string detection on that stream.

``IncrementalDetokenizer`` turns ids into text one at a time and never emits half a UTF-8 character: the
bytes of an incomplete character wait until it completes, and bytes that can never complete become U+FFFD
exactly where ``Tokenizer.decode`` would put it. ``StopChecker`` holds back text that could still turn into
a stop string, so a stop string split across tokens is caught and never shown.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from deltarun.processor.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """``add`` ids one by one; the concatenated outputs (plus ``flush``) equal ``tokenizer.decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []

    def add(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""
        self.ids.append(token_id)
        if token_id in self._skip:
            return ""
        data = self._tokenizer.id_to_token_bytes(token_id)
        return self._decoder.decode(data, final=False) if data else ""

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(i) for i in token_ids)

    def flush(self) -> str:
        """Text still held at the end: an unfinished character becomes U+FFFD."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an incomplete character waiting for the next token."""
        return self._decoder.getstate()[0]


class StopChecker:
    """Cut a text stream at the first stop string; the stop string itself is not emitted."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops: list[str] = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string has been reached)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, False
        first, which = -1, None
        for stop in self.stops:
            pos = buf.find(stop)
            if pos != -1 and (first == -1 or pos < first):
                first, which = pos, stop
        if which is not None:
            self.stopped, self.matched, self._held = True, which, ""
            return buf[:first], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Held-back text at the end of the stream (empty once stopped)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
