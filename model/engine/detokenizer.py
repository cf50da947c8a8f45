"""IncrementalDetokenizer: a growing token stream -> text deltas that are always whole UTF-8 characters.

Tokens are turned into raw bytes (`Tokenizer.token_bytes`) and fed to an incremental UTF-8 decoder,
so a character split across byte-fallback or byte-level BPE tokens is emitted only once complete:
a stream never shows U+FFFD for valid text. Stop strings are matched on the decoded text; any tail
that could still grow into a stop string is held back, and the stop string itself is never emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all decoded text (stop string and what follows it cut off once matched)
        self._emitted = 0  # chars of self.text already returned
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text that became safe to show."""
        if self.stopped_by is not None:
            return ""
        new = self._decoder.decode(self._token_bytes(token_id))
        if not new:
            return ""
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += new
        if self._stop:
            hit = self._find_stop(search_from)
            if hit is not None:
                index, stop = hit
                self.text = self.text[:index]
                self.stopped_by = stop
                return self.flush()
        return self._take(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Everything not yet emitted (call when the sequence finishes)."""
        if self.stopped_by is None:
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    # ----------------------------------------------------------------------------------- helpers
    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            i = self.text.find(stop, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
