"""DecodeGraphs: pure decode steps replayed as CUDA graphs.

On a GPU, a small model's decode step is a few hundred tiny kernels, and launching them one by one
from Python takes longer than running them. A CUDA graph records one step's kernels once and
replays them with a single launch. Replay needs fixed shapes and fixed input addresses, so:
  * every decode step is padded to a batch bucket (1, 2, 4, 8, ... up to the number of slots); the
    padding rows write their K/V into a spare cache row (`scratch_slot`) and their logits are dropped;
  * attention reads a key-length bucket (64, 128, 256, ... up to the cache length) with a mask that
    hides each sequence's positions past its own length;
  * tokens, slots and positions are copied into buffers that the recorded step reads from.
One graph is recorded per (batch bucket, key bucket) the first time a step needs it. With
`capture=False` the same padded step runs eagerly: that is how the CPU tests check it.
"""

from __future__ import annotations

import torch

from model.inference import InferenceModel
from model.kv_cache import CacheBatch, KVCache


def buckets(limit: int, first: int) -> list[int]:
    """first, 2*first, 4*first, ... and `limit` itself: the padded sizes a value <= limit rounds up to."""
    sizes = []
    size = first
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


class DecodeGraphs:
    def __init__(self, model: InferenceModel, cache: KVCache, max_batch: int, scratch_slot: int,
                 capture: bool = True) -> None:
        if not 0 <= scratch_slot < cache.n_slots:
            raise ValueError(f"scratch slot {scratch_slot} is not a cache row")
        self.model, self.cache, self.scratch_slot, self.capture = model, cache, scratch_slot, capture
        self.batch_sizes = buckets(max_batch, 1)
        self.key_lengths = buckets(cache.max_seq_len, min(64, cache.max_seq_len))
        device, n = model.device, max_batch
        self.tokens = torch.zeros(1, n, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.rows = torch.arange(n, device=device)
        self.key_index = torch.arange(cache.max_seq_len, device=device)
        self.mask = torch.zeros(n, 1, 1, cache.max_seq_len, dtype=cache.k.dtype, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.pool = None

    def run(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        """One decode token per sequence (token i at positions[i] of cache row slots[i]) -> logits (n, V)."""
        n = len(tokens)
        size = next(b for b in self.batch_sizes if b >= n)
        keys = next(k for k in self.key_lengths if k > max(positions))
        pad = size - n
        self.tokens[0, :size].copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        self.positions[0, :size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:size].copy_(torch.tensor(slots + [self.scratch_slot] * pad), non_blocking=True)
        graph, out = self.graphs.get((size, keys), (None, None))
        if not self.capture:
            out = self._step(size, keys)
        elif graph is None:
            graph, out = self._record(size, keys)
            self.graphs[(size, keys)] = (graph, out)
            graph.replay()
        else:
            graph.replay()
        return out[:n]

    def _step(self, size: int, keys: int) -> torch.Tensor:
        """The padded decode step; everything it reads is a slice of the fixed buffers."""
        positions = self.positions[0, :size]
        hidden = self.key_index[:keys][None, :] > positions[:, None]  # (size, keys): past each length
        mask = self.mask[:size, :, :, :keys]
        mask.zero_().masked_fill_(hidden[:, None, None, :], float("-inf"))
        batch = CacheBatch(cache=self.cache, write_slots=self.slots[:size], write_positions=positions,
                           decode_index=self.rows[:size], decode_slots=self.slots[:size], decode_mask=mask,
                           decode_len=keys, decode_contiguous=False, prefills=[])
        return self.model(self.tokens[:, :size], self.positions[:, :size], kv_cache=batch)[0]  # (size, V)

    def _record(self, size: int, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm up on a side stream (lazy kernel and workspace set-up must not happen while recording);
        # the warm-up writes the same K/V the real step writes, so it changes nothing
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(size, keys)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(size, keys)
        self.pool = graph.pool()
        return graph, out
