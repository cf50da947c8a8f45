"""Data preparation (cleaning, Chinese intact, duplicates, splits), the SFT loss mask, and the metrics
checked against rouge-score / sacrebleu / hand-computed values on a fixed toy set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from model import tasks
from tests.fixtures.training_corpus import write_jsonl
from training import metrics, prepare_data
from training.common import build_config
from training.data import candidate_labels, render_example, sft_batch, task_messages


# ---------------------------------------------------------------------------- prepare_data
def test_clean_text_keeps_chinese_and_strips_html_and_controls() -> None:
    zh = "银行卡丢了怎么办？我们去公园散步，好吗！「引号」"
    assert prepare_data.clean_text(zh) == zh
    assert prepare_data.clean_text("<p>Fish &amp; chips</p>\x07  ok\r\n\n\n\nend") == "Fish & chips ok\n\nend"
    assert prepare_data.clean_text("ﬁne Ｈｅｌｌｏ") == "fine Hello"  # NFKC on non-CJK text


def test_prepare_data_dedups_filters_and_splits_deterministically(tmp_path: Path) -> None:
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(500)]
    base = [" ".join(rng.choice(vocab) for _ in range(40)) + "." for _ in range(60)]
    words = base[3].split()
    near = " ".join(words[:-1] + ["changed."])  # one word of 40 differs: Jaccard ~0.95
    recs = [{"text": t} for t in base] + [{"text": base[0].upper()}, {"text": near}, {"text": "short"},
                                           {"text": "今天天气很好。我们去公园散步。银行卡丢了怎么办？"}]
    write_jsonl(tmp_path / "in.jsonl", recs)
    (tmp_path / "in.txt").write_text("A plain text paragraph that is long enough to keep.\n\nshort\n")
    cfg = build_config(prepare_data.PrepareDataConfig, prepare_data.PRESETS, "tiny",
                       inputs=[str(tmp_path / "in.jsonl"), str(tmp_path / "in.txt")], out_dir=str(tmp_path / "a"))
    rep = prepare_data.main(cfg)
    assert rep["dropped"]["exact_duplicate"] == 1 and rep["dropped"]["too_short"] == 2
    assert rep["dropped"]["near_duplicate"] >= 1
    prepare_data.main(build_config(prepare_data.PrepareDataConfig, prepare_data.PRESETS, "tiny",
                                   inputs=cfg.inputs, out_dir=str(tmp_path / "b")))
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    texts = [json.loads(line)["text"] for f in ("train.jsonl", "val.jsonl")
             for line in (tmp_path / "a" / f).read_text().splitlines()]
    assert "今天天气很好。我们去公园散步。银行卡丢了怎么办？" in texts
    assert rep["val_docs"] >= 1 and rep["train_docs"] + rep["val_docs"] == len(texts)


def test_sentence_splitter_and_chunking() -> None:
    sp = prepare_data.SentenceSplitter([f"Dr. Smith met Dr. Jones on day {i}. They talked." for i in range(200)])
    assert sp.split("Dr. Who arrived. Then he left.\n今天很好。明天下雨！") == \
        ["Dr. Who arrived.", "Then he left.", "今天很好。", "明天下雨！"]
    assert prepare_data.chunk(["aaaa", "bbbb", "cc"], 9) == ["aaaa bbbb", "cc"]


# ---------------------------------------------------------------------------- SFT loss mask
@pytest.mark.parametrize("which", ["tiny_sp_tokenizer", "tiny_bpe_tokenizer"])
def test_loss_mask_covers_exactly_the_assistant_tokens(which: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(which)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! 你好"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    ex = render_example(tok, msgs, tasks.CHAT)
    masked = [i for i, m in zip(ex.ids, ex.loss_mask, strict=True) if m]
    expected = tok.encode("Hello! 你好") + [tok.im_end_id] + tok.encode("Goodbye.") + [tok.im_end_id]
    assert masked == expected
    x, y, w = sft_batch([ex, render_example(tok, msgs[:3], tasks.CHAT)], pad_id=tok.pad_id)
    assert x.shape == y.shape == w.shape and x.shape[1] == len(ex.ids) - 1
    assert [int(t) for t, m in zip(y[0], w[0], strict=True) if m] == expected  # targets = assistant tokens
    assert w[1].sum() == len(tok.encode("Hello! 你好")) + 1  # padding never counts


def test_classify_example_uses_the_shared_prompt_and_answer() -> None:
    labels = [f"l{i}" for i in range(20)]
    rng = random.Random(0)
    msgs = task_messages(tasks.CLASSIFY, {"text": "hello", "label": "l7"}, labels, 5, rng)
    assert msgs[:-1] == tasks.classify_messages("hello", candidate_labels("l7", labels, 5, random.Random(0)))
    assert msgs[-1] == {"role": "assistant", "content": tasks.classify_answer("l7")}
    cands = candidate_labels("l7", labels, 5, random.Random(1))
    assert len(cands) == 5 and "l7" in cands and len(set(cands)) == 5
    assert candidate_labels("l7", labels, 0, rng) == labels


# ---------------------------------------------------------------------------- metrics
PREDS = ["the cat sat on the mat", "a dog barked loudly at night", "hello world"]
REFS = ["the cat was sitting on the mat", "the dog barked at night", "goodbye world"]


def test_rouge_matches_rouge_score() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = metrics.rouge(PREDS, [[r] for r in REFS])
    for key in ("rouge1", "rouge2", "rougeL"):
        want = 100 * sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS, strict=True)) / 3
        assert got[key] == pytest.approx(want, abs=1e-9)
    # multi-reference: the best reference counts
    assert metrics.rouge(["hello world"], [["goodbye world", "hello world"]])["rouge1"] == pytest.approx(100.0)
    # hand-checked: unigram overlap of "the cat sat" vs "the cat" -> P=2/3, R=1 -> F=0.8
    assert metrics.rouge(["the cat sat"], [["the cat"]])["rouge1"] == pytest.approx(80.0)


def test_bleu_chrf_match_sacrebleu() -> None:
    import sacrebleu

    got = metrics.bleu_chrf(PREDS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    assert metrics.bleu_chrf(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100.0)
    zh = metrics.bleu_chrf(["我喜欢喝茶"], ["我喜欢喝茶"], target_lang="zh")
    assert zh["bleu"] == pytest.approx(100.0)


def test_accuracy_and_macro_f1_hand_computed() -> None:
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    assert metrics.accuracy(gold, pred) == pytest.approx(3 / 5)
    # a: tp1 fp1 fn1 -> 0.5; b: tp2 fp1 fn0 -> 0.8; c: tp0 -> 0 ; macro = 1.3/3
    assert metrics.macro_f1(gold, pred) == pytest.approx(1.3 / 3)


def test_masked_loss_equals_full_logits_mean_over_assistant_tokens(tiny_checkpoint, tiny_sp_tokenizer) -> None:
    import torch
    import torch.nn.functional as F

    from model.checkpoint import load_checkpoint
    from training.finetune import masked_loss

    model = load_checkpoint(tiny_checkpoint).model
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    exs = [render_example(tiny_sp_tokenizer, msgs, tasks.CHAT), render_example(tiny_sp_tokenizer, msgs[:1] + [
        {"role": "assistant", "content": "A longer answer, with more tokens."}], tasks.CHAT)]
    x, y, w = sft_batch(exs, pad_id=tiny_sp_tokenizer.pad_id)
    loss, n = masked_loss(model, x, y, w)
    nll = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
    assert n == w.sum() and torch.allclose(loss, (nll * w.flatten()).sum() / w.sum(), atol=1e-6)
