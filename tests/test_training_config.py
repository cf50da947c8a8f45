"""Training config parsing: preset < --config file < flags, converted and checked by pydantic, with
one-line errors that name every bad key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import finetune, pretrain
from training.common import TrainingError, build_config, make_parser, parse_config


def _error(**values: object) -> str:
    with pytest.raises(TrainingError) as err:
        build_config(pretrain.PretrainConfig, pretrain.PRESETS, "tiny", **values)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_values_are_converted_to_the_field_types() -> None:
    cfg = build_config(pretrain.PretrainConfig, pretrain.PRESETS, None, max_steps="30", lr="2e-3", compile="yes",
                       resume="off", data_dir="d")
    assert (cfg.max_steps, cfg.lr, cfg.compile, cfg.resume) == (30, 2e-3, True, False)
    cfg = parse_config(finetune.FinetuneConfig, finetune.PRESETS, ["--data", "a.jsonl", "b.jsonl@2", "--no-progress",
                                                                   "--max_steps", "7"])
    assert (cfg.data, cfg.progress, cfg.max_steps) == (["a.jsonl", "b.jsonl@2"], False, 7)


def test_errors_name_every_bad_key_in_one_line() -> None:
    assert _error(max_steps="ten") == "config key 'max_steps' must be an integer, got 'ten'"
    assert _error(lr="fast") == "config key 'lr' must be a number, got 'fast'"
    assert _error(compile="maybe") == "config key 'compile' must be true/false, got 'maybe'"
    assert _error(max_steps=2.5) == "config key 'max_steps' must be an integer, got 2.5"
    assert _error(max_steps=0) == "invalid PretrainConfig: max_steps must be positive"
    both = _error(max_steps="ten", lr="fast")
    assert "'max_steps' must be an integer" in both and "'lr' must be a number" in both
    with pytest.raises(TrainingError, match="config key 'data' must be a list, got 'a.jsonl'"):
        build_config(finetune.FinetuneConfig, finetune.PRESETS, None, data="a.jsonl")
    with pytest.raises(TrainingError, match=r"unknown config keys in overrides: \['lrr'\]; valid keys: \[.*'lr'"):
        build_config(pretrain.PretrainConfig, pretrain.PRESETS, None, lrr=1)


def test_config_file_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"max_steps": 3,')
    (tmp_path / "typo.yaml").write_text("max_steps: many\n")
    for argv, expected in ((["--config", str(tmp_path / "bad.json")], "config file .*bad.json cannot be read"),
                           (["--config", str(tmp_path / "missing.yaml")], "missing.yaml cannot be read"),
                           (["--config", str(tmp_path / "typo.yaml")], "'max_steps' must be an integer, got 'many'")):
        with pytest.raises(TrainingError, match=expected) as err:
            parse_config(pretrain.PretrainConfig, pretrain.PRESETS, argv)
        assert "\n" not in str(err.value)
    (tmp_path / "c.json").write_text(json.dumps({"max_steps": 7, "lr": 0.01}))
    cfg = parse_config(pretrain.PretrainConfig, pretrain.PRESETS,
                       ["--preset", "tiny", "--config", str(tmp_path / "c.json"), "--lr", "0.02"])
    assert (cfg.max_steps, cfg.lr, cfg.model) == (7, 0.02, "test")  # preset < file < flags


def test_help_lists_every_field_with_its_help_and_default() -> None:
    text = make_parser(pretrain.PretrainConfig, pretrain.PRESETS, prog="pretrain").format_help()
    assert "--preset {cpu-demo,gpu,tiny}" in text and "--config CONFIG" in text
    assert "--compile, --no-compile" in text
    assert "peak learning rate (default: 0.001)" in " ".join(text.split())
