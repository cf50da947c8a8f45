"""Tiny LoRA adapters in peft's on-disk format, written directly (no peft run): random non-zero A and B
for every projection of every layer of a checkpoint's model, so an adapter visibly changes the output."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.adapters import CONFIG_FILE, META_FILE, PREFIX, PROJECTIONS, WEIGHTS_FILE
from model.checkpoint import load_checkpoint


def write_lora(checkpoint: Path, out: Path, seed: int, r: int = 4, alpha: int = 8, scale: float = 0.3,
               meta: dict | None = None) -> Path:
    """An adapter for `checkpoint`'s model at `out` (written in place: tests control timing)."""
    model = load_checkpoint(checkpoint, dtype=torch.float32).model
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.layers):
        for proj, sub in PROJECTIONS.items():
            rows, cols = layer.get_submodule(f"{sub}.{proj}").weight.shape
            key = f"{PREFIX}layers.{i}.{sub}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, cols, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, r, generator=gen) * scale
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(PROJECTIONS)}
    (out / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, out / WEIGHTS_FILE)
    if meta is not None:
        (out / META_FILE).write_text(json.dumps(meta))
    return out
