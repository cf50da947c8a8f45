"""Serving-time quantization of the projections and the output head; the quality cost of each mode is
measured by `bench/quality.py` (perplexity and greedy agreement against the unquantized model).

* `int8` — weight-only (as gpt-fast does): per-output-channel symmetric int8 weights, activations stay
  in the model's dtype. A quarter of fp32's weight bytes; works on every device.
* `w8a8` — int8 weights *and* int8 activations, quantized on the fly at every call (fbgemm's dynamic
  linear; x86 CPUs). This is what llama.cpp does for its quantized dot products (Q8 activations), and
  it is what makes a 2-core CPU fast at batch > 1: int8 multiply-adds (AVX2 `vpmaddubsw`) do twice the
  work per instruction of fp32 FMAs, and at batch 1 it still reads a quarter of the bytes.
* `q4` — llama.cpp's block formats: Q4_1 projections (4-bit, a scale and a minimum per 32 weights),
  a Q8_0 output head, int8 activations in blocks of 32 and an fp16 KV cache, run by the native CPU
  forward (`model/csrc/seedling_cpu.cpp`): one C++ call per step instead of thousands of PyTorch ops.
  The default SmolLM2 model is itself a Q4_1/Q8_0 GGUF, so for it these weights are the file's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model import native
from model.config import QUANTIZATIONS
from model.kv_cache import CacheBatch, KVCache
from model.tokenizer import Tokenizer
from model.transformer import Transformer, rotary_inv_freq


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
def activation_absmax(model: Transformer, tokens: list[int]) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of every nn.Linear over one forward of `tokens`."""
    stats: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            stats[name] = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model(torch.tensor([tokens], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    w_max = weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
    return (act_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_activations(model: Transformer, calibration_tokens: list[int], alpha: float = 0.5) -> Transformer:
    """Fold SmoothQuant scales into a fused fp32 model. The model computes the same function
    afterwards (up to rounding); only the int8 range of each projection's input changes."""
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
    head = nn.Linear(model.config.dim, model.config.vocab_size, bias=False)
    head.weight = nn.Parameter(model.lm_head.weight * s, requires_grad=False)  # unties the embedding
    model.lm_head = head
    return model


def quantize_w8a8(model: Transformer, calibration_tokens: list[int]) -> Transformer:
    """Smooth, then swap every projection and the output head for W8A8Linear. (o_proj's inputs, the
    attention outputs, stay unsmoothed: w8a8 on o_proj alone cost +0.2 % perplexity.)"""
    smooth_activations(model, calibration_tokens)
    return replace_linears(model, lambda linear: W8A8Linear(linear.weight))


# ---------------------------------------------------------------- q4: block formats + native forward
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.seedling.linear(x, self.q, self.d, self.m)


class NativeForward:
    """Runs a q4-packed Transformer's whole forward in one native call (`torch.ops.seedling.forward`).

    With a CacheBatch the packed tokens write their K/V into the engine's cache and attend over their
    own rows, so prefill chunks, decodes and mixed steps are the same call; without one (perplexity,
    calibration) a scratch cache holds the batch."""

    def __init__(self, model: Transformer) -> None:
        cfg = model.config
        tensors: list[torch.Tensor] = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            tensors += [layer.input_layernorm.weight, *_qdm(attn.qkv_proj), *_qdm(attn.o_proj),
                        layer.post_attention_layernorm.weight, *_qdm(mlp.gate_up_proj), *_qdm(mlp.down_proj)]
        self.weights = [t.detach().contiguous() for t in tensors + [model.norm.weight, *_qdm(model.lm_head)]]
        self.inv_freq = rotary_inv_freq(cfg.head_dim, cfg.rope_theta, torch.device("cpu"))
        self.config = cfg

    def __call__(self, model: Transformer, tokens: torch.Tensor, positions: torch.Tensor | None,
                 kv_cache: CacheBatch | None, logits_index: torch.Tensor | None) -> torch.Tensor:
        B, T = tokens.shape
        if kv_cache is None:  # B independent sequences at positions 0..T-1, in a scratch cache
            if positions is not None and not torch.equal(positions, torch.arange(T).expand(B, T)):
                raise ValueError("without a KV cache the native forward runs positions 0..T-1")
            cache = KVCache(self.config, n_slots=B, max_seq_len=T, dtype=model.cache_dtype)
            k, v = cache.k, cache.v
            slots = torch.arange(B).repeat_interleave(T)
            pos = torch.arange(T).repeat(B)
        else:
            if B != 1:
                raise ValueError("a CacheBatch forward takes packed tokens of shape (1, N)")
            k, v = kv_cache.cache.k, kv_cache.cache.v
            slots, pos = kv_cache.write_slots, kv_cache.write_positions
        x = model.embed_tokens(tokens).view(B * T, -1)
        rows = logits_index if logits_index is not None else torch.arange(B * T)
        cfg = self.config
        logits = torch.ops.seedling.forward(x, slots, pos, rows, self.weights, k, v, self.inv_freq,
                                            cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps)
        return logits if logits_index is not None else logits.view(B, T, -1)


def _qdm(linear: nn.Module) -> list[torch.Tensor]:
    assert isinstance(linear, BlockQuantLinear), linear
    return [linear.q, linear.d, linear.m]


def quantize_q4(model: Transformer) -> Transformer:
    """Q4_1 projections, a Q8_0 output head, an fp16 KV cache, and the native forward (x86-64 CPU, AVX2)."""
    if model.config.head_dim not in (16, 32, 64, 128):
        raise ValueError(f"q4 supports head_dim 16, 32, 64 or 128, not {model.config.head_dim}")
    native.load()  # NativeUnavailable says why not, before any weight is touched
    head = model.lm_head  # Q8_0, as the GGUF's; chosen by identity, not by a shape a projection could share
    replace_linears(model, lambda linear: BlockQuantLinear(linear.weight, "q8_0" if linear is head else "q4_1"))
    model.native = NativeForward(model)
    model.kv_dtype = torch.float16  # half the bytes per cached key and value; attention computes in fp32
    return model


def replace_linears(model: Transformer, make: Callable[[nn.Linear], nn.Module]) -> Transformer:
    """Swap every projection and the output head for `make(linear)`; the embedding stays as is (a
    lookup reads one row per token), so a tied output head becomes its own tensor."""
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, make(child))
    model.lm_head = make(model.lm_head)
    return model


def optimize_for_inference(model: Transformer, quantize: str | None = None, tokenizer: Tokenizer | None = None
                           ) -> Transformer:
    """What the server and benchmarks run: fused projections, then optional quantization (for serving
    only). `w8a8` calibrates on CALIBRATION_TEXT, so it needs the model's tokenizer."""
    if quantize not in (None, "none", *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)} or none")
    if not model.fused:
        model.fuse_for_inference()
    current = getattr(model, "quantized", None)
    if quantize in (None, "none") or current == quantize:
        return model
    if current is not None:
        raise ValueError(f"model is already quantized ({current})")
    if quantize != "int8" and (model.device.type != "cpu" or model.dtype != torch.float32):
        kernels = "native kernels" if quantize == "q4" else "fbgemm"
        raise ValueError(f"{quantize} runs on CPU with float32 activations ({kernels}); use int8 on other devices")
    if quantize == "int8":
        replace_linears(model, lambda linear: Int8Linear(linear, model.dtype))
    elif quantize == "q4":
        quantize_q4(model)
    else:
        if tokenizer is None:
            raise ValueError("w8a8 needs the tokenizer to calibrate")
        quantize_w8a8(model, tokenizer.encode(CALIBRATION_TEXT)[:model.config.max_seq_len])
    model.quantized = quantize
    return model.eval().requires_grad_(False)
