"""w8a8: int8 weights *and* int8 activations, quantized on the fly at every call (fbgemm's dynamic
linear; x86 CPUs), after SmoothQuant has moved activation outliers into the weights.

This is what llama.cpp does for its quantized dot products (Q8 activations), and it is what makes a
2-core CPU fast at batch > 1: int8 multiply-adds (AVX2 `vpmaddubsw`) do twice the work per instruction
of fp32 FMAs, and at batch 1 it still reads a quarter of the bytes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from model.eager import EagerModel, frozen_linear
from model.transformer import Transformer


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) times int8 activations quantized at every call (fbgemm's
    dynamic linear), fp32 in and out.

    Two details keep the quality (measured by `bench/quality.py`):
    * fbgemm picks one activation scale per call, so one token with a huge activation would crush
      every other row of a batch; each row is divided by its own absmax first and multiplied back
      after (the layer is linear), so each token keeps its own precision whatever its batch-mates are
      (fbgemm's zero point still spans the batch, so results are near, not bit-, batch-invariant);
    * AVX2's `vpmaddubsw` adds pairs of uint8 x int8 products into a saturating int16, so weights use
      7 bits (|q| <= 63) and activations keep all 8: 2 x 255 x 63 < 32767, nothing saturates.
    """

    WEIGHT_MAX = 63

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float().cpu()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / self.WEIGHT_MAX
        with warnings.catch_warnings():  # torch marks quantized tensors as deprecated; the kernel is not
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scales.double(), torch.zeros(len(scales), dtype=torch.long),
                                                 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:  # one row: the call's scale is already the row's
            out = torch.ops.quantized.linear_dynamic(x2, self.packed, False)
        else:
            row_max = x2.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # 8x faster than vector_norm(inf)
            out = torch.ops.quantized.linear_dynamic(x2 / row_max, self.packed, False).mul_(row_max)
        return out.view(*x.shape[:-1], self.out_features)


# Activation outliers live in a few channels (the same ones for every input), and quantizing them per
# token wastes the int8 range of every other channel. SmoothQuant moves part of that range into the
# weights: x W^T = (x / s)(W s)^T with s_j = max|x_j|^a / max|W_j|^(1-a), and 1/s is folded into the
# op that produces x (an RMSNorm weight, or the `up` rows of the SwiGLU), so serving adds no work.
# max|x_j| comes from one forward over this text; outlier channels barely depend on the text.
CALIBRATION_TEXT = """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
My card was declined at the supermarket this morning, and I am sure there is money on the account. Can you check what happened and tell me how to fix it?<|im_end|>
<|im_start|>assistant
I am sorry to hear that. A card can be declined for several reasons: a daily spending limit, a suspected fraud block, an expired card, or a payment terminal error. Please open the app, go to Cards, and check whether the card is frozen. If it is not, tell me the time of the payment and I will look at the logs.<|im_end|>
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. The village lay at the foot of the hills, where the river turned west towards the sea; in the spring of 1871 the mill was rebuilt, and the school opened its doors to forty-two children.
Summarize: The committee met on Tuesday to discuss the budget for next year. After a long debate they agreed to increase spending on libraries by 12% and to delay the new sports hall until 2027.
Translate to French: Where is the train station? — Où est la gare ?
def fibonacci(n: int) -> int:
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
"""


@torch.inference_mode()
def activation_absmax(model: EagerModel, tokens: list[int]) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of every nn.Linear over one forward of `tokens`."""
    stats: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            stats[name] = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model(torch.tensor([tokens], device=model.embed_tokens.weight.device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    w_max = weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
    return (act_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_activations(model: EagerModel, calibration_tokens: list[int], alpha: float = 0.5) -> EagerModel:
    """Fold SmoothQuant scales into an fp32 EagerModel, in place: its weights must be its own (the
    output head too, even for a tied model). The model computes the same function afterwards (up to
    rounding); only the int8 range of each projection's input changes."""
    stats = activation_absmax(model, calibration_tokens)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        s = smooth_scales(stats[f"layers.{i}.self_attn.qkv_proj"], attn.qkv_proj.weight, alpha)
        layer.input_layernorm.weight.div_(s)
        attn.qkv_proj.weight.mul_(s)
        down, gate_up = mlp.down_proj.weight, mlp.gate_up_proj.weight
        s = smooth_scales(stats[f"layers.{i}.mlp.down_proj"], down, alpha)
        gate_up[down.shape[1]:].div_(s[:, None])  # the `up` half scales silu(gate) * up
        down.mul_(s)
        s = smooth_scales(stats[f"layers.{i}.mlp.gate_up_proj"], gate_up, alpha)
        layer.post_attention_layernorm.weight.div_(s)
        gate_up.mul_(s)
    s = smooth_scales(stats["lm_head"], model.lm_head.weight, alpha)
    model.norm.weight.div_(s)
    model.lm_head.weight.mul_(s)
    return model


def quantize_w8a8(model: Transformer, calibration_tokens: list[int]) -> EagerModel:
    """Fuse (on copies: smoothing rescales weights in place), smooth, then turn every projection and the
    output head into a W8A8Linear. (o_proj's inputs, the attention outputs, stay unsmoothed: w8a8 on
    o_proj alone cost +0.2 % perplexity.)"""
    fused = EagerModel.from_transformer(model, lambda weight, name: frozen_linear(weight.clone()))
    # the copies also untie the output head from the embedding, which smoothing must not rescale
    smooth_activations(fused, calibration_tokens)
    return fused.with_linears(lambda weight, name: W8A8Linear(weight))
