"""Scheduler: decides, every step, which sequences run and how many of their tokens (plain Python).

Policy (continuous batching with chunked prefill):
  1. every running sequence that is decoding gets its one token (decodes never wait);
  2. running sequences still prefilling get a chunk of at most `prefill_chunk` tokens;
  3. waiting sequences are admitted in arrival order while a cache slot is free and the step's token
     budget (`max_num_batched_tokens`) lasts; each starts with its first prefill chunk.
So a long prompt delays running decodes by at most one chunk per step, and a finished sequence's
slot is taken by a waiting one on the very next step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from model.engine.cache_manager import AllocatedSlot, CacheManager
from model.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position to compute
    length: int  # tokens to compute this step
    samples: bool  # this chunk reaches the end of the sequence: sample the next token


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    admitted: list[AllocatedSlot]  # slots given this step (the runner may copy prefixes into them)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_batched_tokens: int, prefill_chunk: int) -> None:
        assert max_num_batched_tokens >= cache.n_slots, "token budget must fit one decode per slot"
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        # 1. decodes first, in slot order (lets the runner read contiguous cache rows without a gather)
        decoding = sorted((s for s in self.running if not s.is_prefill), key=lambda s: s.slot)
        for seq in decoding:
            chunks.append(ScheduledChunk(seq, seq.num_computed, seq.num_tokens - seq.num_computed, True))
            budget -= chunks[-1].length
        # 2. prefills already under way
        for seq in self.running:
            if seq.is_prefill and budget > 0:
                chunks.append(self._prefill_chunk(seq, budget))
                budget -= chunks[-1].length
        # 3. admit waiting sequences
        admitted = []
        while self.waiting and budget > 0 and self.cache.can_allocate():
            seq = self.waiting.popleft()
            allocation = self.cache.allocate(seq.prompt_ids, seq.adapter)
            seq.slot, seq.status = allocation.slot, SequenceStatus.RUNNING
            seq.num_computed = seq.num_cached_prompt = allocation.cached_tokens
            seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            admitted.append(allocation)
            chunks.append(self._prefill_chunk(seq, budget))
            budget -= chunks[-1].length
        return SchedulerOutput(chunks, admitted)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> ScheduledChunk:
        remaining = len(seq.prompt_ids) - seq.num_computed
        length = min(remaining, self.prefill_chunk, budget)
        return ScheduledChunk(seq, seq.num_computed, length, samples=length == remaining)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's slot at once; it may be waiting or running."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.slot)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
