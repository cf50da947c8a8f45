"""Train a classification head on frozen features of a base model (Banking77 by default).

    python -m training.head                                   # default model, Banking77, adapters/banking77/
    python -m training.head --preset quick                    # a 1-2 minute smoke run (fewer examples)
    python -m training.head --train my/train.jsonl --test my/test.jsonl --name my_intents --adapters_dir adapters
    seedling-train head --help

Features are pooled hidden states of the first `--layer` blocks (`model.features`), so extraction
costs layer / n_layers of a full forward per text; the head is a multinomial logistic regression
(`--hidden 0`, full-batch L-BFGS) or a small MLP. A stratified `--val_per_label` examples per label
are held out of the training file to choose the L2 strength (`--l2` lists the candidates); the head
is then refitted on all training examples with the chosen value. The test file is only scored, never
used for a choice. The result goes to `<adapters_dir>/<name>/head.safetensors` + `head.json`
(written atomically), which the server's `/classify` serves when a request's label set matches.

Deterministic (fixed seeds, one CPU thread by default): re-running the same command writes the same
head. Not resumable: on this 2-core CPU the whole job takes minutes, so a killed run is simply re-run
(`--cache_dir` keeps extracted features between runs to make that cheaper still).
`--time_budget_min` stops feature extraction early (training on the examples extracted so far) so the
job ends within the budget; the head then depends on machine speed and the job says so.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.common import TrainingError, field, run_job, set_threads

SHARED = "../shared/data"


@dataclass
class HeadConfig:
    base: str = field("default", help="checkpoint dir of the frozen base model, or 'default' (SmolLM2-135M-Instruct)")
    train: str = field(f"{SHARED}/banking77/train.jsonl", help="training JSONL of {text, label}")
    test: str = field(f"{SHARED}/banking77/test.jsonl", help="test JSONL to score at the end ('' = none)")
    name: str = field("banking77", help="adapter name: the head goes to <adapters_dir>/<name>/")
    adapters_dir: str = field("adapters", help="directory of adapters (the server's SEEDLING_ADAPTERS_DIR)")
    layer: int = field(1, help="pool the hidden states after this many blocks (shallower = cheaper; blocks 1-6 "
                       "score within noise on Banking77's held-out split, block 1 costs 1/5 of block 5: "
                       "docs/classification-head.md)")
    pooling: str = field("mean", help="mean, last or mean+last over the text's tokens")
    template: str = field("{text}", help="prompt wrapper around the text; must contain {text}")
    hidden: int = field(0, help="MLP hidden width (0 = logistic regression)")
    l2: list[float] = field(default_factory=lambda: [3e-4, 1e-3], help="L2 strengths (logistic regression) or "
                            "AdamW weight decays (MLP) tried on the held-out split; the best is refitted on all "
                            "training data")
    val_per_label: int = field(10, help="training examples per label held out to choose --l2")
    max_train: int = field(0, help="train on a seeded-random sample of this many examples besides the held-out "
                           "ones (0 = all)")
    max_test: int = field(0, help="score a seeded-random sample of this many test examples (0 = all)")
    epochs: int = field(40, help="MLP epochs (logistic regression runs L-BFGS to convergence)")
    lr: float = field(3e-3, help="MLP peak learning rate (AdamW, cosine decay)")
    mlp_batch: int = field(256, help="MLP examples per optimizer step")
    batch_size: int = field(32, help="texts per feature-extraction forward")
    precision: str = field("auto", help="how the frozen base runs: q4 (the native kernels of q4 serving; ~3x "
                           "bf16's speed on AVX-512, features within 1e-4 cosine of bf16), bf16, fp32, or auto (q4 "
                           "where the native kernels are vectorised, else bf16 where native, else fp32); the "
                           "server computes the head's features the same way")
    threads: int = field(1, help="CPU threads for torch (1 is fastest on a shared CPU)")
    seed: int = field(0, help="seed for the held-out split, sampling and head initialisation")
    time_budget_min: float = field(0.0, help="stop extracting training features when this much wall time is "
                                   "spent, leaving time to fit (0 = no limit)")
    cache_dir: str = field("", help="keep extracted features here between runs ('' = no cache)")
    progress: bool = field(True, help="show a tqdm progress bar")

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.mlp_batch <= 0 or self.batch_size <= 0:
            raise ValueError("epochs, mlp_batch and batch_size must be positive")
        if min(self.val_per_label, self.max_train, self.max_test, self.hidden) < 0:
            raise ValueError("val_per_label, max_train, max_test and hidden must be >= 0")
        if not self.l2 or any(v < 0 for v in self.l2):
            raise ValueError("l2 must list at least one non-negative value")
        if self.precision not in ("auto", "q4", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, q4, bf16 or fp32, got {self.precision!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # a smoke run of a minute or two: 770 training examples, 400 test examples
    "quick": dict(max_train=770, val_per_label=0, max_test=400, l2=[1e-3]),
    # +1.4 points held-out on Banking77 over logistic regression, ~5x the fitting time
    "mlp": dict(hidden=1024, l2=[0.1], epochs=40, lr=3e-3, mlp_batch=256),
}


# ---------------------------------------------------------------------------- fitting
def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_labels: int, l2: float, seed: int,
                 max_iter: int = 500) -> torch.nn.Module:
    """Multinomial logistic regression on standardised features: full-batch L-BFGS on
    cross-entropy + l2/2 * |W|^2 (the bias is not penalised). Deterministic for fixed inputs."""
    from model.head import ClassifierHead

    torch.manual_seed(seed)
    head = ClassifierHead(x.shape[1], n_labels)
    head.set_standardisation(x)
    linear = head.net[-1]
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    z = (x - head.mean) / head.std

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(z), y) + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.eval()


def fit_mlp(x: torch.Tensor, y: torch.Tensor, n_labels: int, weight_decay: float, seed: int, hidden: int,
            epochs: int, lr: float, batch_size: int = 256) -> torch.nn.Module:
    """One-hidden-layer MLP on standardised features: AdamW, dropout 0.1, cosine LR; minibatch order
    from a seeded generator, so a run on one thread is repeatable."""
    from model.head import ClassifierHead

    torch.manual_seed(seed)
    head = ClassifierHead(x.shape[1], n_labels, hidden=hidden, dropout=0.1)
    head.set_standardisation(x)
    opt = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def fit_head(x: torch.Tensor, y: torch.Tensor, n_labels: int, l2: float, cfg: HeadConfig) -> torch.nn.Module:
    if cfg.hidden:
        return fit_mlp(x, y, n_labels, l2, cfg.seed, cfg.hidden, cfg.epochs, cfg.lr, cfg.mlp_batch)
    return fit_logistic(x, y, n_labels, l2, cfg.seed)


@torch.no_grad()
def accuracy(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(-1) == y).float().mean()) if len(y) else float("nan")


# ---------------------------------------------------------------------------- data
@dataclass
class Split:
    texts: list[str]
    y: torch.Tensor  # (N,) label indices


def read_split(path: str, labels: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(texts, labels of the file, label index per text); `labels` fixes the label order (and rejects
    unknown labels), else labels.json next to the file, else the sorted set found."""
    from training.data import DataError, iter_jsonl, read_labels

    p = Path(path)
    if not p.exists():
        raise TrainingError(f"data file {p} not found")
    try:
        records = list(iter_jsonl(p))
    except DataError as e:
        raise TrainingError(str(e)) from e
    bad = next((i for i, r in enumerate(records) if not isinstance(r.get("text"), str)
                or not isinstance(r.get("label"), (str, int))), None)
    if bad is not None:
        raise TrainingError(f"{p}: record {bad + 1} needs a string 'text' and a 'label'")
    if not records:
        raise TrainingError(f"{p} has no records")
    labels = labels or read_labels(p) or sorted({str(r["label"]) for r in records})
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({str(r["label"]) for r in records} - set(index))
    if unknown:
        raise TrainingError(f"{p}: labels {unknown[:3]} are not in the training label set")
    return [r["text"] for r in records], labels, [index[str(r["label"])] for r in records]


