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


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_save_publishes_a_new_version_and_never_touches_the_old(tiny_sp_tokenizer: object, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 1}, version="one")
    v1 = tmp_path / "ckpt.versions" / "one"
    assert target.is_symlink() and target.resolve() == v1
    before = _files(v1)
    save_checkpoint(target, _tiny_model(tie_embeddings=False), tiny_sp_tokenizer, {"step": 2}, version="two")
    assert read_meta(target)["step"] == 2 and target.resolve() == tmp_path / "ckpt.versions" / "two"
    assert read_meta(target)["name"] == "ckpt"  # the id a server lists: the link's name, not the version's
    assert _files(v1) == before  # the previous version is kept, byte for byte (a reader may be on it)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.versions"]
    save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 3}, version="two")  # name taken
    assert target.resolve().name == "two-2"
    assert sorted(p.name for p in (tmp_path / "ckpt.versions").iterdir()) == ["two", "two-2"]  # keep=1
    unpublished = save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 4}, publish=False, keep=None)
    assert read_meta(target)["step"] == 3 and read_meta(unpublished)["step"] == 4

    class Boom(RuntimeError):
        pass

    class BadTokenizer:
        vocab_size = 10

        def save(self, directory: Path) -> None:
            raise Boom("disk full")

    with pytest.raises(Boom):
        save_checkpoint(target, _tiny_model(), BadTokenizer(), {"step": 5})  # type: ignore[arg-type]
    assert read_meta(target)["step"] == 3  # the published checkpoint is untouched
    assert not list((tmp_path / "ckpt.versions").glob(".tmp-*"))


# ------------------------------------------------------------------------------- kill -9 while saving
KILLED_SAVE = """
import os, signal, sys
from pathlib import Path

import safetensors.torch

from model.checkpoint import load_checkpoint, save_checkpoint

source, target, stage = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
ckpt = load_checkpoint(source)


def die_at(module, name, after=False):
    real = getattr(module, name)

    def call(*args, **kwargs):
        result = real(*args, **kwargs) if after else None
        os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, call)


def half_written(tensors, filename, metadata=None):
    with open(filename, "wb") as fh:
        fh.write(b"truncated" * 512)
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if stage == "weights":
    safetensors.torch.save_file = half_written
elif stage == "commit":
    die_at(os, "rename")
elif stage == "announced":
    die_at(os, "symlink", after=True)
elif stage in ("swap", "legacy swap"):
    die_at(os, "replace")
elif stage == "prune":
    import shutil
    die_at(shutil, "rmtree")
save_checkpoint(target, ckpt.model, ckpt.tokenizer, {"step": 2}, version="new")
"""
# stage -> the step load_checkpoint finds afterwards (recovery rolls a complete, announced version forward)
KILL_STAGES = {"weights": 1, "commit": 1, "announced": 2, "swap": 2, "legacy swap": 2, "prune": 2}


@pytest.mark.parametrize("stage", list(KILL_STAGES))
def test_kill_during_save_leaves_a_loadable_checkpoint(stage: str, tiny_checkpoint: Path, tiny_sp_tokenizer: object,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGKILL at each step of a save: the previous checkpoint's bytes stay intact and load; after
    recovery (which every load runs) no debris is left and the link is on a complete version."""
    import os
    import subprocess
    import sys

    from model import versioned

    target = tmp_path / "ckpt"
    if stage == "legacy swap":  # a checkpoint written before versioning: a real directory
        shutil.copytree(tiny_checkpoint, target)
        meta = json.loads((target / "seedling.json").read_text())
        (target / "seedling.json").write_text(json.dumps({**meta, "step": 1}))
        old = target
    else:
        if stage == "prune":  # something for the save to prune
            save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 0}, version="older")
        save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 1}, version="old")
        old = tmp_path / "ckpt.versions" / "old"
    before = _files(old)
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tiny_checkpoint), str(target), stage],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    if KILL_STAGES[stage] == 1:
        assert target.resolve() == old and read_meta(target)["step"] == 1  # nothing was published
    if stage == "legacy swap":
        assert not target.exists()  # the one-time move of a real directory has a window ...
        old = next((tmp_path / "ckpt.versions").glob("legacy-*"))
    assert _files(old) == before  # ... but the old bytes are never touched
    monkeypatch.setattr(versioned, "STALE_AFTER_S", 0.0)  # the killed writer's temp dir is old enough
    ckpt = load_checkpoint(target)
    assert ckpt.meta["step"] == KILL_STAGES[stage]
    with torch.inference_mode():
        assert torch.equal(ckpt.model(TOKENS), load_checkpoint(tiny_checkpoint).model(TOKENS))
    assert target.is_symlink() and target.resolve().is_dir()
    debris = [p.name for p in [*tmp_path.iterdir(), *(tmp_path / "ckpt.versions").iterdir()]
              if p.name.startswith(".")]
    assert debris == []
    save_checkpoint(target, _tiny_model(), tiny_sp_tokenizer, {"step": 3})  # and saving works again
    assert load_checkpoint(target).meta["step"] == 3


def test_recovers_what_the_pre_versioning_writer_left(tiny_checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The old save_checkpoint renamed the target aside, then the temp dir into place: killed between
    the two there was no checkpoint at all, and its temp dirs stayed forever."""
    from model import versioned

    monkeypatch.setattr(versioned, "STALE_AFTER_S", 0.0)
    shutil.copytree(tiny_checkpoint, tmp_path / ".ckpt.old-x1y2" / "ckpt")
    (tmp_path / ".ckpt.tmp-a1b2").mkdir()
    (tmp_path / ".ckpt.tmp-a1b2" / "model.safetensors").write_bytes(b"half")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["step"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recovery_leaves_a_live_writers_files_alone(tiny_checkpoint: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import os

    from model import versioned

    monkeypatch.setattr(versioned, "STALE_AFTER_S", 0.0)
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt.versions" / "v1")
    (tmp_path / "ckpt").symlink_to("ckpt.versions/v1")
    staged = versioned.stage(tmp_path / "ckpt")  # someone is writing right now
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt.versions" / "v2")
    fd = os.open(tmp_path / "ckpt.versions" / "v2", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # ... and someone else has announced v2 but not swapped yet
    (tmp_path / ".ckpt.link-1-2").symlink_to("ckpt.versions/v2")
    try:
        assert load_checkpoint(tmp_path / "ckpt").path == tmp_path / "ckpt"
        assert staged.path.is_dir() and (tmp_path / ".ckpt.link-1-2").is_symlink()
        assert (tmp_path / "ckpt").resolve().name == "v1"
    finally:
        os.close(fd)
        versioned.release(staged)
    load_checkpoint(tmp_path / "ckpt")  # the announcer died: its swap is finished
    assert (tmp_path / "ckpt").resolve().name == "v2" and not (tmp_path / ".ckpt.link-1-2").exists()
    fd = os.open(tmp_path / "ckpt.versions" / "v2", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer stopped (SIGSTOP) right after publishing v2: no hang
    monkeypatch.setattr(versioned, "READ_LOCK_WAIT_S", 0.2)
    try:
        assert load_checkpoint(tmp_path / "ckpt").meta["step"] == 0
    finally:
        os.close(fd)


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
