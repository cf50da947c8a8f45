"""Evaluate a checkpoint offline through the inference engine (`model.engine.LLMEngine`).

    python -m training.evaluate --checkpoint runs/demo/finetune/checkpoint \\
        --classify ../shared/data/banking77/test.jsonl --classify_candidates 10 --limit 200
    python -m training.evaluate --preset cpu-demo --checkpoint default
    seedling-train evaluate --help

Tasks (each optional, each a JSONL file in the shared-data format):
  perplexity  {"text"} records (or a token shard .bin): exp(mean NLL) over windows, via engine.score
  summarize   {"document", "summary"[, "references"]}: greedy summaries, ROUGE-1/2/L (rouge-score)
  translate   {"src", "tgt", "src_lang", "tgt_lang"}: greedy translations, BLEU + chrF (sacrebleu)
  classify    {"text", "label"}: the /classify ranking — every candidate label is scored as the
              assistant answer (sum log p(label tokens + <|im_end|> | prompt) via engine.score),
              calibrated against the label set's content-free prior, and the best one is the
              prediction; accuracy + macro-F1, and the accuracy of every calibration
Prompts, the length rule and the label math come from `model.tasks`, as in the server.
Writes `report.json` and `report.md` into `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import tasks
from model.device import resolve_device
from training import metrics
from training.common import (
    TrainingError,
    config_dict,
    field,
    run_job,
    set_threads,
    write_json,
)
from training.data import candidate_labels, iter_jsonl, read_labels, read_shard, task_messages

SHARED = "../shared/data"
LIST_LABELS = {"auto": None, "yes": True, "no": False}  # --classify_list_labels


@dataclass
class EvaluateConfig:
    checkpoint: str = field("default", help="checkpoint dir, or 'default' (SmolLM2-135M-Instruct)")
    adapter: str = field("", help="LoRA adapter dir (peft format, from training.adapt) merged into the checkpoint")
    out_dir: str = field("runs/eval", help="where report.json and report.md go")
    perplexity: str = field("", help="JSONL of {text} (or a .bin token shard) for perplexity")
    summarize: str = field("", help="JSONL of {document, summary[, references]}")
    translate: str = field("", help="JSONL of {src, tgt, src_lang, tgt_lang}")
    classify: str = field("", help="JSONL of {text, label}")
    labels: list[str] = field(default_factory=list, help="classification label set (default: labels.json "
                              "next to the data, else the checkpoint's 'classify' labels, else the data's)")
    classify_candidates: int = field(0, help="candidates per example: gold + k-1 random others (0 = all labels)")
    classify_calibration: str = field(tasks.DEFAULT_CALIBRATION.value, help="label score calibration: "
                                      + ", ".join(c.value for c in tasks.Calibration) + " (model/tasks.py)")
    classify_list_labels: str = field("auto", help="name every label in the classify prompt: yes, no, or auto "
                                      "(as the server: when there are at most model.tasks.LIST_LABELS_UP_TO)")
    classify_rescore: str = field("", help="no model: re-rank a run's classify_examples.jsonl (its logged raw scores) "
                                  "with this code's calibrations and print the accuracy of each")
    classify_channel: str = field("yes", help="also score the channel direction (the text after each label's "
                                  "prompt; the channel calibrations need it): yes or no (the direct ones only, "
                                  "~1/4 of the compute on Banking77)")
    limit: int = field(200, help="examples per task (a seeded random sample of N; 0 = all)")
    max_new_tokens: int = field(64, help="generation budget for summarize / translate")
    ppl_window: int = field(256, help="tokens per perplexity window")
    max_num_seqs: int = field(8, help="engine: sequences decoded together")
    max_model_len: int = field(2048, help="engine: prompt + output tokens per sequence")
    seed: int = field(0, help="seed for sampling the evaluated examples and the label candidates")
    device: str = field("auto", help="auto, cpu, cuda")
    quantize: str = field("auto", help="serving variant, as the server's SEEDLING_QUANTIZE: auto (q4 on a CPU "
                          "with the native kernels, ~3x fp32's scoring speed), none, int8, w8a8 or q4")
    threads: int = field(0, help="CPU threads for torch (0 = torch default)")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(limit=4, max_new_tokens=8, ppl_window=32, max_num_seqs=4, max_model_len=512, threads=1),
    "cpu-demo": dict(classify=f"{SHARED}/banking77/test.jsonl", classify_candidates=10, limit=200,
                     summarize=f"{SHARED}/dialogsum/test.jsonl", translate=f"{SHARED}/tatoeba_en_zh/test.jsonl",
                     perplexity=f"{SHARED}/en_public_domain_text/validation.jsonl", max_new_tokens=48,
                     threads=1),
    "gpu": dict(classify=f"{SHARED}/banking77/test.jsonl", limit=0, summarize=f"{SHARED}/dialogsum/test.jsonl",
                translate=f"{SHARED}/wmt22_general/test.en-de.jsonl",
                perplexity=f"{SHARED}/en_public_domain_text/validation.jsonl", max_num_seqs=64,
                max_new_tokens=128),
}


def _records(path: str, limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """All records, or `limit` of them drawn at random (seeded, file order kept): test files are often
    sorted by label, so the first N would be one class."""
    p = Path(path)
    if not p.exists():
        raise TrainingError(f"evaluation file {p} not found")
    recs = list(iter_jsonl(p))
    if limit and limit < len(recs):
        keep = sorted(random.Random(seed).sample(range(len(recs)), limit))
        recs = [recs[i] for i in keep]
    return recs


def prompt_ids(tokenizer: Any, task: str, record: dict[str, Any]) -> list[int]:
    """The prompt of a shared-data record: its training conversation (`training.data.task_messages`)
    without the answer, rendered as the server renders requests."""
    return tasks.render_prompt(tokenizer, task_messages(task, record)[:-1])


def _greedy(engine: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy completions, decoded from the output ids (special tokens such as <|im_end|> dropped)."""
    from model.sampling import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    return [tokenizer.decode(o.token_ids).strip() for o in outs]


