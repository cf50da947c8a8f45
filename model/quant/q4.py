"""q4: llama.cpp's block formats — Q4_1 projections (4-bit codes, a scale and a minimum per 32 weights)
and a Q8_0 output head — multiplied with int8 activations in blocks of 32 by `torch.ops.seedling.linear`
(model/csrc/seedling_cpu.cpp). The default SmolLM2 model is itself a Q4_1/Q8_0 GGUF, so for it these
weights are the file's own. `model/native_q4.py` runs a whole forward over these packed tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from model import native

# Weights are packed in groups of 8 output rows so the kernel reads 4 inputs of 8 rows per 256-bit
# load (the layout is documented in model/csrc/seedling_cpu.cpp). QK inputs share one scale.
QK, ROWS = 32, 8


def _interleave(values: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/8, K/32, 8 chunks, 8 rows, 4): chunk c of row r holds inputs 4c..4c+3 of the block."""
    n, k = values.shape
    return values.view(n // ROWS, ROWS, k // QK, 8, 4).permute(0, 2, 3, 1, 4)


def _deinterleave(values: torch.Tensor) -> torch.Tensor:
    groups, blocks = values.shape[:2]
    return values.permute(0, 3, 1, 2, 4).reshape(groups * ROWS, blocks * QK)


def _group_scales(scales: torch.Tensor) -> torch.Tensor:
    """(N, blocks) -> (N/8, blocks * 8): the 8 rows' scales of a block side by side."""
    n, blocks = scales.shape
    return scales.view(n // ROWS, ROWS, blocks).transpose(1, 2).reshape(n // ROWS, blocks * ROWS).contiguous()


def _ungroup_scales(scales: torch.Tensor) -> torch.Tensor:
    groups = scales.shape[0]
    return scales.view(groups, -1, ROWS).transpose(1, 2).reshape(groups * ROWS, -1).float()


def pack_q4_1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (as GGML's reference quantizer): per block of 32, m = min, d = (max - min) / 15, q in 0..15.
    The codes are rounded against the fp16 d and m that are stored, so a weight that came from a Q4_1
    file gets its own codes back. Returns (codes uint8 (N/8, 4K), d fp16 (N/8, K/4), m fp16 (N/8, K/4))."""
    n, k = weight.shape
    blocks = weight.detach().float().cpu().reshape(n, k // QK, QK)
    d, m = ((blocks.amax(-1) - blocks.amin(-1)) / 15).half(), blocks.amin(-1).half()
    df, mf = d.float()[..., None], m.float()[..., None]
    q = torch.where(df > 0, torch.round((blocks - mf) / df.clamp(min=1e-30)), 0).clamp(0, 15).to(torch.uint8)
    chunks = _interleave(q.reshape(n, k))
    packed = chunks[:, :, 0::2] | (chunks[:, :, 1::2] << 4)  # chunk pairs share bytes: low nibble first
    return packed.reshape(n // ROWS, -1).contiguous(), _group_scales(d), _group_scales(m)


def pack_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q8_0: per block of 32, d = max|w| / 127 and q = round(w / d) in -127..127."""
    n, k = weight.shape
    blocks = weight.detach().float().cpu().reshape(n, k // QK, QK)
    d = (blocks.abs().amax(-1) / 127).half()
    df = d.float()[..., None]
    q = torch.where(df > 0, torch.round(blocks / df.clamp(min=1e-30)), 0).clamp(-127, 127).to(torch.int8)
    return _interleave(q.reshape(n, k)).reshape(n // ROWS, -1).contiguous(), _group_scales(d), torch.empty(0).half()


def dequantize_block(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The fp32 (N, K) weight a packed Q4_1 (uint8 codes) or Q8_0 (int8 codes) tensor stands for."""
    groups = q.shape[0]
    if q.dtype == torch.uint8:
        nibbles = q.view(groups, -1, 4, 8, 4)
        codes = torch.stack([nibbles & 15, nibbles >> 4], dim=3).reshape(groups, -1, 8, 8, 4)
    else:
        codes = q.view(groups, -1, 8, 8, 4)
    values = _deinterleave(codes).float().view(groups * ROWS, -1, QK) * _ungroup_scales(d)[..., None]
    if q.dtype == torch.uint8:
        values = values + _ungroup_scales(m)[..., None]
    return values.reshape(groups * ROWS, -1)


class BlockQuantLinear(nn.Module):
    """A projection in Q4_1 or Q8_0 blocks with int8 activations, through `torch.ops.seedling.linear`
    (what the native forward runs, usable alone: the eager model composes these for reference)."""

    def __init__(self, weight: torch.Tensor, fmt: str) -> None:
        super().__init__()
        n, k = weight.shape
        if k % QK or n % ROWS:
            raise ValueError(f"{fmt} needs in_features divisible by {QK} and out_features by {ROWS}, got {k}->{n}")
        q, d, m = pack_q4_1(weight) if fmt == "q4_1" else pack_q8_0(weight)
        self.register_buffer("q", q)
        self.register_buffer("d", d)
        self.register_buffer("m", m)
        self.fmt, self.in_features, self.out_features = fmt, k, n
        self.isa = native.isa()  # the kernel variant (SEEDLING_CPU_ISA, else the best this CPU has)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.seedling.linear(x, self.q, self.d, self.m, self.isa)


def block_linear(weight: torch.Tensor, name: str) -> BlockQuantLinear:
    """The q4 LinearFactory (model.eager): Q8_0 for the output head, as the GGUF's, Q4_1 elsewhere
    (chosen by name, not by a shape a projection could share)."""
    return BlockQuantLinear(weight, "q8_0" if name == "lm_head" else "q4_1")
