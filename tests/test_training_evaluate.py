"""evaluate's /classify ranking: the server's calibrated label probabilities from engine.score, and
engine.score (prompt computed once, continuations packed) equals a full recompute per label."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model import tasks
from training.evaluate import Classifier


def test_classify_one_ranks_by_full_recompute_log_likelihood(tiny_checkpoint: Path) -> None:
    from model.checkpoint import load_checkpoint
    from model.engine import EngineConfig, LLMEngine
    from model.inference import prepare_for_serving

    ckpt = load_checkpoint(tiny_checkpoint, dtype=torch.float32)
    engine = LLMEngine(prepare_for_serving(ckpt.model), ckpt.tokenizer, EngineConfig(max_num_seqs=2, max_model_len=256))
    prompt = ckpt.tokenizer.encode("a prompt of some length for scoring")
    conts = [ckpt.tokenizer.encode(t) + [ckpt.tokenizer.im_end_id] for t in ("yes", "no way", "maybe so then")]
    conts.append([ckpt.tokenizer.im_end_id])  # a one-token continuation
    want = []
    with torch.inference_mode():
        for c in conts:
            logp = torch.log_softmax(ckpt.model(torch.tensor([prompt + c]))[0].double(), -1)
            want.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(c)))
    assert engine.score(prompt, conts) == pytest.approx(want, abs=1e-4)
    labels = ["lost_card", "card_arrival", "exchange_rate"]
    classifier = Classifier(engine, ckpt.tokenizer)
    best, probs = classifier.classify("I lost my card", labels, tasks.Calibration.PRIOR_MEAN)
    assert best == labels[max(range(3), key=lambda i: probs[i])] and sum(probs) == pytest.approx(1.0)
    # the probabilities are the prior-calibrated softmax of engine.score, the prior scored once per label set
    spec = classifier.spec(labels)
    conts = tasks.label_continuations(ckpt.tokenizer, spec)
    ll = engine.score(tasks.render_prompt(ckpt.tokenizer, spec.messages("I lost my card")), conts)
    prior = tasks.content_free_prior([engine.score(p, conts) for p in tasks.content_free_prompts(ckpt.tokenizer, spec)])
    pmi = [(v - p) / len(c) for v, p, c in zip(ll, prior, conts, strict=True)]
    want = [math.exp(s) / sum(math.exp(t) for t in pmi) for s in pmi]
    assert dict(zip(spec.labels, want, strict=True)) == pytest.approx(dict(zip(labels, probs, strict=True)))
    assert list(classifier.priors) == [spec]


def test_eval_classify_logs_raw_scores_that_rescore_to_the_same_accuracies(tiny_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    """The evaluator reports every calibration (channel ones included) from one scoring pass, logs each
    example's raw scores, and `--classify_rescore` re-ranks that log with the same code: same numbers."""
    import json

    from training.evaluate import cli

    data = tmp_path / "data.jsonl"
    rows = [{"text": t, "label": lab} for t, lab in [("I lost my card", "lost_card"), ("where is my card", "card_arrival"),
                                                     ("euro to dollar rate", "exchange_rate"), ("card gone", "lost_card")]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert cli(["--checkpoint", str(tiny_checkpoint), "--classify", str(data), "--limit", "0", "--out_dir", str(out),
                "--max_model_len", "256", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())["results"]["classify"]
    by_cal = report["accuracy_by_calibration"]
    assert set(by_cal) == {c.value for c in tasks.Calibration} and report["examples"] == 4
    logged = [json.loads(line) for line in (out / "classify_examples.jsonl").read_text().splitlines()]
    assert len(logged[0]["scores"]["channel"]) == len(logged[0]["labels"]) == 3
    from training.evaluate import rescore_classify

    assert rescore_classify(str(out / "classify_examples.jsonl"))["accuracy_by_calibration"] == pytest.approx(by_cal)
