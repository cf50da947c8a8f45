"""Frozen features of a base model: pooled hidden states of its first k blocks, for classification heads.

    spec = FeatureSpec(layer=12, pooling="mean")
    feats = extract_features(model, tokenizer, texts, spec)     # (N, spec.dim(model)) float32
    stack = load_feature_model(checkpoint_dir, depth=5, precision="q4")  # what training and serving run

A head on frozen features needs one forward pass per text instead of one score per label, and a
shallow exit (running only the first `layer` of the model's blocks) makes that pass proportionally
cheaper. Training (`training.head`) and serving (`app/`) both call `extract_features`, so the
features a head was trained on are exactly the ones it is served with.

Texts are tokenized (optionally inside a prompt `template`), sorted by length and run in right-padded
batches: with causal attention a real token never attends to the padding after it, so padded and
unpadded runs give the same states (up to float rounding) and no attention mask is needed.

Three precisions (`PRECISIONS`; a head records the one it was trained on and is served with it):
fp32 and bf16 run the PyTorch blocks (a `Transformer`); q4 runs the first blocks through the native
kernels the q4 serving path uses (`Q4Stack`, `seedling::hidden`): packed texts, no padding, each text's
states independent of what it is batched with (bit for bit), ~2x faster than bf16 on an AVX-512 CPU.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.tokenizer import IM_END, IM_START, Tokenizer
from model.transformer import Transformer, rotary_cos_sin, rotary_inv_freq

POOLINGS = ("mean", "last", "mean+last")
PRECISIONS = ("fp32", "bf16", "q4")
_SPECIAL = re.compile(f"({re.escape(IM_START)}|{re.escape(IM_END)})")


class FeatureError(ValueError):
    """A feature spec that does not fit the model (layer out of range, bad pooling or template)."""


@dataclass(frozen=True)
class FeatureSpec:
    """Which states to pool: after block `layer` (1-based; n_layers = the last block, before the final
    norm), pooled by `pooling` over the text's tokens, the text placed into `template` at `{text}`."""
    layer: int
    pooling: str = "mean"
    template: str = "{text}"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise FeatureError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.template.count("{text}") != 1:
            raise FeatureError("template must contain '{text}' exactly once")
        if self.layer < 1:
            raise FeatureError(f"layer must be >= 1, got {self.layer}")

    def check(self, model: FeatureModel) -> None:
        if self.layer > model.config.n_layers:
            raise FeatureError(f"layer {self.layer} is past the model's {model.config.n_layers} blocks")

    def dim(self, model: FeatureModel) -> int:
        return model.config.dim * (2 if self.pooling == "mean+last" else 1)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], template: str = "{text}",
                 max_tokens: int = 256) -> list[list[int]]:
    """Token ids of each text inside `template`, cut to its first `max_tokens` (never empty).
    `<|im_start|>` / `<|im_end|>` in the template become the chat special tokens and the pieces between
    them are encoded on their own, as `render_chat` does; the same strings inside a text stay text."""
    specials = {IM_START: tokenizer.im_start_id, IM_END: tokenizer.im_end_id} if _SPECIAL.search(template) else {}
    pieces = _SPECIAL.split(template)  # text, special, text, ...
    out = []
    for text in texts:
        ids: list[int] = []
        for piece in pieces:
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                ids += tokenizer.encode(piece.replace("{text}", text))
        out.append(ids[:max_tokens] or [tokenizer.eos_id])
    return out


def length_batches(lengths: Sequence[int], max_batch: int = 64, max_tokens: int = 4096) -> Iterator[list[int]]:
    """Indices grouped by similar length (sorted), each group at most `max_batch` texts and
    `max_tokens` padded tokens: little padding, bounded memory."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) >= max_batch or (len(batch) + 1) * lengths[i] > max_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def block_states(model: Transformer, tokens: torch.Tensor, depth: int) -> Iterator[torch.Tensor]:
    """Yield the residual stream (B, T, dim) after each of the first `depth` blocks (no final norm).
    Runs the blocks directly, so a shallow exit costs depth / n_layers of a full forward."""
    B, T = tokens.shape
    positions = torch.arange(T, device=tokens.device).expand(B, T)
    x = model.embed_tokens(tokens)  # (B, T, dim)
    cos, sin = rotary_cos_sin(positions, model.config.head_dim, model.config.rope_theta, x.dtype)
    for layer in model.layers[:depth]:
        x = layer(x, cos, sin, None)
        yield x


def pool(states: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, dim) right-padded states, (B,) lengths -> (B, dim) or (B, 2*dim) float32."""
    states = states.float()
    T = states.shape[1]
    mask = (torch.arange(T, device=states.device)[None, :] < lengths[:, None]).float()  # (B, T)
    mean = (states * mask[..., None]).sum(1) / lengths[:, None].float()  # (B, dim)
    last = states[torch.arange(states.shape[0], device=states.device), lengths - 1]  # (B, dim)
    return _pooled(mean, last, pooling)


