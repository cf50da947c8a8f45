"""Merge a LoRA adapter into its base checkpoint and save the result as a plain checkpoint.

    python -m training.merge_adapter --adapter adapters/translate-de --out_dir runs/merged/translate-de
    SEEDLING_CHECKPOINT=runs/merged/translate-de make serve

The bridge until the server picks adapters per request: the merged checkpoint is an ordinary
Seedling checkpoint (any quantization applies to it). The adapter's base (its seedling.json
sha256) must match `--init_from`, else the merge is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.common import TrainingError, field, run_job


@dataclass
class MergeConfig:
    adapter: str = field("", help="adapter directory (peft format, from training.adapt)")
    init_from: str = field("default", help="the base checkpoint the adapter was trained on, or 'default'")
    out_dir: str = field("", help="where the merged checkpoint is written")


def main(cfg: MergeConfig) -> Path:
    from model.adapters import AdapterError, load_merged
    from model.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint

    if not cfg.adapter or not cfg.out_dir:
        raise TrainingError("pass --adapter DIR and --out_dir DIR")
    try:
        base = resolve_checkpoint(cfg.init_from)
        ckpt = load_checkpoint(base, dtype=torch.float32)
        adapter = load_merged(base, cfg.adapter, ckpt.model)
    except (AdapterError, CheckpointError) as e:
        raise TrainingError(str(e)) from e
    meta: dict[str, Any] = {**ckpt.meta, "merged_adapter": {"path": str(adapter.path), **adapter.meta}}
    out = save_checkpoint(Path(cfg.out_dir), ckpt.model.eval(), ckpt.tokenizer, meta)
    print(f"merged {adapter.path} into {base}: {out}")
    return Path(out)


def cli(argv: list[str] | None = None, prog: str = "python -m training.merge_adapter") -> int:
    return run_job(main, MergeConfig, {}, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