def stratified(y: list[int], per_label: int, seed: int) -> tuple[list[int], list[int]]:
    """(rest, picked): `per_label` seeded-random indices of each label (fewer if a label is rare,
    always leaving at least one for training), and the others in a seeded-shuffled order."""
    by: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(y):
        by[label].append(i)
    rng = random.Random(seed)
    picked, rest = [], []
    for label in sorted(by):
        idx = by[label][:]
        rng.shuffle(idx)
        k = min(per_label, len(idx) - 1)
        picked += idx[:k]
        rest += idx[k:]
    rng.shuffle(rest)
    return rest, picked


# ---------------------------------------------------------------------------- features
class Extractor:
    """Features of texts in chunks of a seeded-random order, so a time budget can stop between chunks
    and leave an unbiased sample (length-sorted batching happens within a chunk)."""

    def __init__(self, cfg: HeadConfig, spec: Any, base_id: dict[str, Any], precision: str) -> None:
        from model.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
        from model.features import FeatureError, feature_model

        try:
            ckpt = load_checkpoint(resolve_checkpoint(cfg.base), dtype=torch.float32)
            # the embeddings and the blocks up to the exit layer, as the server runs them
            self.model = feature_model(ckpt.model, spec.layer, precision)
        except (CheckpointError, FeatureError) as e:
            raise TrainingError(str(e)) from e
        self.tokenizer, self.base_layers = ckpt.tokenizer, ckpt.config.n_layers
        self.cfg, self.spec, self.base_id, self.precision = cfg, spec, base_id, precision

    def _cache_path(self, texts: list[str]) -> Path | None:
        if not self.cfg.cache_dir:
            return None
        key = hashlib.sha256(repr((self.base_id, self.spec, self.precision, texts)).encode()).hexdigest()[:24]
        return Path(self.cfg.cache_dir) / f"features-{key}.pt"

    def features(self, texts: list[str], bar: Any, deadline: float | None = None,
                 chunk: int = 256) -> torch.Tensor:
        """(n, dim) features of texts[:n]; n < len(texts) only when `deadline` (perf_counter) passed."""
        from model.features import extract_features

        cached = self._cache_path(texts)
        if cached is not None and cached.exists():
            bar.update(len(texts))
            return torch.load(cached)
        parts = []
        for start in range(0, len(texts), chunk):
            if deadline is not None and time.perf_counter() > deadline:
                break
            parts.append(extract_features(self.model, self.tokenizer, texts[start:start + chunk], self.spec,
                                          max_batch=self.cfg.batch_size, progress=bar.update))
        out = torch.cat(parts) if parts else torch.empty(0, self.spec.dim(self.model))
        if cached is not None and len(out) == len(texts):
            from training.common import atomic_torch_save

            atomic_torch_save(out, cached)
        return out