def pool_packed(states: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(N, dim) states of texts packed one after another (N = lengths.sum()), (B,) lengths ->
    (B, dim) or (B, 2*dim) float32."""
    states = states.float()
    rows = torch.tensor([i for i, n in enumerate(lengths.tolist()) for _ in range(n)])  # (N,) text of each token
    mean = torch.zeros(len(lengths), states.shape[1]).index_add_(0, rows, states) / lengths[:, None].float()
    last = states[lengths.cumsum(0) - 1]  # (B, dim)
    return _pooled(mean, last, pooling)


def _pooled(mean: torch.Tensor, last: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        return mean
    if pooling == "last":
        return last
    return torch.cat([mean, last], dim=-1)


def shallow_copy(model: Transformer, depth: int, dtype: torch.dtype) -> Transformer:
    """A stand-alone copy of `model`'s embeddings and first `depth` blocks in `dtype`, for extracting
    features next to a serving model: autocast would re-cast the fp32 weights on every call (half the
    time at 16 short texts), while a bf16 copy of 5 of SmolLM2's 30 blocks costs ~90 MB once. Its output head is tied to the embeddings: use it for features, not logits."""
    import copy
    import dataclasses

    if depth > model.config.n_layers:
        raise FeatureError(f"layer {depth} is past the model's {model.config.n_layers} blocks")
    config = dataclasses.replace(model.config, n_layers=depth, tie_embeddings=True)
    with torch.device("meta"):
        shallow = Transformer(config)
    shallow.embed_tokens = copy.deepcopy(model.embed_tokens)
    shallow.layers = torch.nn.ModuleList(copy.deepcopy(layer) for layer in model.layers[:depth])
    shallow.norm = copy.deepcopy(model.norm)
    shallow.lm_head.weight = shallow.embed_tokens.weight
    return shallow.to(dtype).eval().requires_grad_(False)


class Q4Stack:
    """The embeddings and first `depth` blocks of a model, packed in the q4 serving formats
    (model/quant/q4.py) and run by the native kernels (`seedling::hidden`: the layers of the q4
    forward without its final norm and head). Each text's states depend only on its own tokens."""

    def __init__(self, model: Transformer, depth: int) -> None:
        from model import native
        from model.eager import EagerModel, frozen_linear
        from model.native_q4 import TENSORS_PER_LAYER, check_supported, layer_tensors
        from model.quant.q4 import block_linear

        if depth > model.config.n_layers:
            raise FeatureError(f"layer {depth} is past the model's {model.config.n_layers} blocks")
        check_supported(model.config)
        shallow = shallow_copy(model, depth, torch.float32)
        # the output head is never run: keep it unpacked (packing the vocab x dim head costs seconds)
        eager = EagerModel.from_transformer(shallow, lambda w, name: frozen_linear(w) if name == "lm_head"
                                            else block_linear(w, name))
        self.config = shallow.config
        self.embed_tokens = eager.embed_tokens
        self.weights = layer_tensors(eager)
        self.per_layer = TENSORS_PER_LAYER
        self.inv_freq = rotary_inv_freq(self.config.head_dim, self.config.rope_theta, torch.device("cpu"))
        self.isa = native.isa()
        self.device = torch.device("cpu")

    @torch.no_grad()
    def states(self, ids: Sequence[Sequence[int]], depth: int) -> torch.Tensor:
        """(N, dim) float32 residual stream after `depth` blocks of the texts packed one after another
        (N = total tokens); K/V live in a scratch fp16 cache, as in serving."""
        cfg = self.config
        assert 1 <= depth <= cfg.n_layers, depth
        lengths = [len(x) for x in ids]
        tokens = torch.tensor([t for x in ids for t in x])  # (N,)
        slots = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])  # (N,) text of each token
        positions = torch.tensor([p for n in lengths for p in range(n)])  # (N,)
        shape = (depth, len(ids), cfg.n_kv_heads, max(lengths), cfg.head_dim)
        # scratch K/V (fp16 as in serving); every row attention reads is written first in the same call
        k, v = torch.empty(shape, dtype=torch.float16), torch.empty(shape, dtype=torch.float16)
        return torch.ops.seedling.hidden(self.embed_tokens(tokens), slots, positions,
                                         self.weights[:depth * self.per_layer], k, v, self.inv_freq,
                                         cfg.n_heads, cfg.n_kv_heads, cfg.norm_eps, self.isa)