# ---------------------------------------------------------------------------- tasks
def eval_perplexity(engine: Any, tokenizer: Any, path: str, limit: int, window: int) -> dict[str, Any]:
    """exp(mean NLL) of each window's tokens 2..W given the first, summed through engine.score."""
    if path.endswith(".bin"):
        ids = [int(t) for t in read_shard(Path(path), tokenizer.vocab_size).tokens]
    else:
        ids = []
        for r in _records(path, limit):
            ids += tokenizer.encode(r["text"]) + [tokenizer.eos_id]
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1][: (limit or None)]
    nll = sum(-engine.score(w[:1], [w[1:]])[0] for w in windows)
    n = sum(len(w) - 1 for w in windows)
    return {"windows": len(windows), "tokens": n, "nll": nll / max(n, 1), "perplexity": math.exp(nll / max(n, 1))}


def _fitting(engine: Any, prompts: list[list[int]], recs: list[dict[str, Any]], max_new: int
             ) -> tuple[list[list[int]], list[dict[str, Any]], int]:
    """Drop examples whose prompt + generation budget exceed the engine's max_model_len (counted)."""
    keep = [i for i, p in enumerate(prompts) if _fits(len(p), engine.config.max_model_len, max_new)]
    return [prompts[i] for i in keep], [recs[i] for i in keep], len(prompts) - len(keep)


def _fits(prompt_tokens: int, max_model_len: int, needed: int) -> bool:
    try:
        tasks.check_length(prompt_tokens, max_model_len, needed)
    except tasks.TaskError:
        return False
    return True


def eval_summarize(engine: Any, tokenizer: Any, path: str, limit: int, max_new: int) -> dict[str, Any]:
    recs = _records(path, limit)
    prompts = [prompt_ids(tokenizer, tasks.SUMMARIZE, r) for r in recs]
    prompts, recs, skipped = _fitting(engine, prompts, recs, max_new)
    preds = _greedy(engine, tokenizer, prompts, max_new)
    refs = [r.get("references") or [r["summary"]] for r in recs]
    return {"examples": len(recs), "skipped_too_long": skipped, **metrics.rouge(preds, refs),
            "samples": [{"prediction": p, "reference": r[0]} for p, r in zip(preds[:3], refs[:3], strict=True)]}


