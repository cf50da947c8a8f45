"""KVCache: preallocated per-layer key/value storage, and CacheBatch: one forward's view of it.

Storage is `n_slots` rows of `max_seq_len` positions per layer; a sequence owns one slot for its
life (slot bookkeeping is the engine's job, in plain Python: `model.engine.cache_manager`).
A forward packs the new tokens of several sequences into one row, `tokens (1, N)`; the CacheBatch
says which tokens belong to which (slot, start position), writes their K/V at those positions and
runs attention per group:
  * every sequence with one new token (decode) -> one batched SDPA with a key-length mask;
  * every sequence with several new tokens (prefill chunk) -> its own SDPA with a causal offset mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, n_slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.n_slots, self.max_seq_len = n_slots, max_seq_len
        shape = (config.n_layers, n_slots, config.n_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(config: ModelConfig, n_slots: int, max_seq_len: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.n_layers * n_slots * config.n_kv_heads * max_seq_len * config.head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def copy_prefix(self, src: int, dst: int | slice, length: int) -> None:
        """Copy the K/V of positions [0, length) of row `src` into row(s) `dst` (a shared prompt prefix)."""
        if isinstance(dst, int):
            dst = slice(dst, dst + 1)
        self.k[:, dst, :, :length] = self.k[:, src:src + 1, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src:src + 1, :, :length]

    def batch(self, slots: list[int], starts: list[int], lengths: list[int]) -> CacheBatch:
        """Describe one packed forward: sequence i has `lengths[i]` new tokens at positions
        `starts[i]...`, stored in cache row `slots[i]`; tokens are packed in that order."""
        return CacheBatch.build(self, slots, starts, lengths)


@dataclass
class PrefillGroup:
    offset: int  # first packed token of this sequence
    length: int
    slot: int
    start: int
    mask: torch.Tensor | None  # (length, start + length) bool, None when start == 0 (plain causal)


@dataclass
class CacheBatch:
    cache: KVCache
    write_slots: torch.Tensor  # (N,) slot of every packed token
    write_positions: torch.Tensor  # (N,) position of every packed token
    decode_index: torch.Tensor | None  # (Bd,) packed indices of one-token sequences
    decode_slots: torch.Tensor | None  # (Bd,)
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, L) additive: 0 where a key is visible, -inf where not; None if all see L keys
    decode_len: int  # L: the longest decode sequence, keys read per decode query
    decode_contiguous: bool  # decode slots are 0..Bd-1 in order: read the cache without a gather
    prefills: list[PrefillGroup]

    @classmethod
    def build(cls, cache: KVCache, slots: list[int], starts: list[int], lengths: list[int]) -> CacheBatch:
        assert len(slots) == len(starts) == len(lengths) and slots, "empty or ragged batch"
        device = cache.k.device
        write_slots, write_positions = [], []
        decode_index, decode_slots, decode_lens, prefills = [], [], [], []
        offset = 0
        for slot, start, length in zip(slots, starts, lengths, strict=True):
            assert length >= 1 and start + length <= cache.max_seq_len, (start, length, cache.max_seq_len)
            write_slots += [slot] * length
            write_positions += range(start, start + length)
            if length == 1:
                decode_index.append(offset)
                decode_slots.append(slot)
                decode_lens.append(start + 1)
            else:
                mask = None
                if start:
                    q_pos = torch.arange(start, start + length, device=device)[:, None]
                    mask = torch.arange(start + length, device=device)[None, :] <= q_pos
                prefills.append(PrefillGroup(offset, length, slot, start, mask))
            offset += length
        d_index = d_slots = d_mask = None
        decode_len = 0
        if decode_index:
            longest = decode_len = max(decode_lens)
            d_index = torch.tensor(decode_index, device=device)
            d_slots = torch.tensor(decode_slots, device=device)
            if min(decode_lens) < longest:  # equal lengths (always so for one sequence) need no mask
                lens = torch.tensor(decode_lens, device=device)
                hidden = torch.arange(longest, device=device)[None, :] >= lens[:, None]
                # additive float mask, built once per step: SDPA would convert a bool one in every layer
                d_mask = torch.zeros(hidden.shape, dtype=cache.k.dtype, device=device).masked_fill_(
                    hidden, float("-inf"))[:, None, None, :]
        return cls(
            cache=cache,
            write_slots=torch.tensor(write_slots, device=device),
            write_positions=torch.tensor(write_positions, device=device),
            decode_index=d_index, decode_slots=d_slots, decode_mask=d_mask, decode_len=decode_len,
            decode_contiguous=decode_slots == list(range(len(decode_slots))),
            prefills=prefills,
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (1, N, H, hd); k, v: (1, N, Hkv, hd) for the packed new tokens. Returns (1, N, H, hd)."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]  # (S, Hkv, L, hd)
        k_cache[self.write_slots, :, self.write_positions] = k[0]
        v_cache[self.write_slots, :, self.write_positions] = v[0]
        out = torch.empty_like(q) if self.prefills else None  # a pure decode step returns SDPA's tensor
        if self.decode_index is not None:
            longest = self.decode_len
            if self.decode_contiguous:
                n = self.decode_index.numel()
                kd, vd = k_cache[:n, :, :longest], v_cache[:n, :, :longest]
            else:
                kd = k_cache[:, :, :longest].index_select(0, self.decode_slots)  # (Bd, Hkv, L, hd)
                vd = v_cache[:, :, :longest].index_select(0, self.decode_slots)
            # in a pure decode step the packed order is the decode order: no gather, no scatter
            qd = q[0].index_select(0, self.decode_index) if self.prefills else q[0]  # (Bd, H, hd)
            od = F.scaled_dot_product_attention(qd[:, :, None, :], kd, vd, attn_mask=self.decode_mask,
                                                enable_gqa=True)  # (Bd, H, 1, hd)
            if out is None:
                return od.view(q.shape)
            out[0, self.decode_index] = od[:, :, 0, :]
        for p in self.prefills:
            end = p.start + p.length
            qp = q[:, p.offset:p.offset + p.length].transpose(1, 2)  # (1, H, T, hd)
            kp = k_cache[p.slot:p.slot + 1, :, :end]  # (1, Hkv, end, hd)
            vp = v_cache[p.slot:p.slot + 1, :, :end]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None,
                                                enable_gqa=True)
            out[:, p.offset:p.offset + p.length] = op.transpose(1, 2)
        return out
