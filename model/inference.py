"""The inference seam: what serving, benchmarks and evaluation run, built from a checkpoint or a Transformer.

    served = load_for_serving(path, device="cpu", dtype=torch.float32, quantize="q4")
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig())
    logits = served.model(tokens, positions, kv_cache=batch, logits_index=rows)
    served.model.capabilities   # Capabilities(path="native-q4", quantization="q4", supports_cuda_graphs=False)

`model.transformer.Transformer` stays the one trainable network (HF tensor names) and the oracle; an
InferenceModel is a frozen serving copy of it, one class per forward:
  * `model.eager.EagerModel` — PyTorch, q/k/v and gate/up fused; its projections are nn.Linear
    (fp32/bf16/fp16), Int8Linear (int8) or W8A8Linear (w8a8, after SmoothQuant): model/quant/;
  * `model.native_q4.NativeQ4Model` — q4 blocks, the whole forward in one native call.
Every variant is built from a Transformer, so a LoRA adapter (model/adapters.py) is merged into its
weights before building — any variant serves it (q4: merged, then repacked). Several adapters at once
are served as one such model each, built by `adapt_for_serving` from the loaded base and run side by
side on one engine and one KV cache (model/engine/adapter_set.py); `load_for_serving` merges at most one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model import native
from model.adapters import check_base, load_merged, merge_adapter, read_adapter, targets, validate_adapter
from model.checkpoint import load_checkpoint
from model.config import QUANTIZATIONS, ModelConfig
from model.eager import EagerModel
from model.native_q4 import HEAD_DIMS, NativeQ4Model, check_supported
from model.quant.int8 import Int8Linear
from model.quant.q4 import QK, ROWS, BlockQuantLinear, block_linear
from model.quant.w8a8 import CALIBRATION_TEXT, quantize_w8a8
from model.transformer import Transformer

if TYPE_CHECKING:
    from model.kv_cache import CacheBatch
    from model.tokenizer import Tokenizer

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
log = logging.getLogger("seedling.inference")


@dataclass(frozen=True)
class Capabilities:
    """What the engine and the server may ask of a model, decided once when it is built."""

    path: str  # which forward serves, for logs and /ready: "torch-fp32", "native-q4-avx512", ...
    quantization: str  # "none" or one of model.config.QUANTIZATIONS
    supports_cuda_graphs: bool  # decode steps may be recorded as CUDA graphs (model/engine/cuda_graphs.py)
    # outputs are bit-identical whatever torch's thread count (each output computed whole by one thread,
    # in a fixed order: the native kernels), so the engine may vary the count per step
    thread_invariant: bool = False


class InferenceModel(nn.Module):
    """One frozen serving network and what callers need to know about it: the config, where it runs,
    the KV cache's dtype and its capabilities. `forward` is the same call for every variant."""

    def __init__(self, config: ModelConfig, network: nn.Module, device: torch.device, dtype: torch.dtype,
                 cache_dtype: torch.dtype, capabilities: Capabilities) -> None:
        super().__init__()
        self.config, self.network = config, network
        self.device, self.dtype, self.cache_dtype = torch.device(device), dtype, cache_dtype
        self.capabilities = capabilities
        self.eval().requires_grad_(False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: CacheBatch | None = None, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: (B, T) long (positions default to 0..T-1). Returns logits (B, T, vocab), or
        (K, vocab) for the `logits_index` (K,) rows of the flattened (B*T) positions. With a
        `model.kv_cache.CacheBatch` the tokens are packed sequences (B = 1) over the engine's cache."""
        return self.network(tokens, positions, kv_cache, logits_index)


@dataclass
class Served:
    """A checkpoint loaded for serving: the model, and what the engine and server need besides it."""

    model: InferenceModel
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path
    transformer: Transformer  # what `model` was built from (it shares its weights): the base for adapters


def load_for_serving(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     quantize: str | None = "none", adapters: Sequence[str | Path] | None = None) -> Served:
    """Load a checkpoint directory (model.checkpoint, CheckpointError on a bad one), merge `adapters`
    (at most one LoRA adapter directory, AdapterError if it does not fit) and build the serving model
    for `quantize` ("auto", "none", "int8", "w8a8" or "q4") on `device` in `dtype`."""
    _check_request(quantize, device, dtype, adapters)
    ckpt = load_checkpoint(path, device=device, dtype=dtype)
    for adapter in adapters or []:
        load_merged(path, adapter, ckpt.model)  # the Transformer is ours: merge in place
    model = prepare_for_serving(ckpt.model, quantize, ckpt.tokenizer, merged_adapter=bool(adapters))
    return Served(model=model, tokenizer=ckpt.tokenizer, meta=ckpt.meta, path=ckpt.path, transformer=ckpt.model)


def adapt_for_serving(served: Served, adapter_dir: str | Path) -> InferenceModel:
    """The serving model of `served`'s checkpoint with the LoRA adapter at `adapter_dir` merged in, in
    the same variant (quantization, dtype, device) as `served.model`, so both can share one engine.
    AdapterError if the adapter cannot be read or does not fit the base. Safe off the engine thread:
    it merges into a copy of the weights the adapter changes and shares every other tensor (the
    embedding, norms, untouched projections) with `served`, which stays unchanged."""
    adapter = read_adapter(adapter_dir)
    check_base(adapter, served.path)
    base = served.transformer
    validate_adapter(base, adapter)
    changed = {id(w) for w in targets(base, adapter)}
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()] if id(t) not in changed}
    model = merge_adapter(copy.deepcopy(base, shared), adapter)
    return prepare_for_serving(model, served.model.capabilities.quantization, served.tokenizer, merged_adapter=True)


