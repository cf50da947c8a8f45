"""Int8 weight-only quantization (as gpt-fast does): per-output-channel symmetric int8 weights with
a scale per row; activations stay in the model's dtype. Decoding a small model on a CPU is bound by
reading weights, so a quarter of the bytes of fp32 buys speed; the quality cost is measured by
`bench/quality.py` (perplexity and greedy agreement against the unquantized model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.transformer import Transformer


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(compute_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

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

def quantize_int8(model: Transformer) -> Transformer:
    """Replace every projection and the output head by Int8Linear (the embedding stays as is:
    a lookup reads one row per token). Returns the same model, for serving only."""
    dtype = model.dtype
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child, dtype))
    model.lm_head = Int8Linear(model.lm_head, dtype)  # unties it from the embedding
    model.quantized = "int8"
    return model.eval().requires_grad_(False)


def optimize_for_inference(model: Transformer, quantize: str | None = None) -> Transformer:
    """What the server and benchmarks run: fused projections, then optional int8 weights."""
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; choose 'int8' or none")
    if not model.fused:
        model.fuse_for_inference()
    if quantize == "int8" and getattr(model, "quantized", None) != "int8":
        quantize_int8(model)
    return model
