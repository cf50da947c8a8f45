"""Weight-only int8 (as gpt-fast does): per-output-channel symmetric int8 weights, activations stay in
the model's dtype. A quarter of fp32's weight bytes; works on every device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(compute_dtype))
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if x2.device.type == "cpu":
            # ATen's CPU int8 kernel is fast for bf16 inputs and ~30x slower for fp32 ones (measured in
            # bench/README.md), so fp32 activations take a bf16 round trip through it
            out = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight,
                                                     self.scales.to(torch.bfloat16)).to(x2.dtype)
        elif x2.dtype in (torch.bfloat16, torch.float16):
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(x2.dtype))
        else:  # fp32 on an accelerator: dequantize on the fly
            out = F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)
        return out.reshape(*shape[:-1], self.out_features)