# ---------------------------------------------------------------------------- the job
def choose_l2(x: torch.Tensor, y: torch.Tensor, train_idx: list[int], val_idx: list[int], n_labels: int,
              cfg: HeadConfig) -> tuple[float, dict[str, float]]:
    """The --l2 candidate with the best held-out accuracy (the first on a tie), and every candidate's."""
    if not val_idx:
        return cfg.l2[0], {}
    tr, va = torch.tensor(train_idx), torch.tensor(val_idx)
    scores = {f"{l2:g}": round(accuracy(fit_head(x[tr], y[tr], n_labels, l2, cfg), x[va], y[va]), 4)
              for l2 in cfg.l2}
    best = max(cfg.l2, key=lambda v: scores[f"{v:g}"])
    return best, scores


def main(cfg: HeadConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from model.checkpoint import resolve_checkpoint
    from model.features import FeatureError, FeatureSpec, auto_precision
    from model.head import HeadInfo, base_identity, save_head

    t0 = time.perf_counter()
    set_threads(cfg.threads)
    try:
        spec = FeatureSpec(layer=cfg.layer, pooling=cfg.pooling, template=cfg.template)
    except FeatureError as e:
        raise TrainingError(str(e)) from e
    # 1. data: training texts (a held-out part for choosing l2), test texts
    texts, labels, y_all = read_split(cfg.train)
    order, val_idx = stratified(y_all, cfg.val_per_label, cfg.seed)
    if cfg.max_train:
        order = order[:cfg.max_train]  # already in a seeded-random order
    test_texts, _, test_y = read_split(cfg.test, labels) if cfg.test else ([], labels, [])
    if cfg.max_test and cfg.max_test < len(test_texts):
        keep = sorted(random.Random(cfg.seed).sample(range(len(test_texts)), cfg.max_test))
        test_texts, test_y = [test_texts[i] for i in keep], [test_y[i] for i in keep]
    # 2. features (validation first so a time budget can only shorten the training part)
    base_dir = resolve_checkpoint(cfg.base)  # CheckpointError: run_job prints it as one line
    base_id = base_identity(base_dir)
    ext = Extractor(cfg, spec, base_id, auto_precision() if cfg.precision == "auto" else cfg.precision)
    rows = val_idx + order
    bar = tqdm(total=len(rows) + len(test_texts), disable=not cfg.progress, dynamic_ncols=True, unit="text",
               desc="features")
    deadline = None
    if cfg.time_budget_min:
        # leave room for the test texts at the rate seen so far and ~10 % of the budget for fitting
        deadline = _budget_deadline(t0, cfg.time_budget_min, len(rows), len(test_texts))
    x = ext.features([texts[i] for i in rows], bar, deadline)
    y = torch.tensor([y_all[i] for i in rows[:len(x)]])
    cut = len(x) < len(rows)
    if cut:
        bar.write(f"time budget: training on {len(x)} of {len(rows)} examples (the head now depends on "
                  "machine speed)")
    t_train_feats = time.perf_counter() - t0
    # 3. choose l2 on the held-out part, refit on everything
    n_val = len(val_idx)
    l2, val_scores = choose_l2(x, y, list(range(n_val, len(x))), list(range(n_val)), len(labels), cfg)
    head = fit_head(x, y, len(labels), l2, cfg)
    t_fit = time.perf_counter() - t0 - t_train_feats
    # 4. score the test split
    test_acc = float("nan")
    if test_texts:
        xt = ext.features(test_texts, bar)
        test_acc = accuracy(head, xt, torch.tensor(test_y))
    bar.close()
    minutes = (time.perf_counter() - t0) / 60
    metrics = {"val_accuracy": val_scores.get(f"{l2:g}"), "val_n": n_val, "l2": l2, "l2_scores": val_scores,
               "train_n": len(x), "budget_cut": cut, "test_accuracy": round(test_acc, 4), "test_n": len(test_texts),
               "test_file": cfg.test, "minutes": round(minutes, 2),
               "minutes_train_features": round(t_train_feats / 60, 2), "minutes_fit": round(t_fit / 60, 2),
               "precision": ext.precision, "seed": cfg.seed}
    info = HeadInfo(labels=labels, layer=cfg.layer, pooling=cfg.pooling, template=cfg.template,
                    hidden=cfg.hidden, base=base_id, metrics=metrics, precision=ext.precision)
    out = save_head(Path(cfg.adapters_dir) / cfg.name, head, info)
    print(f"head: {out} ({len(labels)} labels, layer {cfg.layer}/{ext.base_layers}, {cfg.pooling}, {ext.precision}, "
          f"l2 {l2:g}, trained on {len(x)} examples); held-out accuracy {_fmt(metrics['val_accuracy'])} "
          f"(n={n_val}); test accuracy {_fmt(test_acc)} (n={len(test_texts)}, {cfg.test or 'none'}); "
          f"{minutes:.1f} min")
    return metrics


def _budget_deadline(t0: float, budget_min: float, n_train: int, n_test: int) -> float:
    """perf_counter time after which no more training chunks start: the budget less 10 % for fitting
    and the test texts' share of the extraction time (test texts are as long as training texts)."""
    budget = budget_min * 60 - (time.perf_counter() - t0)
    usable = 0.9 * budget * n_train / max(1, n_train + n_test)
    return time.perf_counter() + usable


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def cli(argv: list[str] | None = None, prog: str = "python -m training.head") -> int:
    return run_job(main, HeadConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
