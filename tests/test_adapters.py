"""LoRA adapters: model.adapters (read, validate, merge) against peft itself, and the training.adapt job
(packing, publishing, exact resume after kill -9) on the tiny fixtures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.adapters import AdapterError, load_merged, merge_adapter, read_adapter
from model.checkpoint import load_checkpoint
from model.inference import load_for_serving
from tests.fixtures.training_corpus import write_task_data
from training import adapt
from training.common import build_config
from training.data import SFTExample
from training.packing import DocumentAttention, PackedStream, collate, pack_rows

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


TOKENS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _peft_adapter(checkpoint: Path, out: Path, seed: int = 0) -> torch.Tensor:
    """A peft LoRA on the tiny model with random (non-zero) A and B, saved to `out`; returns the
    wrapped model's logits on TOKENS."""
    from peft import LoraConfig, get_peft_model

    model = load_checkpoint(checkpoint, dtype=torch.float32).model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft_model.save_pretrained(str(out))
        return peft_model.eval()(TOKENS)


@pytest.mark.parametrize("served", [False, True])
def test_merged_logits_equal_peft_wrapped_logits(tiny_checkpoint: Path, tmp_path: Path, served: bool) -> None:
    """Merged into the Transformer, and served (load_for_serving: merged, then fused projections)."""
    want = _peft_adapter(tiny_checkpoint, tmp_path / "a")
    base = load_checkpoint(tiny_checkpoint, dtype=torch.float32).model.eval()
    adapter = read_adapter(tmp_path / "a")
    assert adapter.scale == 2.0 and len(adapter.updates) == 7 * base.config.n_layers
    with torch.no_grad():
        before = base(TOKENS)
        if served:
            got = load_for_serving(tiny_checkpoint, adapters=[tmp_path / "a"]).model(TOKENS)
        else:
            got = merge_adapter(base, adapter)(TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-2  # the adapter really changes the model


def test_adapter_errors_name_the_problem(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _peft_adapter(tiny_checkpoint, tmp_path / "a")
    model = load_checkpoint(tiny_checkpoint, dtype=torch.float32).model
    with pytest.raises(AdapterError, match="adapter_config.json"):
        read_adapter(tmp_path)
    # trained on other base weights (seedling.json records their hash)
    (tmp_path / "a" / "seedling.json").write_text(json.dumps({"base": {"weights_sha256": "0" * 64}}))
    with pytest.raises(AdapterError, match="trained on base weights 000000000000"):
        load_merged(tiny_checkpoint, tmp_path / "a", model)
    # a rank-4 update for a wider projection than the model has
    shutil.copytree(tmp_path / "a", tmp_path / "wide")
    tensors = load_file(tmp_path / "wide" / "adapter_model.safetensors")
    key = "base_model.model.layers.0.mlp.down_proj.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, 4)
    save_file(tensors, tmp_path / "wide" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="layer 0 down_proj updates a"):
        merge_adapter(model, read_adapter(tmp_path / "wide"))
    # options that change the maths are refused, not silently merged wrong
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter(tmp_path / "a")


def _ex(ids: list[int], answer_from: int) -> SFTExample:
    return SFTExample("chat", ids, [i >= answer_from for i in range(len(ids))])


def test_packed_rows_compute_what_each_example_computes_alone(tiny_checkpoint: Path) -> None:
    model = load_checkpoint(tiny_checkpoint, dtype=torch.float32).model.eval()
    gen = torch.Generator().manual_seed(1)
    examples = [_ex(torch.randint(3, 300, (n,), generator=gen).tolist(), n // 2) for n in (9, 5, 12, 7)]
    rows = pack_rows([len(e.ids) - 1 for e in examples], [0, 1, 2, 3], seq_len=16)
    assert rows == [[0, 1], [2], [3]]
    batch = collate(examples, rows, pad_id=0)
    assert batch.x.shape == (3, 12) and batch.targets == sum(sum(e.loss_mask[1:]) for e in examples)
    with torch.no_grad():
        packed = model(batch.x, batch.positions, kv_cache=DocumentAttention(batch.doc))  # (3, 12, V)
        alone = model(torch.tensor([examples[1].ids[:-1]]))  # the second example of row 0
    torch.testing.assert_close(packed[0, 8:12], alone[0], rtol=1e-5, atol=1e-5)
    stream = PackedStream(examples, seq_len=16, seed=3)
    assert stream.rows(2, 5) == stream.rows(2, 5) and len(stream.rows(0, 10)) == 10


_KILL_AT = """
import os, signal, sys
from training import adapt
real = adapt.train_step
def train_step(run, step):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(run, step)
adapt.train_step = train_step
sys.exit(adapt.cli(sys.argv[1:]))
"""


def _adapt(tmp: Path, name: str, args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess[str]:
    code = _KILL_AT.format(step=kill_at) if kill_at is not None else "from training.adapt import cli; raise SystemExit(cli())"
    cmd = [sys.executable, "-c", code, "--preset", "tiny", "--max_steps", "8", "--out_dir", str(tmp / "runs" / name),
           "--adapters_dir", str(tmp / name), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_adapt_resumes_exactly_after_sigkill(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_task_data(tmp_path / "data")
    args = ["--init_from", str(tiny_checkpoint), "--train", f"translate={data['translate']}",
            f"summarize={data['summarize']}", "--name", "demo", "--lora_dropout", "0.1"]
    whole = _adapt(tmp_path, "whole", args)
    assert whole.returncode == 0, whole.stderr
    killed = _adapt(tmp_path, "killed", args, kill_at=5)
    assert killed.returncode == -9  # SIGKILL during step 6, after the state of step 4 was written
    assert not (tmp_path / "killed" / "demo").exists()
    resumed = _adapt(tmp_path, "killed", args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming demo at step 4/8" in resumed.stdout
    a, b = (tmp_path / d / "demo" / "adapter_model.safetensors" for d in ("whole", "killed"))
    assert a.read_bytes() == b.read_bytes()
    logs = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, lines)]
            for lines in ((tmp_path / "runs" / d / "metrics.jsonl").read_text().splitlines() for d in ("whole", "killed"))]
    assert logs[0] == logs[1] and len(logs[0]) == 8 + 4  # 8 steps, validation at 0, 3, 6, 8
    meta = json.loads((tmp_path / "whole" / "demo" / "seedling.json").read_text())
    assert meta["tasks"] == ["summarize", "translate"] and meta["metrics"]["steps"] == 8
    # the published adapter merges into the base it names
    model = load_checkpoint(tiny_checkpoint, dtype=torch.float32).model
    adapter = load_merged(tiny_checkpoint, tmp_path / "whole" / "demo", model)
    assert adapter.scale == 2.0 and meta["metrics"]["best_step"] > 0


def test_adapt_config_rejects_unknown_targets() -> None:
    with pytest.raises(Exception, match="unknown lora_targets"):
        build_config(adapt.AdaptConfig, adapt.PRESETS, "tiny", lora_targets=["qkv"])


def test_merge_adapter_job_writes_a_checkpoint_with_the_adapter_in_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from training import merge_adapter

    want = _peft_adapter(tiny_checkpoint, tmp_path / "a")
    argv = ["--adapter", str(tmp_path / "a"), "--init_from", str(tiny_checkpoint), "--out_dir", str(tmp_path / "m")]
    assert merge_adapter.cli(argv) == 0
    merged = load_checkpoint(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged.model.eval()(TOKENS), want, rtol=1e-5, atol=1e-5)
    assert merged.meta["merged_adapter"]["path"] == str(tmp_path / "a")
    assert merge_adapter.cli(["--adapter", str(tmp_path), "--out_dir", str(tmp_path / "n"),
                              "--init_from", str(tiny_checkpoint)]) == 1  # not an adapter: one-line error
