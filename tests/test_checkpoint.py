"""Checkpoint save/load: bit-identical round trips, transformers compatibility, one-line errors.

    .venv/bin/pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from model.config import preset
from model.generate import main as generate_main
from model.transformer import Transformer
from tests.conftest import TINY_SEED

TOKENS = torch.tensor([[5, 17, 99, 300, 42, 7, 250, 11, 3, 64]])  # (1, 10)


def _tiny_model(**overrides: object) -> Transformer:
    return Transformer(preset("test", **overrides)).init_weights(TINY_SEED).eval()


def test_round_trip_is_bit_identical(tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    assert not ckpt.model.training
    assert ckpt.model.lm_head.weight is ckpt.model.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(ckpt.model(TOKENS), _tiny_model()(TOKENS))
    assert ckpt.meta["labels"] == {"sentiment": ["positive", "negative"]}
    assert ckpt.meta["format_version"] == 1 and ckpt.path == tiny_checkpoint
    assert ckpt.config == preset("test")


def test_untied_round_trip_and_dtype(tiny_sp_tokenizer: object, tmp_path: Path) -> None:
    model = _tiny_model(tie_embeddings=False)
    save_checkpoint(tmp_path / "c", model, tiny_sp_tokenizer, {"step": 7, "metrics": {"loss": 1.5}})
    assert "lm_head.weight" in load_file(str(tmp_path / "c" / "model.safetensors"))
    ckpt = load_checkpoint(tmp_path / "c")
    with torch.inference_mode():
        assert torch.equal(ckpt.model(TOKENS), model(TOKENS))
    assert read_meta(tmp_path / "c")["step"] == 7
    bf16 = load_checkpoint(tmp_path / "c", dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16 and not bf16.model.training


def test_hf_tensor_names(tiny_checkpoint: Path) -> None:
    names = set(load_file(str(tiny_checkpoint / "model.safetensors")))
    assert "model.embed_tokens.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    assert "lm_head.weight" not in names  # tied
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True


def test_transformers_loads_our_checkpoint(tiny_checkpoint: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    with torch.inference_mode():
        diff = (hf(TOKENS).logits - load_checkpoint(tiny_checkpoint).model(TOKENS)).abs().max().item()
    print(f"tiny checkpoint: max |logit diff| vs transformers = {diff:.3e}")
    assert diff <= 1e-4


def test_save_replaces_atomically_and_leaves_no_temp(tiny_sp_tokenizer: object, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 1})
    save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 2})
    assert read_meta(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    class Boom(RuntimeError):
        pass

    class BadTokenizer:
        vocab_size = 10

        def save(self, directory: Path) -> None:
            raise Boom("disk full")

    with pytest.raises(Boom):
        save_checkpoint(target, _tiny_model(), BadTokenizer(), {"step": 3})  # type: ignore[arg-type]
    assert read_meta(target)["step"] == 2  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_rejects_tokenizer_larger_than_model(tiny_sp_tokenizer: object, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="vocab_size"):
        save_checkpoint(tmp_path / "c", _tiny_model(vocab_size=64), tiny_sp_tokenizer)


# ------------------------------------------------------------------------------- corrupted checkpoints
def _truncate(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors = load_file(str(d / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(d / "model.safetensors"))
    return apply


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return apply


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing dir": (lambda d: shutil.rmtree(d), "does not exist"),
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "unparsable config": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    "invalid config": (_edit_config(num_attention_heads=5), "invalid"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "truncated weights": (_truncate, "truncated or corrupt"),
    "garbage weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "truncated or corrupt"),
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "truncated or corrupt"),
    "missing tensor": (_edit_tensors(lambda t: t.pop("model.norm.weight")), "missing tensors norm.weight"),
    "unexpected tensor": (_edit_tensors(lambda t: t.update(extra=torch.zeros(2))), "unexpected tensors extra"),
    "wrong shape": (_edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(65)})), "shape"),
    "config/weights mismatch": (_edit_config(intermediate_size=96), "shape"),
    "tokenizer too big": (_edit_config(vocab_size=100), "tokenizer"),
    "missing tokenizer": (lambda d: (d / "tokenizer.model").unlink(), "tokenizer"),
    "corrupt tokenizer": (lambda d: (d / "tokenizer.model").write_bytes(b"garbage"), "tokenizer"),
    "corrupt tokenizer config": (lambda d: (d / "tokenizer_config.json").write_text("{"), "tokenizer"),
    "corrupt meta": (lambda d: (d / "seedling.json").write_text("[1,"), "seedling.json"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoint_raises_one_line_error(case: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    corrupt, expected = CORRUPTIONS[case]
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    corrupt(d)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d)
    message = str(err.value)
    assert "\n" not in message and expected in message, message
    assert len(message) < 400


# ------------------------------------------------------------------------------- generate CLI
def test_generate_cli_prints_reply(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate_main(["--checkpoint", str(tiny_checkpoint), "--max-tokens", "5", "Hello"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert generate_main(["--checkpoint", str(tiny_checkpoint), "--max-tokens", "5", "--temperature", "0.8",
                          "--seed", "3", "你好"]) == 0


def test_generate_cli_reports_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate_main(["--checkpoint", str(tmp_path / "nope"), "hi"]) == 2
    assert "error:" in capsys.readouterr().err
