"""CacheManager: which KV-cache slot each sequence owns, and which token prefixes each slot holds.

Plain Python, no torch: the runner does the tensor work it asks for. A slot keeps the ids of the
tokens whose K/V it holds even after its sequence finishes, so a new prompt that starts with the same
tokens (a customer-service bot's long system prompt) reuses them instead of recomputing them:
  * a free slot whose tokens share a prefix with the prompt is handed over as is;
  * a prefix held by a busy slot is copied into the new slot (`AllocatedSlot.copy_from`).
Prefixes are matched only between sequences of the same model (`key`: a base model or an adapter's
merged weights give the same tokens different K/V).
A paged cache could replace this class without touching the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AllocatedSlot:
    slot: int
    cached_tokens: int  # leading prompt tokens whose K/V are already valid in `slot`
    copy_from: int | None = None  # copy positions [0, cached_tokens) from this slot first


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CacheManager:
    def __init__(self, n_slots: int, max_seq_len: int, enable_prefix_caching: bool = True,
                 min_prefix: int = 16) -> None:
        self.n_slots, self.max_seq_len = n_slots, max_seq_len
        self.enable_prefix_caching = enable_prefix_caching
        self.min_prefix = min_prefix  # shorter matches are not worth a copy
        self._free: list[int] = list(range(n_slots))
        self._contents: list[list[int]] = [[] for _ in range(n_slots)]  # valid K/V token ids per slot
        self._keys: list[int] = [0] * n_slots  # the model whose K/V each slot holds
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.prefix_tokens_reused = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.n_slots - len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self, prompt_ids: list[int], key: int = 0) -> AllocatedSlot:
        """A slot for a sequence of model `key`, with the longest reusable prefix of `prompt_ids`."""
        assert self._free, "allocate() without a free slot"
        # at least one prompt token is always computed: its logits give the first output token
        limit = len(prompt_ids) - 1
        best_free, best_free_len = min(self._free), 0
        best_busy, best_busy_len = None, 0
        if self.enable_prefix_caching and limit > 0:
            free = set(self._free)
            for slot, tokens in enumerate(self._contents):
                n = common_prefix(tokens, prompt_ids, limit) if self._keys[slot] == key else 0
                if slot in free and n > best_free_len:
                    best_free, best_free_len = slot, n
                elif slot not in free and n > best_busy_len:
                    best_busy, best_busy_len = slot, n
            if best_free_len == 0:
                # don't evict a slot whose contents might serve later requests if an empty one exists
                empty = [s for s in self._free if not self._contents[s]]
                best_free = min(empty) if empty else min(self._free)
        self._free.remove(best_free)
        if best_busy is not None and best_busy_len >= max(self.min_prefix, best_free_len + self.min_prefix):
            result = AllocatedSlot(best_free, best_busy_len, copy_from=best_busy)
        elif best_free_len >= self.min_prefix:
            result = AllocatedSlot(best_free, best_free_len)
        else:
            result = AllocatedSlot(best_free, 0)
        if self.enable_prefix_caching:
            if result.cached_tokens:
                self.prefix_hits += 1
                self.prefix_tokens_reused += result.cached_tokens
            else:
                self.prefix_misses += 1
        self._contents[result.slot] = list(prompt_ids[:result.cached_tokens])
        self._keys[result.slot] = key
        return result

    def record(self, slot: int, tokens: list[int]) -> None:
        """The K/V for `tokens` were just written at the end of this slot's valid prefix."""
        self._contents[slot].extend(tokens)

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        self._free.append(slot)
        if not self.enable_prefix_caching:
            self._contents[slot] = []
