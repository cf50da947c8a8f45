"""ModelConfig: the shape of a Llama-family decoder, and its mapping to Hugging Face `config.json`.

A checkpoint's `config.json` uses the HF Llama keys so `transformers` loads our checkpoints
unchanged; `ModelConfig.to_hf()` / `ModelConfig.from_hf()` are the only translation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Serving-time quantization modes (implemented in model/quant/, built by model/inference.py; listed
# here, next to the other plain-data settings, so the HTTP settings and the benchmarks can check a mode
# without importing torch)
QUANTIZATIONS = ("int8", "w8a8", "q4")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working network."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # number of token ids, special tokens included
    dim: int = 576  # residual stream width
    n_layers: int = 12  # transformer blocks
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (grouped-query attention); must divide n_heads
    ffn_dim: int = 1536  # SwiGLU hidden width
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 2048  # longest position the model was trained for
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary encoding")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("rope_theta and norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    # ---------------------------------------------------------------- HF config.json mapping
    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        if hf.get("model_type", "llama") != "llama":
            raise ConfigError(f"unsupported model_type {hf.get('model_type')!r}; only 'llama' is supported")
        if hf.get("rope_scaling"):
            raise ConfigError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks required keys: {', '.join(missing)}")
        n_heads = hf["num_attention_heads"]
        if "head_dim" in hf and hf["head_dim"] * n_heads != hf["hidden_size"]:
            raise ConfigError("head_dim * num_attention_heads != hidden_size is not supported")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # newer transformers nest it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            rope_theta=float(rope_theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------------ presets
PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: a few thousand parameters, runs in milliseconds
    "test": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    # trainable on a 2-core CPU in minutes: ~15M parameters with an 8k vocabulary
    "cpu-small": dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024,
                      max_seq_len=512),
    # a real GPU run: ~125M parameters (SmolLM2-135M's shape with a 32k vocabulary)
    "gpu-125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                     max_seq_len=2048, rope_theta=100000.0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
