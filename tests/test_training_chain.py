"""The whole training chain on a tiny generated corpus: prepare -> tokenizer -> pretrain -> finetune ->
evaluate, then the engine loads the result and answers a prompt. Plus config parsing and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.training_corpus import text_records, write_jsonl, write_task_data
from training import cli, evaluate, finetune, prepare_data, pretrain, train_tokenizer
from training.common import TrainingError, build_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_whole_chain_checkpoint_answers_through_the_engine(tmp_path: Path) -> None:
    import torch

    from model.checkpoint import read_meta
    from model.engine import EngineConfig, LLMEngine
    from model.inference import load_for_serving
    from model.sampling import SamplingParams
    from model.tasks import classify_messages
    from model.tokenizer import render_chat

    raw = write_jsonl(tmp_path / "raw.jsonl", text_records(300, seed=5) + [{"text": "<p>A duplicated paragraph &amp; more of it.</p>"}] * 3)
    # 1. prepare, tokenizer, pretrain, finetune, evaluate: each through its CLI entry
    assert cli.main(["prepare_data", "--preset", "tiny", "--inputs", str(raw), "--out_dir", str(tmp_path / "data")]) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["dropped"].get("exact_duplicate", 0) >= 2
    assert cli.main(["train_tokenizer", "--preset", "tiny", "--data_dir", str(tmp_path / "data"),
                     "--out_dir", str(tmp_path / "tok")]) == 0
    assert cli.main(["pretrain", "--preset", "tiny", "--data_dir", str(tmp_path / "tok"),
                     "--out_dir", str(tmp_path / "pt"), "--max_steps", "10"]) == 0
    data = write_task_data(tmp_path / "tasks")
    assert cli.main(["finetune", "--preset", "tiny", "--init_from", str(tmp_path / "pt" / "checkpoint"),
                     "--out_dir", str(tmp_path / "ft"), "--data", *[str(p) for p in data.values()],
                     "--classify_candidates", "2"]) == 0
    meta = read_meta(tmp_path / "ft" / "checkpoint")
    assert meta["labels"]["classify"] == ["card_arrival", "exchange_rate", "lost_card"]
    assert cli.main(["evaluate", "--preset", "tiny", "--checkpoint", str(tmp_path / "ft" / "checkpoint"),
                     "--out_dir", str(tmp_path / "ev"), "--classify", str(data["classify"]),
                     "--summarize", str(data["summarize"]), "--translate", str(data["translate"]),
                     "--perplexity", str(tmp_path / "data" / "val.jsonl")]) == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert set(rep["results"]) == {"perplexity", "summarize", "translate", "classify"}
    assert 0 <= rep["results"]["classify"]["accuracy"] <= 1 and rep["results"]["perplexity"]["perplexity"] > 1
    assert "| classify | accuracy |" in (tmp_path / "ev" / "report.md").read_text()
    # 2. the engine loads the checkpoint and answers a prompt
    served = load_for_serving(tmp_path / "ft" / "checkpoint", dtype=torch.float32)
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=2, max_model_len=256))
    prompt = render_chat(served.tokenizer, classify_messages("I lost my card", meta["labels"]["classify"])).ids
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, min_tokens=3))
    assert out.completion_tokens >= 3 and out.finished
    assert served.tokenizer.decode(out.token_ids).strip()


def test_config_layers_and_unknown_keys_fail(tmp_path: Path) -> None:
    cfg = build_config(pretrain.PretrainConfig, pretrain.PRESETS, "tiny", lr=0.5)
    assert cfg.model == "test" and cfg.lr == 0.5 and cfg.max_steps == 20
    with pytest.raises(TrainingError, match="unknown config keys.*'lrr'"):
        build_config(pretrain.PretrainConfig, pretrain.PRESETS, None, lrr=1)
    with pytest.raises(TrainingError, match="must be an integer"):
        build_config(pretrain.PretrainConfig, pretrain.PRESETS, None, max_steps="ten")
    (tmp_path / "c.yaml").write_text("max_steps: 7\nlr: 0.01\ncompile: false\n")
    cfg = parse_config(pretrain.PretrainConfig, pretrain.PRESETS,
                       ["--preset", "tiny", "--config", str(tmp_path / "c.yaml"), "--lr", "0.02"])
    assert (cfg.max_steps, cfg.lr, cfg.model) == (7, 0.02, "test")  # preset < file < flags
    (tmp_path / "bad.json").write_text(json.dumps({"max_step": 3}))
    with pytest.raises(TrainingError, match="unknown config keys in config file"):
        parse_config(pretrain.PretrainConfig, pretrain.PRESETS, ["--config", str(tmp_path / "bad.json")])
    cfg = parse_config(finetune.FinetuneConfig, finetune.PRESETS, ["--data", "a.jsonl", "classify=b.jsonl@2"])
    assert cfg.data == ["a.jsonl", "classify=b.jsonl@2"]
    assert finetune.parse_source("classify/bank=x/y.jsonl@2.5") == ("classify", "bank", Path("x/y.jsonl"), 2.5)
    for job in (prepare_data, train_tokenizer, pretrain, finetune, evaluate):
        assert set(job.PRESETS) == {"tiny", "cpu-demo", "gpu"}


def test_console_script_help_and_errors() -> None:
    r = subprocess.run([sys.executable, "-m", "training.cli", "pretrain", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--warmup_steps" in r.stdout and "linear warmup steps" in r.stdout
    r = subprocess.run([sys.executable, "-m", "training.pretrain", "--data_dir", "/nonexistent"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "train_tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_training_never_imports_app_and_jobs_never_import_each_other() -> None:
    jobs = {"prepare_data", "train_tokenizer", "pretrain", "finetune", "evaluate"}
    for path in (ROOT / "training").glob("*.py"):
        src = path.read_text()
        assert "from app" not in src and "import app" not in src, path
        if path.stem in jobs:
            for other in jobs - {path.stem}:
                assert f"training.{other}" not in src and f"training import {other}" not in src, (path, other)