def eval_translate(engine: Any, tokenizer: Any, path: str, limit: int, max_new: int) -> dict[str, Any]:
    recs = _records(path, limit)
    prompts = [prompt_ids(tokenizer, tasks.TRANSLATE, r) for r in recs]
    prompts, recs, skipped = _fitting(engine, prompts, recs, max_new)
    preds = _greedy(engine, tokenizer, prompts, max_new)
    target = recs[0]["tgt_lang"] if recs else "en"
    return {"examples": len(recs), "skipped_too_long": skipped, "target_lang": target, **metrics.bleu_chrf(preds, [r["tgt"] for r in recs], target),
            "samples": [{"source": r["src"], "prediction": p, "reference": r["tgt"]}
                        for r, p in zip(recs[:3], preds[:3], strict=True)]}


@dataclass
class LabelScores:
    """Everything a calibration needs for one text, in `spec.labels` order."""
    loglik: list[float]  # direct: log p(label answer | classify prompt)
    lengths: list[int]  # answer tokens per label
    prior: list[float]  # the label set's content-free prior
    channel: list[float] | None  # log p(text | label prompt), None when not scored

    def probabilities(self, calibration: tasks.Calibration) -> list[float]:
        return tasks.label_probabilities(self.loglik, self.lengths, self.prior, calibration, channel=self.channel)


@dataclass
class Classifier:
    """The /classify scoring offline: the same `model.tasks` prompts, continuations, content-free prior,
    channel prompts and calibration as the server, through the engine's score / score_after. Priors are
    cached per label set, as the server caches them (and the engine keeps the channel prompts' K/V)."""

    engine: Any
    tokenizer: Any
    list_labels: bool | None = None  # None: as the server (model.tasks.LIST_LABELS_UP_TO)
    channel: bool = True  # also score the channel direction (every calibration is then reported)
    priors: dict[tasks.ClassifySpec, list[float]] = dataclasses.field(default_factory=dict)

    def spec(self, labels: list[str]) -> tasks.ClassifySpec:
        return tasks.ClassifySpec.build(labels, list_labels=self.list_labels)

    @torch.inference_mode()
    def logliks(self, spec: tasks.ClassifySpec, text: str) -> LabelScores:
        """The text's label scores. Raises ContextTooLong when a prompt + its longest continuation do
        not fit."""
        conts = tasks.label_continuations(self.tokenizer, spec)
        prompt = tasks.render_prompt(self.tokenizer, spec.messages(text))
        max_len = self.engine.config.max_model_len
        tasks.check_length(len(prompt), max_len, max(len(c) for c in conts), "text")
        channel = None
        if self.channel:
            c_prompts = tasks.channel_prompts(self.tokenizer, spec)
            cont = tasks.channel_continuation(self.tokenizer, text)
            tasks.check_length(max(len(p) for p in c_prompts), max_len, len(cont), "text")
            channel = self.engine.score_after(c_prompts, cont)
        if spec not in self.priors:
            free = tasks.content_free_prompts(self.tokenizer, spec)
            self.priors[spec] = tasks.content_free_prior([self.engine.score(p, conts) for p in free])
        return LabelScores(self.engine.score(prompt, conts), [len(c) for c in conts], self.priors[spec], channel)

    def classify(self, text: str, labels: list[str], calibration: tasks.Calibration = tasks.DEFAULT_CALIBRATION
                 ) -> tuple[str, list[float]]:
        """The best label and every label's probability, in the caller's `labels` order."""
        spec = self.spec(labels)
        probs = dict(zip(spec.labels, self.logliks(spec, text).probabilities(calibration), strict=True))
        return tasks.rank_labels(spec.labels, list(probs.values()))[0][0], [probs[lab.strip()] for lab in labels]