FeatureModel = Transformer | Q4Stack


def precision_unavailable(precision: str) -> str | None:
    """Why features of `precision` cannot be computed here (None: they can). bf16 falls back to fp32
    where bf16 is not native (`load_feature_model`), so only q4 can be unavailable."""
    if precision not in PRECISIONS:
        return f"unknown feature precision {precision!r} (one of {', '.join(PRECISIONS)})"
    if precision != "q4":
        return None
    from model import native

    try:
        native.isa()
    except native.NativeUnavailable as e:
        return f"q4 features need the native kernels: {e}"
    return None


def auto_precision() -> str:
    """The fastest precision here: q4 where the native kernels run vectorised (AVX2 / AVX-512), else
    bf16 where bf16 matmuls are native, else fp32."""
    from model import native

    try:
        if native.isa() != "generic":
            return "q4"
    except native.NativeUnavailable:
        pass
    return "bf16" if bf16_fast() else "fp32"


def feature_model(model: Transformer, depth: int, precision: str) -> FeatureModel:
    """A stand-alone copy of `model`'s embeddings and first `depth` blocks in `precision` (bf16 runs as
    fp32 where bf16 is not native): what a head's features are extracted with."""
    reason = precision_unavailable(precision)
    if reason:
        raise FeatureError(reason)
    if precision == "q4":
        return Q4Stack(model, depth)
    dtype = torch.bfloat16 if precision == "bf16" and bf16_fast() else torch.float32
    return shallow_copy(model, depth, dtype)


def load_feature_model(checkpoint_dir: str | Path, depth: int, precision: str) -> FeatureModel:
    """`feature_model` of a checkpoint, whatever variant serves generation (the server's heads)."""
    from model.checkpoint import load_checkpoint

    return feature_model(load_checkpoint(checkpoint_dir, dtype=torch.float32).model, depth, precision)


def bf16_fast() -> bool:
    """Whether bf16 matmuls run natively here (CUDA, or a CPU with AVX512_BF16 / AMX), where bf16
    extraction is ~2.5x faster than fp32; elsewhere bf16 would be emulated and slower."""
    if torch.cuda.is_available():
        return True
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_autocast(model: FeatureModel, enabled: bool) -> Any:
    """bf16 autocast for an fp32 model on a CPU (or GPU) that runs bf16 matmuls; a no-op otherwise."""
    if not enabled or not isinstance(model, Transformer) or model.dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


@torch.no_grad()
def features_from_ids(model: FeatureModel, ids: Sequence[Sequence[int]], spec: FeatureSpec, pad_id: int,
                      bf16: bool = False, max_batch: int = 64,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, spec.dim(model)) float32 features of already-encoded texts (`encode_texts`), in input order.
    `bf16` autocasts an fp32 Transformer. `progress(n)` is called after each batch with its size."""
    spec.check(model)
    out = torch.empty(len(ids), spec.dim(model), dtype=torch.float32)
    for batch in length_batches([len(x) for x in ids], max_batch=max_batch):
        rows = [ids[i] for i in batch]
        lengths = torch.tensor([len(x) for x in rows])
        if isinstance(model, Q4Stack):
            feats = pool_packed(model.states(rows, spec.layer), lengths, spec.pooling)
        else:
            tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T) right-padded
            for row, x in enumerate(rows):
                tokens[row, :len(x)] = torch.tensor(x)
            with bf16_autocast(model, bf16):
                *_, states = block_states(model, tokens.to(model.device), spec.layer)
            feats = pool(states, lengths.to(model.device), spec.pooling).cpu()
        out[torch.tensor(batch)] = feats
        if progress is not None:
            progress(len(batch))
    return out


def extract_features(model: FeatureModel, tokenizer: Tokenizer, texts: Sequence[str], spec: FeatureSpec,
                     bf16: bool = False, max_batch: int = 64,
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, spec.dim(model)) float32 features of `texts` (in `spec.template`), in input order."""
    ids = encode_texts(tokenizer, texts, spec.template)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return features_from_ids(model, ids, spec, pad, bf16=bf16, max_batch=max_batch, progress=progress)
