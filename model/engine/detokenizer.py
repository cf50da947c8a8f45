"""IncrementalDetokenizer: a growing token stream -> text deltas that are always whole UTF-8 characters.

Tokens are turned into raw bytes (`Tokenizer.token_bytes`) and fed to an incremental UTF-8 decoder,
so a character split across byte-fallback or byte-level BPE tokens is emitted only once complete:
a stream never shows U+FFFD for valid text. Stop strings are matched on the decoded text; any tail
that could still grow into a stop string is held back, and the stop string itself is never emitted.
The first stop string to be completed wins (the longest, if several end at the same character), so
the cut does not depend on where the token boundaries fall; matching costs O(new characters) per
token (`StopMatcher`), not a rescan of the text.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

from model.engine.stop_matcher import StopMatcher


class IncrementalDetokenizer:
    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = StopMatcher(stop) if stop else None
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
        start = len(self.text)
        self.text += new
        if self._matcher is None:
            return self._take(len(self.text))
        hit = self._matcher.feed(new)
        if hit is not None:
            last, stop = hit
            self.text = self.text[:start + last + 1 - len(stop)]
            self.stopped_by = stop
            return self.flush()
        return self._take(len(self.text) - self._matcher.held_back)

    def flush(self) -> str:
        """Everything not yet emitted (call when the sequence finishes)."""
        if self.stopped_by is None:
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    # ----------------------------------------------------------------------------------- helpers
    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
