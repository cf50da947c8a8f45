"""Scheduler and CacheManager bookkeeping (plain Python, no model): budgets, chunking, admission,
slot reuse, prefix matching."""

from __future__ import annotations

import random

from model.engine.cache_manager import CacheManager
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence, SequenceStatus
from model.sampling import SamplingParams


def seq(rid: str, n_prompt: int, base: int = 0) -> Sequence:
    return Sequence(rid, [base + i for i in range(n_prompt)], SamplingParams(temperature=0), frozenset(),
                    None, None)


def advance(plan) -> None:
    """What the engine does after a forward: mark tokens computed, append a token where sampled."""
    for chunk in plan.chunks:
        chunk.seq.num_computed += chunk.length
        if chunk.samples:
            chunk.seq.output_ids.append(1)


def test_long_prompt_is_chunked_and_decodes_never_wait():
    sched = Scheduler(CacheManager(4, 4096, enable_prefix_caching=False), max_num_batched_tokens=64,
                      prefill_chunk=32)
    short = seq("short", 5)
    sched.add(short)
    advance(sched.schedule())  # short is prefilled and samples its first token
    long = seq("long", 1000)
    sched.add(long)
    steps = 0
    while long.is_prefill and steps < 40:
        plan = sched.schedule()
        by_id = {c.seq.request_id: c for c in plan.chunks}
        assert by_id["short"].length == 1 and by_id["short"].samples  # decode every single step
        assert plan.num_tokens <= 64
        if "long" in by_id:
            assert by_id["long"].length <= 32
        advance(plan)
        steps += 1
    assert not long.is_prefill and steps == 32  # 31 chunks of 32 tokens + one of 8
    assert len(long.output_ids) == 1


def test_token_budget_and_slots_bound_admission():
    cache = CacheManager(3, 512, enable_prefix_caching=False)
    sched = Scheduler(cache, max_num_batched_tokens=40, prefill_chunk=16)
    seqs = [seq(f"s{i}", 30) for i in range(5)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [c.length for c in plan.chunks] == [16, 16, 8]  # budget 40 split across admitted prefills
    assert cache.num_used == 3 and len(sched.waiting) == 2
    assert all(s.status is SequenceStatus.RUNNING for s in seqs[:3])


def test_finished_slot_is_reused_on_the_next_step():
    cache = CacheManager(2, 512, enable_prefix_caching=False)
    sched = Scheduler(cache, max_num_batched_tokens=64, prefill_chunk=64)
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    advance(sched.schedule())
    assert cache.num_free == 0 and list(sched.waiting) == [c]
    sched.finish(a)
    assert cache.num_free == 1 and a.status is SequenceStatus.FINISHED
    plan = sched.schedule()
    assert {ch.seq.request_id for ch in plan.chunks} == {"b", "c"} and c.slot == a.slot


def test_random_workloads_keep_invariants():
    rng = random.Random(0)
    cache = CacheManager(5, 2048, enable_prefix_caching=False)
    sched = Scheduler(cache, max_num_batched_tokens=48, prefill_chunk=20)
    live: list[Sequence] = []
    for step in range(400):
        if rng.random() < 0.3:
            s = seq(f"r{step}", rng.randint(1, 120))
            sched.add(s)
            live.append(s)
        plan = sched.schedule()
        assert plan.num_tokens <= 48
        slots = [c.seq.slot for c in plan.chunks]
        assert len(slots) == len(set(slots)) and all(0 <= x < 5 for x in slots)
        advance(plan)
        for s in list(sched.running):
            if len(s.output_ids) >= 3 or rng.random() < 0.02:
                sched.finish(s)
        assert cache.num_used == len(sched.running)
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s)
    assert cache.num_free == 5


def test_prefix_matching_prefers_longest_and_keeps_one_token_to_compute():
    cache = CacheManager(3, 512, enable_prefix_caching=True, min_prefix=4)
    system = list(range(100, 140))
    first = cache.allocate(system + [1, 2, 3])
    assert first.cached_tokens == 0
    cache.record(first.slot, system + [1, 2, 3])
    # a concurrent request with the same system prompt copies it from the busy slot
    second = cache.allocate(system + [7, 8])
    assert second.copy_from == first.slot and second.cached_tokens == 40
    cache.free(first.slot)
    # a later identical prompt reuses the freed slot in place, all but its last token
    third = cache.allocate(system + [1, 2, 3])
    assert third.slot == first.slot and third.copy_from is None and third.cached_tokens == 42
    assert cache.prefix_hits == 2 and cache.prefix_misses == 1
