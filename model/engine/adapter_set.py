"""AdapterSet: the serving models one engine runs side by side — the base model and one merged-weights
InferenceModel per LoRA adapter — keyed so a step's chunks can be grouped by the model they need.

Why versions: an adapter can be replaced (a training job publishes a better one) or removed while
sequences still decode on it. A sequence keeps the key it was admitted with (`acquire`), so it ends
on the weights whose K/V its cache slot holds; a name points at its newest key, and a key nobody
uses any more is dropped. Keys also separate prefix-cache entries (KV differs per adapter).
Plain Python, no locks: only the engine thread changes it; `served` is an immutable snapshot that
other threads (the server's routes) may read at any time.
"""

from __future__ import annotations

import itertools
from collections import Counter

from model.inference import InferenceModel

BASE = 0  # the key of the base model


class UnknownAdapter(LookupError):
    """A request named an adapter this engine does not serve."""

    def __init__(self, name: str, served: list[str]) -> None:
        listed = ", ".join(served) if served else "none"
        super().__init__(f"adapter {name!r} is not loaded (loaded adapters: {listed})")
        self.name = name


class AdapterSet:
    def __init__(self, base: InferenceModel) -> None:
        self.base = base
        self._models: dict[int, InferenceModel] = {BASE: base}
        self._current: dict[str, int] = {}  # name -> newest key
        self._users: Counter[int] = Counter()  # key -> sequences admitted on it, still unfinished
        self._keys = itertools.count(1)
        self.served: frozenset[str] = frozenset()  # the names new requests may use, replaced on change

    def names(self) -> list[str]:
        return sorted(self.served)

    def add(self, name: str, model: InferenceModel) -> None:
        """Serve `model` as `name` from the next request on (replacing an older version of it)."""
        base = self.base
        if model.config != base.config or model.cache_dtype != base.cache_dtype or model.device != base.device:
            raise ValueError(f"adapter {name!r}: its model does not match the base model's config, cache dtype "
                             "or device, so it cannot share the KV cache")
        old = self._current.get(name)
        key = next(self._keys)
        self._models[key] = model
        self._current[name] = key
        self.served = frozenset(self._current)
        if old is not None:
            self._drop_if_unused(old)

    def remove(self, name: str) -> bool:
        """Stop admitting requests for `name`; sequences already running on it finish. False if unknown."""
        key = self._current.pop(name, None)
        if key is None:
            return False
        self.served = frozenset(self._current)
        self._drop_if_unused(key)
        return True

    def acquire(self, name: str | None) -> int:
        """The key a new sequence for `name` (None: the base model) runs on; release it when done."""
        if name is None:
            return BASE
        key = self._current.get(name)
        if key is None:
            raise UnknownAdapter(name, self.names())
        self._users[key] += 1
        return key

    def release(self, key: int) -> None:
        if key == BASE:
            return
        self._users[key] -= 1
        if self._users[key] <= 0:
            del self._users[key]
            self._drop_if_unused(key)

    def model(self, key: int) -> InferenceModel:
        return self._models[key]

    def _drop_if_unused(self, key: int) -> None:
        if key != BASE and not self._users[key] and key not in self._current.values():
            self._models.pop(key, None)
