"""EagerModel: the serving forward in plain PyTorch, built from a Transformer.

The same math as `model.transformer` (which stays the trainable oracle), laid out for serving:
q/k/v and gate/up are concatenated so a layer runs 4 matmuls instead of 7, and every projection is
whatever module a `LinearFactory` makes of its weight — `nn.Linear` for fp32/bf16/fp16, `Int8Linear`
or `W8A8Linear` (model/quant) for the quantized paths, `BlockQuantLinear` for the eager composition
of q4's kernels. Building never modifies the Transformer (a factory that changes weights in place
must copy them first); the embedding and unfused weights are shared with it, not copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.transformer import RMSNorm, Transformer, apply_rotary, rotary_cos_sin

if TYPE_CHECKING:
    from model.kv_cache import CacheBatch

# (weight (out, in), name) -> a module computing x @ weight.T; name is one of PROJECTIONS or "lm_head"
LinearFactory = Callable[[torch.Tensor, str], nn.Module]
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def frozen_linear(weight: torch.Tensor, name: str = "") -> nn.Linear:
    """An nn.Linear over `weight` itself (no copy), frozen."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def _norm_copy(norm: RMSNorm) -> RMSNorm:
    copy = RMSNorm(norm.weight.shape[0], norm.eps).to(norm.weight.device)
    copy.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
    return copy


class FusedAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qkv_proj: nn.Module, o_proj: nn.Module) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv_proj, self.o_proj = qkv_proj, o_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: CacheBatch | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, hd)
        qk = apply_rotary(qkv[:, :, :H + Hkv], cos, sin)  # q and k heads rotated in one go
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        if kv_cache is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True,
            ).transpose(1, 2)  # (B, T, H, hd)
        else:
            out = kv_cache.attend(self.layer_idx, q, k, v)  # (B, T, H, hd)
        return self.o_proj(out.reshape(B, T, H * hd))


class FusedMLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class FusedBlock(nn.Module):
    def __init__(self, input_layernorm: RMSNorm, self_attn: FusedAttention, post_attention_layernorm: RMSNorm,
                 mlp: FusedMLP) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: CacheBatch | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagerModel(nn.Module):
    def __init__(self, config: ModelConfig, embed_tokens: nn.Embedding, layers: list[FusedBlock], norm: RMSNorm,
                 lm_head: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens, self.layers, self.norm, self.lm_head = embed_tokens, nn.ModuleList(layers), norm, lm_head
        self.eval().requires_grad_(False)

    @classmethod
    def from_transformer(cls, model: Transformer, make: LinearFactory = frozen_linear) -> EagerModel:
        """Fuse `model`'s projections and hand each weight to `make`; norms are copied (SmoothQuant
        rescales them), the embedding is shared."""
        layers = []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
            layers.append(FusedBlock(
                _norm_copy(layer.input_layernorm),
                FusedAttention(model.config, i, make(qkv, "qkv_proj"), make(attn.o_proj.weight, "o_proj")),
                _norm_copy(layer.post_attention_layernorm),
                FusedMLP(make(gate_up, "gate_up_proj"), make(mlp.down_proj.weight, "down_proj"))))
        embed = nn.Embedding.from_pretrained(model.embed_tokens.weight.detach(), freeze=True)
        return cls(model.config, embed, layers, _norm_copy(model.norm), make(model.lm_head.weight, "lm_head"))

    def with_linears(self, make: LinearFactory) -> EagerModel:
        """A new EagerModel whose projections are `make(weight)` of this one's (nn.Linear) weights; the
        norms and the embedding are shared."""
        layers = [FusedBlock(
            layer.input_layernorm,
            FusedAttention(self.config, i, make(layer.self_attn.qkv_proj.weight, "qkv_proj"),
                           make(layer.self_attn.o_proj.weight, "o_proj")),
            layer.post_attention_layernorm,
            FusedMLP(make(layer.mlp.gate_up_proj.weight, "gate_up_proj"),
                     make(layer.mlp.down_proj.weight, "down_proj")),
        ) for i, layer in enumerate(self.layers)]
        return EagerModel(self.config, self.embed_tokens, layers, self.norm, make(self.lm_head.weight, "lm_head"))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: CacheBatch | None = None, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """As `Transformer.forward`: logits (B, T, vocab), or (K, vocab) for the `logits_index` rows."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)  # (B, T, dim)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache)
        x = self.norm(x)
        if logits_index is not None:
            x = x.reshape(B * T, -1).index_select(0, logits_index)  # (K, dim)
        return self.lm_head(x)
