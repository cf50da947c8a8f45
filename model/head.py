"""A classification head on frozen base-model features, and its files in an adapter directory.

    head = ClassifierHead(in_dim=576, n_labels=77, hidden=0)      # logistic regression (hidden=0) or MLP
    save_head(adapter_dir, head, HeadInfo(labels=[...], layer=12, pooling="mean", base={...}))
    loaded = load_head(adapter_dir)                                 # loaded.head, loaded.info
    probs = loaded.head(features).softmax(-1)                       # features: model.features

Layout of `<adapters_dir>/<name>/`:
    head.safetensors   the head's tensors (standardisation mean/std, linear or MLP weights)
    head.json          {"labels": [...], "layer": k, "pooling": ..., "template": ..., "hidden": h,
                        "precision": "q4" | "bf16" | "fp32", "base": {checkpoint identity}, "metrics": {...}}
The two files are written to temp names and renamed into place, head.json last: a reader that sees
head.json sees the matching tensors. Loading never unpickles and turns every problem into a one-line
HeadError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.features import PRECISIONS, FeatureError, FeatureSpec
from model.versioned import atomic_write_bytes

HEAD_WEIGHTS, HEAD_META = "head.safetensors", "head.json"


class HeadError(RuntimeError):
    """A head directory that cannot be loaded or does not fit the base model; one line, says what to do."""


class ClassifierHead(nn.Module):
    """Standardise features with the training set's mean/std (hidden states have a few huge
    dimensions that would otherwise dominate), then a linear layer (hidden=0: multinomial logistic
    regression) or a one-hidden-layer GELU MLP. forward: (N, in_dim) -> (N, n_labels) logits."""

    def __init__(self, in_dim: int, n_labels: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden:
            self.net: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(),
                                                nn.Dropout(dropout), nn.Linear(hidden, n_labels))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_labels))

    def set_standardisation(self, features: torch.Tensor) -> None:
        with torch.no_grad():
            self.mean.copy_(features.mean(0))
            self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features.float() - self.mean) / self.std)


@dataclass
class HeadInfo:
    """head.json: what the head predicts and which features of which base model it reads."""
    labels: list[str]
    layer: int
    pooling: str
    base: dict[str, Any]
    template: str = "{text}"
    hidden: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    # how the features were computed (model.features.PRECISIONS); served the same way. "" (heads written
    # before the field existed): bf16 if their metrics say so, else fp32
    precision: str = ""

    def __post_init__(self) -> None:
        if not self.precision:
            self.precision = "bf16" if self.metrics.get("bf16") else "fp32"
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(layer=self.layer, pooling=self.pooling, template=self.template)


@dataclass
class LoadedHead:
    head: ClassifierHead
    info: HeadInfo
    path: Path


def base_identity(checkpoint_dir: str | Path) -> dict[str, Any]:
    """What a head's features depend on: the checkpoint's weights (sha256 of model.safetensors) and
    its directory name for humans. A head served on other weights would silently read garbage."""
    path = Path(checkpoint_dir)
    digest = hashlib.sha256()
    with (path / "model.safetensors").open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return {"name": path.name, "weights_sha256": digest.hexdigest()}


def save_head(directory: str | Path, head: ClassifierHead, info: HeadInfo) -> Path:
    """Write head.safetensors then head.json into `directory` (created; other files left alone)."""
    from safetensors.torch import save

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(path / HEAD_WEIGHTS, save(tensors))
    atomic_write_bytes(path / HEAD_META, (json.dumps(asdict(info), indent=2, ensure_ascii=False) + "\n").encode())
    return path


def read_head_info(directory: str | Path) -> HeadInfo:
    path = Path(directory) / HEAD_META
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        info = HeadInfo(**raw)
        info.spec  # noqa: B018 - validates layer / pooling / template
    except FileNotFoundError:
        raise HeadError(f"{path} is missing; train a head with `python -m training.head`") from None
    except (OSError, ValueError, TypeError, FeatureError) as e:
        raise HeadError(f"{path} is invalid ({e}); re-run `python -m training.head`".replace("\n", " ")) from e
    if not info.labels or len(set(info.labels)) != len(info.labels):
        raise HeadError(f"{path}: labels must be a non-empty list of unique names")
    return info


def load_head(directory: str | Path) -> LoadedHead:
    """Load head.json + head.safetensors (eval mode, float32, CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    info = read_head_info(path)
    try:
        tensors = load_file(str(path / HEAD_WEIGHTS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HeadError(f"{path / HEAD_WEIGHTS} is missing or corrupt ({str(e).splitlines()[0] if str(e) else e!r}); "
                        "re-run `python -m training.head`") from e
    in_dim = tensors["mean"].shape[0] if "mean" in tensors else 0
    head = ClassifierHead(in_dim, len(info.labels), hidden=info.hidden)
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise HeadError(f"{path / HEAD_WEIGHTS} does not match {HEAD_META} (labels, hidden); re-run "
                        "`python -m training.head`") from e
    return LoadedHead(head=head.eval(), info=info, path=path)


@torch.no_grad()
def classify_ids(model: Any, loaded: LoadedHead, ids: list[list[int]], pad_id: int) -> list[list[float]]:
    """Label probabilities (loaded.info.labels order) for texts already encoded in the
    head's template (`model.features.encode_texts`): the head over features of `model`'s first `layer`
    blocks (`model.features.load_feature_model` in the head's precision), then softmax. What the server
    runs on its engine thread, on all the texts of concurrent requests at once."""
    from model.features import features_from_ids

    feats = features_from_ids(model, ids, loaded.info.spec, pad_id)
    return loaded.head(feats).softmax(-1).tolist()
