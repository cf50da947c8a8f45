"""NativeQ4Model: a q4 model's whole forward in one native call (`torch.ops.seedling.forward`, built by
`model/native.py` from `model/csrc/`) — one C++ call per step instead of thousands of PyTorch ops.
Weights are model/quant/q4.py's blocks, K/V are fp16 by default (half the bytes per cached key and
value; attention computes in fp32). Float32 activations on CPU; the kernel variant (AVX-512 VNNI,
AVX2, portable C++) is the best this CPU runs, or SEEDLING_CPU_ISA's.
"""

from __future__ import annotations

import torch
from torch import nn

from model import native
from model.config import ModelConfig
from model.eager import EagerModel
from model.kv_cache import CacheBatch, KVCache
from model.quant.q4 import BlockQuantLinear
from model.transformer import rotary_inv_freq

HEAD_DIMS = (16, 32, 64, 128)  # what the native attention is compiled for
TENSORS_PER_LAYER = 14  # seedling_cpu.cpp kTensorsPerLayer: see layer_tensors


class NativeQ4Model(nn.Module):
    """With a CacheBatch the packed tokens write their K/V into the engine's cache and attend over their
    own rows, so prefill chunks, decodes and mixed steps are the same call; without one (perplexity,
    calibration) a scratch cache holds the batch."""

    def __init__(self, eager: EagerModel, cache_dtype: torch.dtype = torch.float16) -> None:
        """`eager`'s projections must be BlockQuantLinear (`EagerModel.from_transformer(m, block_linear)`);
        its packed tensors are shared, not copied."""
        super().__init__()
        cfg = self.config = eager.config
        check_supported(cfg)
        tensors = layer_tensors(eager)
        self.weights = tensors + [t.detach().contiguous() for t in [eager.norm.weight, *_qdm(eager.lm_head)]]
        self.embed_tokens = eager.embed_tokens
        self.inv_freq = rotary_inv_freq(cfg.head_dim, cfg.rope_theta, torch.device("cpu"))
        self.cache_dtype = cache_dtype
        self.isa = native.isa()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: CacheBatch | None = None, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        B, T = tokens.shape
        if kv_cache is None:  # B independent sequences at positions 0..T-1, in a scratch cache
            if positions is not None and not torch.equal(positions, torch.arange(T).expand(B, T)):
                raise ValueError("without a KV cache the native forward runs positions 0..T-1")
            cache = KVCache(self.config, n_slots=B, max_seq_len=T, dtype=self.cache_dtype)
            k, v = cache.k, cache.v
            slots = torch.arange(B).repeat_interleave(T)
            pos = torch.arange(T).repeat(B)
        else:
            if B != 1:
                raise ValueError("a CacheBatch forward takes packed tokens of shape (1, N)")
            k, v = kv_cache.cache.k, kv_cache.cache.v
            slots, pos = kv_cache.write_slots, kv_cache.write_positions
        x = self.embed_tokens(tokens).view(B * T, -1)  # (N, dim)
        rows = logits_index if logits_index is not None else torch.arange(B * T)
        cfg = self.config
        logits = torch.ops.seedling.forward(x, slots, pos, rows, self.weights, k, v, self.inv_freq,
                                            cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps, self.isa)
        return logits if logits_index is not None else logits.view(B, T, -1)


def layer_tensors(eager: EagerModel) -> list[torch.Tensor]:
    """The TENSORS_PER_LAYER tensors per layer the native ops read, in their order (seedling_cpu.cpp decoder_layer):
    input norm, qkv (q, d, m), o, post-attention norm, gate_up, down. `eager`'s projections must be
    BlockQuantLinear."""
    tensors: list[torch.Tensor] = []
    for layer in eager.layers:
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [layer.input_layernorm.weight, *_qdm(attn.qkv_proj), *_qdm(attn.o_proj),
                    layer.post_attention_layernorm.weight, *_qdm(mlp.gate_up_proj), *_qdm(mlp.down_proj)]
    return [t.detach().contiguous() for t in tensors]


def check_supported(config: ModelConfig) -> None:
    """Raise (ValueError, or native.NativeUnavailable saying why) unless the native q4 forward can run
    `config` here; cheap, so callers check before packing any weight."""
    if config.head_dim not in HEAD_DIMS:
        raise ValueError(f"q4 supports head_dim {', '.join(map(str, HEAD_DIMS))}, not {config.head_dim}")
    native.isa()


def _qdm(linear: nn.Module) -> list[torch.Tensor]:
    if not isinstance(linear, BlockQuantLinear):
        raise TypeError(f"the native q4 forward needs BlockQuantLinear projections, not {type(linear).__name__}")
    return [linear.q, linear.d, linear.m]