def prepare_for_serving(model: Transformer, quantize: str | None = "none", tokenizer: Tokenizer | None = None,
                        merged_adapter: bool = False) -> InferenceModel:
    """The serving model for `model` (left unchanged: unfused weights and the embedding are shared with
    it, so keep it unmodified while serving). w8a8 calibrates on CALIBRATION_TEXT: it needs the tokenizer.
    `auto` is q4 or none (choose_auto), logged with the reason.

    `merged_adapter`: the weights carry a merged LoRA update. On q4 the projections are then packed in
    Q8_0, not Q4_1: a base imported from a Q4 GGUF sits on Q4_1's grid, and requantizing base + a small
    update to that grid rounds most of the update away (Multi30k en->de through a LoRA adapter, test
    n=100: chrF 20.9 in Q4_1, 44.8 in Q8_0, 44.6 in fp32). Q8_0 reads ~1.5x the bytes per decode step."""
    quantize = quantize or "none"
    _check_request(quantize, model.device, model.dtype, None)
    if quantize == "auto":
        quantize, why = choose_auto(model)
        log.info("SEEDLING_QUANTIZE=auto: %s (%s)", "q4" if quantize == "q4" else "the torch path serves", why)
    device, dtype, name = model.device, model.dtype, DTYPE_NAMES.get(model.dtype, str(model.dtype))
    cache_dtype = dtype
    if quantize == "none":
        network: nn.Module = EagerModel.from_transformer(model)
        path = f"torch-{name}"
    elif quantize == "int8":
        network = EagerModel.from_transformer(model, lambda weight, _: Int8Linear(weight, dtype))
        path = f"torch-int8-{name}"
    elif quantize == "w8a8":
        if tokenizer is None:
            raise ValueError("w8a8 needs the tokenizer to calibrate")
        network = quantize_w8a8(model, tokenizer.encode(CALIBRATION_TEXT)[:model.config.max_seq_len])
        path = "fbgemm-w8a8"
    else:
        check_supported(model.config)  # says why not before any weight is packed
        cache_dtype = torch.float16
        make = (lambda weight, _: BlockQuantLinear(weight, "q8_0")) if merged_adapter else block_linear
        network = NativeQ4Model(EagerModel.from_transformer(model, make), cache_dtype)
        path = f"native-{'q8' if merged_adapter else 'q4'}-{network.isa}"
    graphs = device.type == "cuda" and isinstance(network, EagerModel)
    capabilities = Capabilities(path, quantize, graphs, thread_invariant=isinstance(network, NativeQ4Model))
    return InferenceModel(model.config, network, device, dtype, cache_dtype, capabilities)


def choose_auto(model: Transformer) -> tuple[str, str]:
    """What `auto` serves with: ("q4", how) where the native kernels run at full speed, else
    ("none", why not). q4 on the portable kernels (a CPU without AVX2) is slower than torch's own
    kernels, so auto does not pick it; an explicit q4 still runs them."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "none", f"q4 runs on CPU in float32, this model is on {model.device.type} in " \
                       f"{DTYPE_NAMES.get(model.dtype, model.dtype)}"
    cfg = model.config
    widths = (cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim)
    outputs = (cfg.dim, 2 * cfg.ffn_dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.vocab_size)
    if cfg.head_dim not in HEAD_DIMS or any(k % QK for k in widths) or any(n % ROWS for n in outputs):
        return "none", f"q4 needs head_dim in {HEAD_DIMS}, layer inputs divisible by {QK} and outputs by {ROWS}"
    try:
        isa = native.isa()
    except native.NativeUnavailable as e:
        return "none", f"the native q4 kernels are unavailable: {e}"
    if isa == "generic":
        return "none", "this CPU has no AVX2 (or SEEDLING_CPU_ISA=generic): the portable q4 kernels are " \
                       "slower than torch's (SEEDLING_QUANTIZE=q4 runs them anyway)"
    return "q4", f"native {isa} kernels"


def _check_request(quantize: str | None, device: str | torch.device, dtype: torch.dtype,
                   adapters: Sequence[str | Path] | None) -> None:
    """Refuse what cannot be built before anything is loaded, with the reason."""
    if adapters and len(adapters) > 1:
        raise NotImplementedError(f"serving several LoRA adapters at once ({', '.join(map(str, adapters))}) "
                                  "is not implemented yet; one adapter can be merged into the model")
    if quantize not in (None, "auto", "none", *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; choose auto, none or one of {', '.join(QUANTIZATIONS)}")
    if quantize in ("w8a8", "q4") and (torch.device(device).type != "cpu" or dtype != torch.float32):
        kernels = "native kernels" if quantize == "q4" else "fbgemm"
        raise ValueError(f"{quantize} runs on CPU with float32 activations ({kernels}); use int8 on other devices")
