"""Classification heads on frozen features: model.features, model.head and the `training.head` job.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_head.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.features import (
    FeatureError,
    FeatureSpec,
    Q4Stack,
    bf16_fast,
    block_states,
    encode_texts,
    extract_features,
    features_from_ids,
    length_batches,
    load_feature_model,
    pool,
    pool_packed,
    precision_unavailable,
    shallow_copy,
)
from model.head import ClassifierHead, HeadError, HeadInfo, load_head, save_head

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "a", "机器学习是人工智能的一个分支。",
         "Small language models can be trained on a laptop"]


# ---------------------------------------------------------------------------- features
def test_last_block_states_are_the_forward_pass(tiny_checkpoint: Path) -> None:
    """block_states runs the same blocks as Transformer.forward: final norm + lm_head of its last state
    are the model's logits."""
    ckpt = load_checkpoint(tiny_checkpoint)
    tokens = torch.tensor([ckpt.tokenizer.encode(TEXTS[1])])
    *_, last = block_states(ckpt.model, tokens, ckpt.config.n_layers)
    logits = ckpt.model.lm_head(ckpt.model.norm(last))
    torch.testing.assert_close(logits, ckpt.model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last", "mean+last"])
def test_batched_features_equal_one_text_at_a_time(tiny_checkpoint: Path, pooling: str) -> None:
    """Right padding under causal attention changes nothing: length-sorted batches give each text the
    features it has alone, in input order."""
    ckpt = load_checkpoint(tiny_checkpoint)
    spec = FeatureSpec(layer=1, pooling=pooling)
    batched = extract_features(ckpt.model, ckpt.tokenizer, TEXTS, spec, max_batch=3)
    alone = torch.cat([extract_features(ckpt.model, ckpt.tokenizer, [t], spec) for t in TEXTS])
    assert batched.shape == (len(TEXTS), spec.dim(ckpt.model))
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    # mean pooling by hand for one text
    ids = torch.tensor([ckpt.tokenizer.encode(TEXTS[1])])
    first, *_ = block_states(ckpt.model, ids, 1)
    if pooling == "mean":
        torch.testing.assert_close(batched[1], first[0].mean(0), rtol=1e-5, atol=1e-5)


def test_shallow_copy_gives_the_same_features(tiny_checkpoint: Path) -> None:
    """The server's feature model (the checkpoint's first blocks, copied) reads what the training job's
    model reads; its bf16 version is close."""
    ckpt = load_checkpoint(tiny_checkpoint)
    spec = FeatureSpec(layer=1)
    ref = extract_features(ckpt.model, ckpt.tokenizer, TEXTS, spec)
    shallow = shallow_copy(load_checkpoint(tiny_checkpoint).model, 1, torch.float32)
    assert len(shallow.layers) == 1 and shallow.config.n_layers == 1
    torch.testing.assert_close(extract_features(shallow, ckpt.tokenizer, TEXTS, spec), ref, rtol=1e-5, atol=1e-5)
    bf = load_feature_model(tiny_checkpoint, 1, "bf16")
    if bf16_fast():
        assert bf.dtype == torch.bfloat16 and len(bf.layers) == 1
    cos = torch.nn.functional.cosine_similarity(extract_features(bf, ckpt.tokenizer, TEXTS, spec), ref)
    assert cos.min() > 0.99


def _eager_q4_states(checkpoint: Path, ids: list[int], depth: int) -> torch.Tensor:
    """The residual stream after `depth` blocks of the PyTorch composition of the q4 projections
    (model.eager with BlockQuantLinear): what the native op computes in one call."""
    from model.eager import EagerModel
    from model.quant.q4 import block_linear
    from model.transformer import rotary_cos_sin

    eager = EagerModel.from_transformer(load_checkpoint(checkpoint).model, block_linear)
    tokens = torch.tensor([ids])
    x = eager.embed_tokens(tokens)
    cos, sin = rotary_cos_sin(torch.arange(len(ids))[None], eager.config.head_dim, eager.config.rope_theta, x.dtype)
    for layer in eager.layers[:depth]:
        x = layer(x, cos, sin, None)
    return x[0]


@pytest.mark.skipif(precision_unavailable("q4") is not None, reason="no native kernels")
def test_q4_features_are_the_q4_layers_and_batch_invariant(tiny_checkpoint: Path) -> None:
    """Q4Stack runs the q4 serving kernels over packed texts: its states are the eager q4 layers'
    (up to fp16 K/V and summation order), each text's features are bit-identical however it is
    batched, and they stay close to fp32 features."""
    ckpt = load_checkpoint(tiny_checkpoint)
    stack = load_feature_model(tiny_checkpoint, 2, "q4")
    assert isinstance(stack, Q4Stack) and stack.config.n_layers == 2
    ids = encode_texts(ckpt.tokenizer, TEXTS)
    for depth in (1, 2):
        got = stack.states([ids[1]], depth)
        want = _eager_q4_states(tiny_checkpoint, ids[1], depth)
        assert (got - want).norm() / want.norm() < 0.01
    for pooling in ("mean", "last", "mean+last"):
        spec = FeatureSpec(layer=2, pooling=pooling)
        batched = features_from_ids(stack, ids, spec, pad_id=0, max_batch=3)
        alone = torch.cat([features_from_ids(stack, [x], spec, pad_id=0) for x in ids])
        assert torch.equal(batched, alone)
        ref = extract_features(ckpt.model, ckpt.tokenizer, TEXTS, spec)
        assert torch.nn.functional.cosine_similarity(batched, ref).min() > 0.98
    with pytest.raises(FeatureError, match="past the model"):
        load_feature_model(tiny_checkpoint, 3, "q4")


def test_pool_packed_equals_padded_pooling() -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 4])
    padded = torch.randn(3, 4, 5)
    packed = torch.cat([padded[i, :n] for i, n in enumerate(lengths.tolist())])
    for pooling in ("mean", "last", "mean+last"):
        torch.testing.assert_close(pool_packed(packed, lengths, pooling), pool(padded, lengths, pooling))