def eval_classify(classifier: Classifier, path: str, limit: int, labels: list[str], candidates: int,
                  seed: int, calibration: tasks.Calibration, log: Path | None = None) -> dict[str, Any]:
    """Accuracy and macro-F1 of `calibration`, plus the accuracy of every calibration on the same
    scores (to choose one on a validation split at the cost of one; the channel ones only when the
    classifier scores the channel direction). `log` gets one JSON line per example as it is scored
    (gold, each calibration's prediction, the raw scores), so a long run that is stopped early still
    shows what it measured."""
    recs = _records(path, limit, seed)
    rng = random.Random(seed)
    rng.shuffle(recs)  # label-sorted files: any prefix of the log is then a fair sample too
    cals = [c for c in tasks.Calibration if classifier.channel or c not in tasks.CHANNEL_CALIBRATIONS]
    if tasks.Calibration(calibration) not in cals:
        raise TrainingError(f"calibration {tasks.Calibration(calibration).value} needs the channel scores "
                            "(--classify_channel yes)")
    gold: list[str] = []
    preds: dict[tasks.Calibration, list[str]] = {cal: [] for cal in cals}
    skipped, t0 = 0, time.perf_counter()
    sink = log.open("w", encoding="utf-8") if log else None
    for r in recs:
        spec = classifier.spec(candidate_labels(str(r["label"]), labels, candidates, rng))
        try:
            scores = classifier.logliks(spec, r["text"])
        except tasks.ContextTooLong:
            skipped += 1
            continue
        gold.append(str(r["label"]))
        for cal in cals:
            preds[cal].append(tasks.rank_labels(spec.labels, scores.probabilities(cal))[0][0])
        if sink:
            sink.write(json.dumps({"gold": gold[-1], **{c.value: p[-1] for c, p in preds.items()},
                                   "labels": list(spec.labels), "scores": dataclasses.asdict(scores)}) + "\n")
            sink.flush()
    if sink:
        sink.close()
    seconds = time.perf_counter() - t0
    pred = preds[tasks.Calibration(calibration)]
    return {"examples": len(gold), "skipped_too_long": skipped, "labels": len(labels),
            "candidates_per_example": candidates if 0 < candidates < len(labels) else len(labels),
            "calibration": tasks.Calibration(calibration).value, "list_labels": classifier.list_labels,
            "accuracy": metrics.accuracy(gold, pred), "macro_f1": metrics.macro_f1(gold, pred),
            "accuracy_by_calibration": {cal.value: metrics.accuracy(gold, p) for cal, p in preds.items()},
            "texts_per_s": round(len(gold) / max(seconds, 1e-9), 3)}


