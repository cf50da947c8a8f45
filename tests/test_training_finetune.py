"""Fine-tuning's checkpoints: intermediate saves are versions of their own; only the final one is
published, so a server loading out_dir/checkpoint never sees a half-trained model appear under it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import model.checkpoint
from model.checkpoint import read_meta
from tests.fixtures.training_corpus import write_task_data
from training import finetune
from training.common import build_config


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_intermediate_checkpoints_never_replace_the_published_one(tiny_checkpoint: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = [str(p) for p in write_task_data(tmp_path / "tasks").values()]
    out = tmp_path / "ft"

    def run(lr: float) -> None:
        finetune.main(build_config(finetune.FinetuneConfig, finetune.PRESETS, "tiny", init_from=str(tiny_checkpoint),
                                   out_dir=str(out), data=data, max_steps=4, save_every=2, eval_every=4, lr=lr,
                                   classify_candidates=2))

    run(1e-3)
    first = out / "checkpoint.versions" / "step_00000004"
    assert out.joinpath("checkpoint").resolve() == first
    served = _files(first)
    seen: list[tuple[int, float, bool]] = []  # (step saved, lr of the published checkpoint, its bytes unchanged)
    real_save = model.checkpoint.save_checkpoint

    def watching_save(*args: Any, **kwargs: Any) -> Path:
        path = real_save(*args, **kwargs)
        published = out / "checkpoint"
        seen.append((args[3]["step"], read_meta(published)["config"]["lr"], _files(published.resolve()) == served))
        return path

    monkeypatch.setattr(model.checkpoint, "save_checkpoint", watching_save)
    run(2e-3)  # a second run into the same out_dir while "a server" serves the first one's result
    assert seen == [(2, 1e-3, True), (4, 2e-3, False)]
    assert out.joinpath("checkpoint").resolve().name == "step_00000004-2"
    assert _files(first) == served  # the first run's final checkpoint, kept byte for byte
    kept = sorted(p.name for p in (out / "checkpoint.versions").iterdir())
    assert kept == ["step_00000002-2", "step_00000004", "step_00000004-2"]  # run 1's step 2 pruned
