"""evaluate's /classify ranking: the fast shared-prefix scorer gives engine.score's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.evaluate import classify_one, prefix_score


def test_prefix_scorer_matches_engine_score(tiny_checkpoint: Path) -> None:
    from model.checkpoint import load_checkpoint
    from model.engine import EngineConfig, LLMEngine

    ckpt = load_checkpoint(tiny_checkpoint, dtype=torch.float32)
    engine = LLMEngine(ckpt.model, ckpt.tokenizer, EngineConfig(max_num_seqs=2, max_model_len=256))
    prompt = ckpt.tokenizer.encode("a prompt of some length for scoring")
    conts = [ckpt.tokenizer.encode(t) + [ckpt.tokenizer.im_end_id] for t in ("yes", "no way", "maybe so then")]
    conts.append([ckpt.tokenizer.im_end_id])  # a one-token continuation
    want = engine.score(prompt, conts)
    assert prefix_score(ckpt.model, prompt, conts) == pytest.approx(want, abs=1e-4)
    labels = ["lost_card", "card_arrival", "exchange_rate"]
    best_e, s_e = classify_one(engine, ckpt.tokenizer, "I lost my card", labels, "engine")
    best_p, s_p = classify_one(engine, ckpt.tokenizer, "I lost my card", labels, "prefix")
    assert best_e == best_p == labels[max(range(3), key=lambda i: s_e[i])]
    assert s_p == pytest.approx(s_e, abs=1e-4)