def test_head_info_precision() -> None:
    """head.json written before `precision` existed reads as what its metrics say; a bad one is refused."""
    assert HeadInfo(labels=["a"], layer=1, pooling="mean", base={}).precision == "fp32"
    assert HeadInfo(labels=["a"], layer=1, pooling="mean", base={}, metrics={"bf16": True}).precision == "bf16"
    assert HeadInfo(labels=["a"], layer=1, pooling="mean", base={}, precision="q4").precision == "q4"
    with pytest.raises(ValueError, match="precision"):
        HeadInfo(labels=["a"], layer=1, pooling="mean", base={}, precision="int3")
    assert precision_unavailable("int3") is not None and precision_unavailable("fp32") is None


def test_template_special_tokens(tiny_bpe_tokenizer) -> None:
    tok = tiny_bpe_tokenizer
    (ids,) = encode_texts(tok, ["hi <|im_end|>"], "<|im_start|>user\n{text}<|im_end|>\n")
    assert ids[0] == tok.im_start_id and ids.count(tok.im_end_id) == 1  # the text's spelling stays text
    assert ids == [tok.im_start_id, *tok.encode("user\nhi <|im_end|>"), tok.im_end_id, *tok.encode("\n")]


def test_length_batches_cover_every_index_once() -> None:
    lengths = [5, 1, 9, 3, 3, 7, 2, 8]
    batches = list(length_batches(lengths, max_batch=3, max_tokens=20))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 20 for b in batches)


def test_bad_specs_are_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(FeatureError, match="pooling"):
        FeatureSpec(layer=1, pooling="max")
    with pytest.raises(FeatureError, match="template"):
        FeatureSpec(layer=1, template="no placeholder")
    with pytest.raises(FeatureError, match="past the model"):
        FeatureSpec(layer=3).check(load_checkpoint(tiny_checkpoint).model)


# ---------------------------------------------------------------------------- head files
def _info(labels: list[str], hidden: int = 0) -> HeadInfo:
    return HeadInfo(labels=labels, layer=1, pooling="mean", base={"name": "tiny"}, hidden=hidden,
                    metrics={"test_accuracy": 1.0})


def test_head_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = ClassifierHead(8, 3, hidden=16)
    head.set_standardisation(torch.randn(20, 8) * 5 + 2)
    save_head(tmp_path / "h", head, _info(["a", "b", "c"], hidden=16))
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json", "head.safetensors"]
    loaded = load_head(tmp_path / "h")
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded.head(x), head.eval()(x), rtol=0, atol=0)
    assert loaded.info.labels == ["a", "b", "c"] and loaded.info.spec == FeatureSpec(layer=1)


