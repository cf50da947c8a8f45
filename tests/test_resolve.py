"""The one reading of 'default' (checkpoint) and 'auto' (device, dtype) that the server, the training
jobs and the benchmarks share (model/checkpoint.py, model/device.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import convert
from model.checkpoint import CheckpointError, resolve_checkpoint
from model.device import DeviceError, resolve_device, resolve_dtype


def test_resolve_checkpoint_default_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = tmp_path / "fetched"
    monkeypatch.setattr(convert, "ensure_default_model", lambda: fetched)
    assert resolve_checkpoint(None) == resolve_checkpoint("") == resolve_checkpoint("default") == fetched
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
    with pytest.raises(CheckpointError, match="does not exist.*'default'"):
        resolve_checkpoint(tmp_path / "missing")


def test_resolve_device_and_dtype() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("float33", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_training_job_reports_a_missing_device_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from training import evaluate

    assert evaluate.cli(["--device", "cuda", "--classify", "x.jsonl"]) == 1
    assert capsys.readouterr().err.strip() == "error: device 'cuda' requested but CUDA is not available"
