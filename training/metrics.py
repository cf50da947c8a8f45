"""Evaluation metrics, computed with the reference packages so the numbers are the standard ones.

ROUGE-1/2/L: `rouge-score` (F-measure, Porter stemming; with several references the best one per
example counts), BLEU and chrF: `sacrebleu` corpus scores, accuracy and macro-F1: by hand.
All scores are on a 0-100 scale except accuracy / macro-F1 (0-1).
"""

from __future__ import annotations

from collections.abc import Sequence


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100); each example scores against its best-matching reference."""
    from rouge_score import rouge_scorer

    types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, refs in zip(predictions, references, strict=True):
        best = dict.fromkeys(types, 0.0)
        for ref in refs:
            s = scorer.score(ref, pred)
            for t in types:
                best[t] = max(best[t], s[t].fmeasure)
        for t in types:
            totals[t] += best[t]
    n = max(len(predictions), 1)
    return {t: 100.0 * totals[t] / n for t in types}


def bleu_chrf(predictions: Sequence[str], references: Sequence[str], target_lang: str = "en") -> dict[str, float]:
    """Corpus BLEU (sacrebleu default 13a tokenizer; 'zh' tokenizer for Chinese targets) and chrF."""
    import sacrebleu

    tokenize = "zh" if target_lang.lower().startswith("zh") else "13a"
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(predictions), [list(references)])
    return {"bleu": bleu.score, "chrf": chrf.score}


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / max(len(gold), 1)


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Unweighted mean of per-label F1 over every label seen in gold or pred (sklearn's definition)."""
    labels = sorted(set(gold) | set(pred))
    if not labels:
        return 0.0
    f1s = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)
