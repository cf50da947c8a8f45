"""evaluate's /classify ranking: the best label is the one with the highest engine.score, and
engine.score (prompt computed once, continuations packed) equals a full recompute per label."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.evaluate import classify_one


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
    best, scores = classify_one(engine, ckpt.tokenizer, "I lost my card", labels)
    assert best == labels[max(range(3), key=lambda i: scores[i])] and len(scores) == 3
