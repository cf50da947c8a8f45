"""LoRA task adapters in peft's on-disk format: read one, check it fits a base model, merge it in.

An adapter directory (written by `python -m training.adapt`, or by peft's `save_pretrained` on a
model with Seedling's module names) holds:

    adapter_config.json        peft's LoraConfig (r, lora_alpha, target_modules, use_rslora, ...)
    adapter_model.safetensors  base_model.model.layers.N.<self_attn|mlp>.<proj>.lora_{A,B}.weight
    seedling.json              optional: which base checkpoint it was trained on, tasks, metrics

Serving does not need peft: a LoRA update is W' = W + scale * B @ A, so `merge_adapter` applies it
to a `Transformer`'s weights directly, before `model.inference` builds a serving model (any variant,
q4 included) from them. The test suite checks the merged model's
logits against peft's own wrapped model, so this reader cannot drift from the library.

    adapter = read_adapter("adapters/translate-de")
    check_base(adapter, checkpoint_dir)        # AdapterError if trained on another base
    merge_adapter(model, adapter)              # in place
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.transformer import Transformer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "seedling.json"
PREFIX = "base_model.model."
# projection name -> the sub-module of a Block that holds it
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
# LoraConfig options that change the maths; merging would silently be wrong if they were set
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "layer_replication": None, "use_qalora": False}


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message names the directory and the reason."""


@dataclass
class LoraUpdate:
    layer: int
    proj: str  # one of PROJECTIONS
    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    scale: float
    updates: list[LoraUpdate]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def checkpoint_identity(directory: str | Path) -> dict[str, Any]:
    """What an adapter records about its base: the sha256 of the checkpoint's weights file and its
    size. Paths move between machines; the bytes of the weights do not."""
    weights = Path(directory) / "model.safetensors"
    if not weights.exists():
        raise AdapterError(f"{directory}: no model.safetensors (not a Seedling checkpoint)")
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return {"weights_sha256": digest.hexdigest(), "weights_bytes": weights.stat().st_size}


def _lora_scale(config: dict[str, Any], path: Path) -> float:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, expected in _UNSUPPORTED.items():
        if config.get(key) not in (expected, None):
            raise AdapterError(f"{path}: {key}={config[key]!r} is not supported (only plain LoRA merges)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{path}: rank_pattern / alpha_pattern are not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{path}: adapter_config.json needs a positive integer r and a lora_alpha")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _parse_key(key: str, path: Path) -> tuple[int, str, str]:
    """'base_model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'A')."""
    parts = key.removeprefix(PREFIX).split(".")
    ok = (key.startswith(PREFIX) and len(parts) == 6 and parts[0] == "layers" and parts[1].isdigit()
          and parts[3] in PROJECTIONS and parts[2] == PROJECTIONS[parts[3]]
          and parts[4] in ("lora_A", "lora_B") and parts[5] == "weight")
    if not ok:
        raise AdapterError(f"{path}: unexpected tensor {key!r}; expected "
                           f"{PREFIX}layers.N.<self_attn|mlp>.<{'|'.join(PROJECTIONS)}>.lora_<A|B>.weight")
    return int(parts[1]), parts[3], parts[4][-1]


def read_adapter(directory: str | Path) -> Adapter:
    """Load an adapter directory into memory (fp32 tensors); AdapterError says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise AdapterError(f"{path}: an adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        tensors = load_file(path / WEIGHTS_FILE)
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8")) if (path / META_FILE).exists() else {}
    except (OSError, ValueError, SafetensorError) as e:
        raise AdapterError(f"{path}: cannot read the adapter ({e})") from e
    scale = _lora_scale(config, path)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, proj, which = _parse_key(key, path)
        pairs.setdefault((layer, proj), {})[which] = tensor.float()
    updates = []
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {layer} {proj} has lora_{''.join(ab)} but not both A and B")
        if ab["A"].shape[0] != ab["B"].shape[1]:
            raise AdapterError(f"{path}: layer {layer} {proj}: lora_A {tuple(ab['A'].shape)} and lora_B "
                               f"{tuple(ab['B'].shape)} disagree on the rank")
        updates.append(LoraUpdate(layer, proj, ab["A"], ab["B"]))
    if not updates:
        raise AdapterError(f"{path}: {WEIGHTS_FILE} holds no LoRA tensors")
    return Adapter(path=path, config=config, scale=scale, updates=updates, meta=meta)


def check_base(adapter: Adapter, checkpoint_dir: str | Path) -> None:
    """Refuse an adapter whose seedling.json names a different base checkpoint (by weights hash).
    Adapters without seedling.json (plain peft output) are accepted on shape checks alone."""
    want = adapter.meta.get("base", {}).get("weights_sha256")
    if not want:
        return
    have = checkpoint_identity(checkpoint_dir)["weights_sha256"]
    if have != want:
        raise AdapterError(f"{adapter.path}: trained on base weights {want[:12]}…, but {checkpoint_dir} has "
                           f"{have[:12]}…; train it again on this checkpoint")


def _target(model: Transformer, u: LoraUpdate) -> torch.Tensor:
    """The weight matrix the update adds to."""
    return model.layers[u.layer].get_submodule(f"{PROJECTIONS[u.proj]}.{u.proj}").weight


def targets(model: Transformer, adapter: Adapter) -> list[torch.Tensor]:
    """The weight matrices merging `adapter` changes (validate_adapter first)."""
    return [_target(model, u) for u in adapter.updates]


def validate_adapter(model: Transformer, adapter: Adapter) -> None:
    """Every update must name an existing layer and match its projection's shape."""
    for u in adapter.updates:
        if not 0 <= u.layer < model.config.n_layers:
            raise AdapterError(f"{adapter.path}: layer {u.layer} does not exist (the model has "
                               f"{model.config.n_layers}); was it trained on another base model?")
        want = tuple(_target(model, u).shape)
        if (u.b.shape[0], u.a.shape[1]) != want:
            raise AdapterError(f"{adapter.path}: layer {u.layer} {u.proj} updates a {u.b.shape[0]}x{u.a.shape[1]} "
                               f"weight, the model's is {want[0]}x{want[1]}; trained on another base model?")


@torch.no_grad()
def merge_adapter(model: Transformer, adapter: Adapter) -> Transformer:
    """W += scale * B @ A for every update (computed in fp32, stored in the weight's dtype); in place."""
    validate_adapter(model, adapter)
    for u in adapter.updates:
        weight = _target(model, u)
        delta = (u.b @ u.a) * adapter.scale  # (out, in)
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return model


def load_merged(checkpoint_dir: str | Path, adapter_dir: str | Path, model: Transformer) -> Adapter:
    """read + check_base + merge, the three steps serving and evaluation take for one adapter."""
    adapter = read_adapter(adapter_dir)
    check_base(adapter, checkpoint_dir)
    merge_adapter(model, adapter)
    return adapter
