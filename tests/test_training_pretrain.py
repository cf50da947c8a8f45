"""Pretraining: token shards, exact resume, NaN stop, and torchrun/DDP (gloo, CPU) equivalence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.training_corpus import write_text_corpus
from training import pretrain, train_tokenizer
from training.common import TrainingError, build_config
from training.data import DataError, PackedWindows, read_shard, write_shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pretrain")
    write_text_corpus(d / "data")
    cfg = build_config(train_tokenizer.TrainTokenizerConfig, train_tokenizer.PRESETS, "tiny",
                       data_dir=str(d / "data"), out_dir=str(d / "tok"))
    train_tokenizer.main(cfg)
    return d / "tok"


def run(tok_dir: Path, out: Path, **kw) -> dict:
    cfg = build_config(pretrain.PretrainConfig, pretrain.PRESETS, "tiny", data_dir=str(tok_dir),
                       out_dir=str(out), **kw)
    return pretrain.main(cfg)


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    from model.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoint").model.state_dict()


# ---------------------------------------------------------------------------- shards
def test_shard_roundtrip_and_header_checks(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    write_shard(p, [1, 2, 3, 65535], vocab_size=65536)
    s = read_shard(p, vocab_size=65536)
    assert s.tokens.dtype == np.uint16 and list(s.tokens) == [1, 2, 3, 65535]
    write_shard(p, [70000], vocab_size=100000)
    assert read_shard(p).tokens.dtype == np.uint32
    with pytest.raises(DataError, match="train_tokenizer.*same tokenizer"):
        read_shard(p, vocab_size=512)
    p.write_bytes(p.read_bytes()[:-2])  # truncated
    with pytest.raises(DataError, match="truncated.*re-run `seedling-train train_tokenizer`"):
        read_shard(p)
    p.write_bytes(b"not a shard at all" * 10)
    with pytest.raises(DataError, match="bad magic"):
        read_shard(p)
    with pytest.raises(DataError, match="not found"):
        read_shard(tmp_path / "missing.bin")


def test_packed_windows_are_a_pure_function_of_the_index() -> None:
    toks = np.arange(1000, dtype=np.uint16)
    a, b = PackedWindows(toks, 16, seed=3), PackedWindows(toks, 16, seed=3)
    x1, y1 = a.batch(100, 4)
    b.batch(0, 7)  # visiting other samples first changes nothing
    x2, y2 = b.batch(100, 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (4, 16)
    first_epoch = {int(a.window(i)[0]) for i in range(a.n_windows)}
    assert len(first_epoch) == a.n_windows  # each window once per epoch


# ---------------------------------------------------------------------------- resume
def test_resume_is_exact(tok_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         caplog: pytest.LogCaptureFixture) -> None:
    from model import versioned

    straight = run(tok_dir, tmp_path / "a")
    assert straight["step"] == 20
    run(tok_dir, tmp_path / "b", stop_at=10)  # "killed" right after the step-10 checkpoint
    assert max(losses(tmp_path / "b")) == 10
    # ... and then killed again while writing the step-20 one: a torn metrics line, a half-written
    # temp dir and a complete version that was never published (rolled back: resume from step 10)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 20, "loss": 3.1')
    versions = tmp_path / "b" / "checkpoint.versions"
    (versions / ".tmp-killed").mkdir()
    (versions / ".tmp-killed" / "model.safetensors").write_bytes(b"half")
    shutil.copytree(versions / "step_00000010", versions / "step_00000020")
    monkeypatch.setattr(versioned, "STALE_AFTER_S", 0.0)
    run(tok_dir, tmp_path / "b")  # the same command again resumes
    assert "metrics.jsonl:" in caplog.text and "skipped" in caplog.text
    assert not (versions / ".tmp-killed").exists()
    assert (tmp_path / "b" / "checkpoint").resolve().name == "step_00000020-2"
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    assert all(la[s] == lb[s] for s in la), [(s, la[s], lb[s]) for s in la if la[s] != lb[s]]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    assert not list((tmp_path / "b" / "state").glob("step_00000010.pt"))  # old states pruned


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tok_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = torch.nn.functional

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        out = real.cross_entropy(*args, **kwargs)
        return out * float("nan") if calls["n"] > 14 else out  # 12 train + 2 val calls, then NaN

    monkeypatch.setattr(pretrain, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    with pytest.raises(TrainingError, match=r"loss became nan at step 13.*last good checkpoint.*step 10"):
        run(tok_dir, tmp_path / "n")
    from model.checkpoint import read_meta

    assert read_meta(tmp_path / "n" / "checkpoint")["step"] == 10


# ---------------------------------------------------------------------------- DDP
def test_torchrun_two_processes_match_one(tok_dir: Path, tmp_path: Path) -> None:
    common = ["--preset", "tiny", "--data_dir", str(tok_dir), "--max_steps", "4", "--save_every", "4",
              "--eval_every", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run(tok_dir, tmp_path / "one", max_steps=4, save_every=4, eval_every=4, batch_size=4)  # in-process
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "training.pretrain", *common, "--batch_size", "2",
                          "--out_dir", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for s in l1:
        assert abs(l1[s] - l2[s]) < 1e-5, (s, l1[s], l2[s])
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
