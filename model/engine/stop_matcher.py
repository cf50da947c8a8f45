"""StopMatcher: find stop strings in a growing text, looking at each new character once.

An Aho-Corasick automaton over the stop strings. Its state is the longest tail of the text so far
that is a prefix of some stop string, so one `feed(new_text)` both finds the first stop string to be
completed and says how many trailing characters could still grow into one (`held_back`). The work
per token is O(new characters) amortized, whatever the text length or the stop strings' lengths;
rescanning the text (or testing every prefix of every stop string) per token is what it replaces.

    matcher = StopMatcher(["\\nUser:", "###"])
    matcher.feed("Hello\\nUs")   # -> None; matcher.held_back == 3 ("\\nUs" may become "\\nUser:")
    matcher.feed("er: hi")       # -> (4, "\\nUser:"): the stop ends at new_text[4]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._next: list[dict[str, int]] = [{}]  # trie edges: node -> {char: node}
        self._depth = [0]  # characters from the root = length of the prefix a node stands for
        self._stop: list[str | None] = [None]  # the longest stop string that ends at this node
        for stop in stops:
            self._insert(stop)
        self._fail = self._link()
        self._state = 0

    def _insert(self, stop: str) -> None:
        if not stop:
            raise ValueError("stop strings must be non-empty")
        node = 0
        for ch in stop:
            child = self._next[node].get(ch)
            if child is None:
                child = len(self._next)
                self._next[node][ch] = child
                self._next.append({})
                self._depth.append(self._depth[node] + 1)
                self._stop.append(None)
            node = child
        self._stop[node] = stop

    def _link(self) -> list[int]:
        """Failure links (breadth first): the longest proper suffix of a node's prefix that is also a
        prefix in the trie. A node with no stop of its own inherits the one its failure link ends."""
        fail = [0] * len(self._next)
        queue = deque(self._next[0].values())
        while queue:
            node = queue.popleft()
            for ch, child in self._next[node].items():
                f = fail[node]
                while f and ch not in self._next[f]:
                    f = fail[f]
                fail[child] = self._next[f].get(ch, 0)
                if self._stop[child] is None:
                    self._stop[child] = self._stop[fail[child]]
                queue.append(child)
        return fail

    def feed(self, text: str) -> tuple[int, str] | None:
        """Advance over `text`; at the first completed stop string return (index in `text` of its last
        character, the stop string) — the longest one if several end there — else None."""
        state, nxt, fail = self._state, self._next, self._fail
        for i, ch in enumerate(text):
            while state and ch not in nxt[state]:
                state = fail[state]
            state = nxt[state].get(ch, 0)
            if self._stop[state] is not None:
                self._state = state
                return i, self._stop[state]  # type: ignore[return-value]
        self._state = state
        return None

    @property
    def held_back(self) -> int:
        """Length of the longest tail of the text fed so far that is a proper prefix of a stop string."""
        return self._depth[self._state]