def rescore_classify(path: str) -> dict[str, Any]:
    """Accuracy of every calibration of this code (`LabelScores.probabilities`, what the server runs)
    on the raw scores an earlier run logged: a calibration constant changed after the run (chosen on a
    validation split) is measured on a test run without scoring it again."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise TrainingError(f"{path} has no scored examples")
    cals = [c for c in tasks.Calibration if rows[0]["scores"]["channel"] is not None or c not in tasks.CHANNEL_CALIBRATIONS]
    correct = dict.fromkeys(cals, 0)
    for r in rows:
        scores = LabelScores(**r["scores"])
        for cal in cals:
            correct[cal] += tasks.rank_labels(r["labels"], scores.probabilities(cal))[0][0] == r["gold"]
    return {"examples": len(rows), "accuracy_by_calibration": {c.value: correct[c] / len(rows) for c in cals}}


def classification_labels(cfg: EvaluateConfig, meta: dict[str, Any]) -> list[str]:
    if cfg.labels:
        return list(cfg.labels)
    from_file = read_labels(Path(cfg.classify))
    if from_file:
        return from_file
    if meta.get("labels", {}).get(tasks.CLASSIFY):
        return list(meta["labels"][tasks.CLASSIFY])
    return sorted({str(r["label"]) for r in iter_jsonl(Path(cfg.classify))})


# ---------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{report['checkpoint']}`", "", f"{report['seconds']:.0f} s on {report['device']}.", "",
             "| task | metric | value |", "|---|---|---:|"]
    for task, res in report["results"].items():
        for k, v in res.items():
            if isinstance(v, float):
                lines.append(f"| {task} | {k} | {v:.4f} |")
            elif isinstance(v, int) and not isinstance(v, bool):
                lines.append(f"| {task} | {k} | {v} |")
    for task, res in report["results"].items():
        if res.get("samples"):
            lines += ["", f"## {task}: samples", ""]
            lines += [f"- `{json.dumps(s, ensure_ascii=False)}`" for s in res["samples"]]
    return "\n".join(lines) + "\n"


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    from model.adapters import AdapterError
    from model.checkpoint import CheckpointError, resolve_checkpoint
    from model.engine import EngineConfig, LLMEngine
    from model.inference import load_for_serving

    if cfg.classify_rescore:
        result = rescore_classify(cfg.classify_rescore)
        print(f"classify (rescored {cfg.classify_rescore}): {result['examples']} examples; by calibration: "
              f"{result['accuracy_by_calibration']}")
        return result
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    try:
        path = resolve_checkpoint(cfg.checkpoint)
        served = load_for_serving(path, device=device, dtype=torch.float32, quantize=cfg.quantize,
                                  adapters=[cfg.adapter] if cfg.adapter else None)
    except (CheckpointError, AdapterError, ValueError) as e:
        raise TrainingError(str(e)) from e
    if not any((cfg.perplexity, cfg.summarize, cfg.translate, cfg.classify)):
        raise TrainingError("nothing to evaluate: pass --perplexity, --summarize, --translate or --classify")
    tok = served.tokenizer
    max_len = min(cfg.max_model_len, served.model.config.max_seq_len)
    engine = LLMEngine(served.model, tok, EngineConfig(max_num_seqs=cfg.max_num_seqs, max_model_len=max_len,
                                                       max_num_batched_tokens=max(512, cfg.max_num_seqs),
                                                       prefill_chunk=256))
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    if cfg.perplexity:
        results["perplexity"] = eval_perplexity(engine, tok, cfg.perplexity, cfg.limit, min(cfg.ppl_window, max_len))
        print(f"perplexity: {results['perplexity']['perplexity']:.3f} over {results['perplexity']['tokens']} tokens")
    if cfg.summarize:
        results["summarize"] = eval_summarize(engine, tok, cfg.summarize, cfg.limit, cfg.max_new_tokens)
        r = results["summarize"]
        print(f"summarize: ROUGE-1 {r['rouge1']:.2f}  ROUGE-2 {r['rouge2']:.2f}  ROUGE-L {r['rougeL']:.2f}")
    if cfg.translate:
        results["translate"] = eval_translate(engine, tok, cfg.translate, cfg.limit, cfg.max_new_tokens)
        r = results["translate"]
        print(f"translate: BLEU {r['bleu']:.2f}  chrF {r['chrf']:.2f}")
    if cfg.classify:
        labels = classification_labels(cfg, served.meta)
        if cfg.classify_list_labels not in LIST_LABELS:
            raise TrainingError(f"--classify_list_labels must be one of {sorted(LIST_LABELS)}")
        if cfg.classify_channel not in ("yes", "no"):
            raise TrainingError("--classify_channel must be yes or no")
        classifier = Classifier(engine, tok, LIST_LABELS[cfg.classify_list_labels], cfg.classify_channel == "yes")
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        results["classify"] = eval_classify(classifier, cfg.classify, cfg.limit, labels, cfg.classify_candidates,
                                            cfg.seed, tasks.Calibration(cfg.classify_calibration),
                                            Path(cfg.out_dir) / "classify_examples.jsonl")
        r = results["classify"]
        print(f"classify: accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f} over {r['examples']} examples, "
              f"{r['candidates_per_example']} candidate labels each ({r['calibration']}); by calibration: "
              f"{r['accuracy_by_calibration']}")
    report = {"checkpoint": str(path), "adapter": cfg.adapter or None, "device": str(device),
              "serving_path": served.model.capabilities.path, "config": config_dict(cfg), "results": results,
              "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(cfg.out_dir)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return report


def cli(argv: list[str] | None = None, prog: str = "python -m training.evaluate") -> int:
    return run_job(main, EvaluateConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