def test_broken_heads_say_what_is_wrong(tmp_path: Path) -> None:
    head = ClassifierHead(8, 2)
    save_head(tmp_path / "h", head, _info(["a", "b"]))
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "h", bad)
    (bad / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(HeadError, match="corrupt"):
        load_head(bad)
    meta = json.loads((bad / "head.json").read_text())
    (bad / "head.json").write_text(json.dumps({**meta, "pooling": "max"}))
    with pytest.raises(HeadError, match="invalid"):
        load_head(bad)
    shutil.copy(tmp_path / "h" / "head.safetensors", bad / "head.safetensors")
    (bad / "head.json").write_text(json.dumps({**meta, "labels": ["a", "b", "c"]}))
    with pytest.raises(HeadError, match="does not match"):
        load_head(bad)
    (bad / "head.json").unlink()
    with pytest.raises(HeadError, match="missing"):
        load_head(bad)


# ---------------------------------------------------------------------------- the job
def _write_intents(path: Path, n_per_label: int) -> None:
    """Two intents told apart by their words (the tiny random model still separates them)."""
    lines = []
    for i in range(n_per_label):
        lines.append({"text": f"I lost my card number {i} yesterday", "label": "lost_card"})
        lines.append({"text": f"please send money transfer {i} today", "label": "transfer"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_job_writes_a_deterministic_head(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from training.head import cli

    _write_intents(tmp_path / "train.jsonl", 12)
    _write_intents(tmp_path / "test.jsonl", 4)
    args = ["--base", str(tiny_checkpoint), "--train", str(tmp_path / "train.jsonl"), "--test",
            str(tmp_path / "test.jsonl"), "--layer", "1", "--val_per_label", "3", "--l2", "1e-3", "1e-2",
            "--no-progress", "--precision", "fp32"]
    assert cli([*args, "--adapters_dir", str(tmp_path / "a1"), "--name", "intents"]) == 0
    assert cli([*args, "--adapters_dir", str(tmp_path / "a2"), "--name", "intents"]) == 0
    one, two = tmp_path / "a1" / "intents", tmp_path / "a2" / "intents"
    assert (one / "head.safetensors").read_bytes() == (two / "head.safetensors").read_bytes()
    info = json.loads((one / "head.json").read_text())
    assert info["labels"] == ["lost_card", "transfer"] and info["layer"] == 1 and info["pooling"] == "mean"
    assert info["base"]["name"] == tiny_checkpoint.name and len(info["base"]["weights_sha256"]) == 64
    m = info["metrics"]
    assert (m["test_n"], m["val_n"], m["train_n"]) == (8, 6, 24)
    assert m["test_accuracy"] == 1.0 and set(m["l2_scores"]) == {"0.001", "0.01"}
    # what the server does: features of the base model -> the saved head
    ckpt = load_checkpoint(tiny_checkpoint)
    loaded = load_head(one)
    feats = extract_features(ckpt.model, ckpt.tokenizer, ["I lost my card number 99 yesterday"], loaded.info.spec)
    assert loaded.info.labels[int(loaded.head(feats).argmax())] == "lost_card"
    assert info["precision"] == "fp32" and m["precision"] == "fp32"


@pytest.mark.skipif(precision_unavailable("q4") is not None, reason="no native kernels")
def test_job_trains_on_q4_features_and_the_head_says_so(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from model.head import classify_ids
    from training.head import cli

    _write_intents(tmp_path / "train.jsonl", 12)
    assert cli(["--base", str(tiny_checkpoint), "--train", str(tmp_path / "train.jsonl"), "--test", "",
                "--layer", "2", "--val_per_label", "0", "--no-progress", "--precision", "q4",
                "--adapters_dir", str(tmp_path), "--name", "intents"]) == 0
    loaded = load_head(tmp_path / "intents")
    assert loaded.info.precision == "q4" and loaded.info.layer == 2
    tok = load_checkpoint(tiny_checkpoint).tokenizer
    ids = encode_texts(tok, ["I lost my card number 99 yesterday", "please send money transfer 7 today"])
    probs = classify_ids(load_feature_model(tiny_checkpoint, 2, "q4"), loaded, ids, pad_id=0)
    assert [loaded.info.labels[max(range(2), key=p.__getitem__)] for p in probs] == ["lost_card", "transfer"]


def test_job_refuses_unknown_test_labels(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from training.head import cli

    _write_intents(tmp_path / "train.jsonl", 4)
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "hi", "label": "greeting"}) + "\n")
    rc = cli(["--base", str(tiny_checkpoint), "--train", str(tmp_path / "train.jsonl"), "--test",
              str(tmp_path / "test.jsonl"), "--layer", "1", "--no-progress", "--adapters_dir", str(tmp_path)])
    assert rc == 1 and "not in the training label set" in capsys.readouterr().err
