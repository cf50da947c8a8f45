"""Sequence packing for SFT: many short rendered examples share one row of `seq_len` tokens.

Padding a batch of short translations to its longest member wastes most of a CPU's matmuls;
packing fills each row instead. Every example keeps its own positions (0, 1, ...) and attends only
to itself (`DocumentAttention`: a block-diagonal causal mask), so a packed row computes exactly
what the examples would compute one by one.

The stream of rows is a pure function of (seed, row index): epoch e packs the examples in the
order of a permutation seeded by (seed, e), so a run's data position is one integer (the step)
and resuming after a kill reads the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.data import SFTExample


@dataclass
class PackedBatch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) next-token targets
    w: torch.Tensor  # (B, T) float: 1 where the target is an assistant token (its loss counts)
    positions: torch.Tensor  # (B, T) position of each token inside its own example
    doc: torch.Tensor  # (B, T) which example of the row a token belongs to; -1 for padding

    @property
    def targets(self) -> int:
        return int(self.w.sum().item())


class DocumentAttention:
    """Attention for packed rows: causal inside each example, nothing across examples.

    `Transformer.forward(tokens, positions, kv_cache=...)` hands attention to whatever object it is
    given as `kv_cache` (`attend(layer, q, k, v)`); training passes this one, which keeps no cache."""

    def __init__(self, doc: torch.Tensor) -> None:
        T = doc.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
        self.mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, T, H, hd); k, v: (B, T, Hkv, hd). Returns (B, T, H, hd)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=self.mask, enable_gqa=True)
        return out.transpose(1, 2)


def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedy packing in the given order: append each example to the current row while it fits.
    `lengths` are input lengths (ids - 1); each must be <= seq_len."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if row and used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def collate(examples: Sequence[SFTExample], rows: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    """Build the tensors for rows of example indices; width = the fullest row."""
    T = max(sum(len(examples[i].ids) - 1 for i in row) for row in rows)
    shape = (len(rows), T)
    x = torch.full(shape, pad_id, dtype=torch.long)
    y = torch.full(shape, pad_id, dtype=torch.long)
    w = torch.zeros(shape, dtype=torch.float32)
    positions = torch.zeros(shape, dtype=torch.long)
    doc = torch.full(shape, -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            e = examples[i]
            n = len(e.ids) - 1
            x[b, at:at + n] = torch.tensor(e.ids[:-1])
            y[b, at:at + n] = torch.tensor(e.ids[1:])
            w[b, at:at + n] = torch.tensor(e.loss_mask[1:], dtype=torch.float32)
            positions[b, at:at + n] = torch.arange(n)
            doc[b, at:at + n] = k
            at += n
    return PackedBatch(x, y, w, positions, doc)


class PackedStream:
    """An endless stream of packed rows over `examples`, epoch after epoch; `rows(first, count)`
    is deterministic in (seed, first), which is what makes resume exact."""

    def __init__(self, examples: Sequence[SFTExample], seq_len: int, seed: int, shuffle: bool = True) -> None:
        too_long = [len(e.ids) - 1 for e in examples if len(e.ids) - 1 > seq_len]
        if too_long:
            raise ValueError(f"{len(too_long)} examples are longer than seq_len={seq_len} (longest {max(too_long)})")
        if not examples:
            raise ValueError("no examples to pack")
        self.examples, self.seq_len, self.seed, self.shuffle = examples, seq_len, seed, shuffle
        self.lengths = [len(e.ids) - 1 for e in examples]
        self._epochs: list[list[list[int]]] = []  # packed rows of epochs 0, 1, ... (computed on demand)

    def epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            n = len(self._epochs)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
                order = torch.randperm(len(self.examples), generator=gen).tolist()
            else:
                order = list(range(len(self.examples)))
            self._epochs.append(pack_rows(self.lengths, order, self.seq_len))
        return self._epochs[e]

    def rows(self, first: int, count: int) -> list[list[int]]:
        out: list[list[int]] = []
        e, i = 0, first
        while len(self.epoch(e)) <= i:
            i -= len(self.epoch(e))
            e += 1
        while len(out) < count:
            rows = self.epoch(e)
            take = rows[i:i + count - len(out)]
            out += take
            e, i = e + 1, 0
        return out

    def rows_per_epoch(self) -> int:
        return len(self.epoch(0))
