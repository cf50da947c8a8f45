"""Multi-task supervised fine-tuning (SFT): chat, summarization, translation, classification.

    python -m training.finetune --preset cpu-demo                      # SmolLM2 default on Banking77 + chat
    python -m training.finetune --init_from runs/demo/pretrain/checkpoint \\
        --data classify=../shared/data/banking77/train.jsonl@2 ../shared/data/bitext_customer_support/train.jsonl
    seedling-train finetune --help

Every example is rendered with the task prompts of `model.tasks` and the ChatML format of
`model.tokenizer.render_chat` — exactly what the server sends — and only assistant tokens count in
the loss (the rendering's loss mask). `--data` entries are `[task[/name]=]path[@weight]`: the task is
detected from the record fields when omitted (messages -> chat, document+summary -> summarize,
src+tgt -> translate, text+label -> classify), the weight sets the mixture proportion (default 1).
The classification label sets go into the checkpoint metadata (`labels: {name: [...]}`; the first
classification source is named "classify", so `/classify` without labels defaults to it).
`--init_from default` starts from the imported SmolLM2-135M-Instruct checkpoint.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model import tasks
from model.device import resolve_device
from training.common import (
    MetricsLog,
    TrainingError,
    autocast,
    config_dict,
    field,
    lr_at,
    make_optimizer,
    plot_loss_curve,
    run_job,
    seed_everything,
    set_lr,
    set_threads,
    write_json,
    write_summary,
)
from training.data import (
    DataError,
    SFTExample,
    detect_task,
    iter_jsonl,
    read_labels,
    render_example,
    sft_batch,
    task_messages,
)

SHARED = "../shared/data"


@dataclass
class FinetuneConfig:
    init_from: str = field("default", help="checkpoint dir to start from, or 'default' (SmolLM2-135M-Instruct)")
    data: list[str] = field(default_factory=list, help="sources: [task[/name]=]path[@weight] (JSONL or .jsonl.gz)")
    out_dir: str = field("runs/finetune", help="output directory (checkpoint, checkpoint.versions/, metrics.jsonl, "
                         "loss.png)")
    max_records: int = field(0, help="use a seeded random sample of this many records per source (0 = all)")
    val_examples: int = field(32, help="examples held out (from the mixture) for validation loss")
    max_len: int = field(512, help="longest rendered example in tokens; chats are cut at a turn, others dropped")
    classify_candidates: int = field(0, help="labels listed in a classify prompt: gold + k-1 random others "
                                     "(0 = the whole label set)")
    batch_size: int = field(4, help="examples per micro-batch")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    max_steps: int = field(200, help="optimizer steps")
    lr: float = field(5e-5, help="peak learning rate")
    min_lr: float = field(5e-6, help="final learning rate (cosine)")
    warmup_steps: int = field(10, help="linear warmup steps")
    weight_decay: float = field(0.0, help="AdamW weight decay for matrices")
    grad_clip: float = field(1.0, help="clip the global gradient norm (0 = off)")
    eval_every: int = field(50, help="validation loss every N steps (and at the end)")
    save_every: int = field(0, help="also write checkpoint.versions/step_N every N steps (0 = only the final "
                            "checkpoint); only the final one is published as out_dir/checkpoint")
    seed: int = field(1234, help="seed for mixture sampling and label candidates")
    device: str = field("auto", help="auto, cpu, cuda, cuda:N")
    dtype: str = field("bf16", help="bf16 (autocast on CUDA) or fp32")
    threads: int = field(0, help="CPU threads for torch (0 = torch default)")
    progress: bool = field(True, help="show a tqdm progress bar")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(max_steps=6, batch_size=2, max_len=256, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=3,
                 val_examples=4, threads=1, progress=False),
    # the SmolLM2 default on Banking77 (10 candidate labels per prompt, as evaluate's cpu-demo scores
    # them) mixed with customer-support chat: 40 steps x 4 examples, ~10 minutes on a busy 2-core CPU
    "cpu-demo": dict(data=[f"classify={SHARED}/banking77/train.jsonl@4",
                           f"{SHARED}/bitext_customer_support/train.jsonl@1"],
                     classify_candidates=10, max_len=384, batch_size=4, max_steps=40, lr=1e-4, min_lr=1e-5,
                     warmup_steps=4, eval_every=20, val_examples=8, max_records=4000, threads=1),
    "gpu": dict(data=[f"classify={SHARED}/banking77/train.jsonl@2", f"{SHARED}/clinc150/train.jsonl@1",
                      f"{SHARED}/dialogsum/train.jsonl@1", f"{SHARED}/tatoeba_en_zh/train.jsonl.gz@1",
                      f"{SHARED}/multi30k_en_de/train.jsonl.gz@1",
                      f"{SHARED}/bitext_customer_support/train.jsonl@1", f"{SHARED}/sgd_dialogue/train.jsonl.gz@1"],
                max_len=1024, batch_size=16, grad_accum=2, max_steps=3000, lr=5e-5, min_lr=5e-6,
                warmup_steps=100, eval_every=250, save_every=500, val_examples=256),
}


# ---------------------------------------------------------------------------- sources
@dataclass
class Source:
    task: str
    name: str
    path: Path
    weight: float
    records: list[dict[str, Any]]
    labels: list[str]


def parse_source(spec: str) -> tuple[str | None, str | None, Path, float]:
    """'[task[/name]=]path[@weight]' -> (task, name, path, weight)."""
    task = name = None
    rest = spec
    m = re.match(r"^(\w+)(?:/([\w.-]+))?=(.+)$", spec)
    if m:
        task, name, rest = m.group(1), m.group(2), m.group(3)
        if task not in tasks.TASKS:
            raise TrainingError(f"unknown task {task!r} in {spec!r}; choose one of {tasks.TASKS}")
    weight = 1.0
    if "@" in rest:
        rest, w = rest.rsplit("@", 1)
        try:
            weight = float(w)
        except ValueError:
            raise TrainingError(f"bad mixture weight in {spec!r}") from None
    if weight <= 0:
        raise TrainingError(f"mixture weight must be positive in {spec!r}")
    return task, name, Path(rest), weight


def load_sources(specs: list[str], max_records: int) -> list[Source]:
    if not specs:
        raise TrainingError("no --data given; pass e.g. --data ../shared/data/banking77/train.jsonl")
    sources: list[Source] = []
    for spec in specs:
        task, name, path, weight = parse_source(spec)
        if not path.exists():
            raise TrainingError(f"data file {path} not found (from --data {spec!r})")
        records = list(iter_jsonl(path))
        if max_records and max_records < len(records):  # a seeded sample: files are often sorted by label
            keep = sorted(random.Random(0).sample(range(len(records)), max_records))
            records = [records[i] for i in keep]
        if not records:
            raise TrainingError(f"{path} has no records")
        task = task or detect_task(records[0])
        labels: list[str] = []
        if task == tasks.CLASSIFY:
            labels = read_labels(path) or sorted({str(r["label"]) for r in records})
            if not name:
                name = tasks.CLASSIFY if not any(s.task == tasks.CLASSIFY for s in sources) else path.parent.name
        sources.append(Source(task, name or task, path, weight, records, labels))
    return sources


def fit_chat(messages: list[dict[str, str]], tokenizer: Any, max_len: int) -> SFTExample | None:
    """Render; for too-long chats drop trailing turns until it fits and still ends with the assistant."""
    msgs = list(messages)
    while msgs:
        ex = render_example(tokenizer, msgs, tasks.CHAT)
        if len(ex.ids) <= max_len:
            return ex if any(ex.loss_mask) else None
        msgs = msgs[:-1]
        while msgs and msgs[-1]["role"] != "assistant":
            msgs = msgs[:-1]
    return None


class Mixture:
    """Draws rendered examples: a source with probability ∝ weight, then that source's next record
    in a per-source shuffled order. Deterministic given the seed."""

    def __init__(self, sources: list[Source], tokenizer: Any, max_len: int, candidates: int, seed: int) -> None:
        self.sources, self.tokenizer, self.max_len, self.candidates = sources, tokenizer, max_len, candidates
        self.rng = random.Random(seed)
        self.orders = [self._shuffled(len(s.records)) for s in sources]
        self.pos = [0] * len(sources)
        self.dropped = 0

    def _shuffled(self, n: int) -> list[int]:
        order = list(range(n))
        self.rng.shuffle(order)
        return order

    def _record(self, k: int) -> dict[str, Any]:
        if self.pos[k] >= len(self.orders[k]):
            self.orders[k], self.pos[k] = self._shuffled(len(self.orders[k])), 0
        rec = self.sources[k].records[self.orders[k][self.pos[k]]]
        self.pos[k] += 1
        return rec

    def example(self) -> SFTExample:
        weights = [s.weight for s in self.sources]
        for _ in range(1000):
            k = self.rng.choices(range(len(self.sources)), weights)[0]
            src = self.sources[k]
            try:
                msgs = task_messages(src.task, self._record(k), src.labels, self.candidates, self.rng)
            except (DataError, KeyError, ValueError):
                self.dropped += 1
                continue
            if src.task == tasks.CHAT:
                ex = fit_chat(msgs, self.tokenizer, self.max_len)
            else:
                ex = render_example(self.tokenizer, msgs, src.task)
                ex = ex if len(ex.ids) <= self.max_len else None
            if ex is None:
                self.dropped += 1
                continue
            return ex
        raise TrainingError("1000 examples in a row were unusable (too long for --max_len or malformed)")


def masked_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the target positions (w == 1); returns (loss, number of targets).
    Logits are computed only where the loss counts (`logits_index`): assistant tokens are a small
    share of an SFT example, and the output head over a 49k vocabulary is the costliest matmul."""
    index = w.flatten().nonzero()[:, 0]  # (K,) flattened (B*T) positions that are targets
    logits = model(x, logits_index=index)  # (K, V)
    loss = F.cross_entropy(logits.float(), y.flatten().index_select(0, index))
    return loss, torch.tensor(float(index.numel()))


@torch.no_grad()
def validate(model: torch.nn.Module, examples: list[SFTExample], batch_size: int, pad_id: int,
             device: torch.device, dtype: str) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        x, y, w = (t.to(device) for t in sft_batch(examples[i:i + batch_size], pad_id))
        with autocast(device, dtype):
            loss, n = masked_loss(model, x, y, w)
        total += loss.item() * n.item()
        count += n.item()
    model.train(was)
    return total / max(count, 1.0)


def save(cfg: FinetuneConfig, model: torch.nn.Module, tokenizer: Any, meta: dict[str, Any]) -> None:
    """Each save is its own version (out_dir/checkpoint.versions/step_N); only the final one is
    published as out_dir/checkpoint, so what a server loads from there never changes mid-run. Kept
    afterwards: this run's versions and the one published before it."""
    from model.checkpoint import save_checkpoint

    step = int(meta["step"])
    saves = -(-cfg.max_steps // cfg.save_every) if cfg.save_every else 1
    save_checkpoint(Path(cfg.out_dir) / "checkpoint", model.eval(), tokenizer, meta, version=f"step_{step:08d}",
                    publish=step == cfg.max_steps, keep=saves)
    model.train()


# ---------------------------------------------------------------------------- the job
def main(cfg: FinetuneConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from model.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config_dict(cfg))

    # 1. model + data
    try:
        init_dir = resolve_checkpoint(cfg.init_from)
        ckpt = load_checkpoint(init_dir, device=device, dtype=torch.float32)
    except CheckpointError as e:
        raise TrainingError(str(e)) from e
    model, tokenizer = ckpt.model, ckpt.tokenizer
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    sources = load_sources(cfg.data, cfg.max_records)
    mixture = Mixture(sources, tokenizer, cfg.max_len, cfg.classify_candidates, cfg.seed)
    val = [mixture.example() for _ in range(cfg.val_examples)]
    for s in sources:
        print(f"source {s.name} ({s.task}, weight {s.weight:g}): {len(s.records)} records from {s.path}"
              + (f", {len(s.labels)} labels" if s.labels else ""))

    # 2. optimizer + loop
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.95), device)
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    metrics.reset()
    model.train()
    labels = {**ckpt.meta.get("labels", {}), **{s.name: s.labels for s in sources if s.task == tasks.CLASSIFY}}
    meta = {"job": "finetune", "init_from": str(init_dir), "data": cfg.data, "labels": labels,
            "config": config_dict(cfg)}
    val_loss = validate(model, val, cfg.batch_size, pad_id, device, cfg.dtype) if val else float("nan")
    metrics.write({"step": 0, "val_loss": val_loss})
    print(f"step 0: val loss {val_loss:.4f}")
    bar = tqdm(total=cfg.max_steps, disable=not cfg.progress, dynamic_ncols=True, unit="step")
    t0, tokens, loss_val = time.perf_counter(), 0, float("nan")
    for step in range(cfg.max_steps):
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            batch = [mixture.example() for _ in range(cfg.batch_size)]
            x, y, w = (t.to(device) for t in sft_batch(batch, pad_id))  # (B, T) each
            with autocast(device, cfg.dtype):
                loss, _ = masked_loss(model, x, y, w)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            tokens += int(x.numel())
        loss_val = loss_sum / cfg.grad_accum
        if not math.isfinite(loss_val):
            raise TrainingError(f"loss became {loss_val} at step {step + 1}; nothing saved. Lower --lr")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        tok_s = tokens / (time.perf_counter() - t0)
        metrics.write({"step": done, "loss": loss_val, "lr": lr, "tok_s": round(tok_s, 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}")
        if val and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            val_loss = validate(model, val, cfg.batch_size, pad_id, device, cfg.dtype)
            metrics.write({"step": done, "val_loss": val_loss})
            bar.write(f"step {done}: val loss {val_loss:.4f}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
            save(cfg, model, tokenizer, {**meta, "step": done, "metrics": {"val_loss": val_loss,
                                                                           "train_loss": loss_val}})
    bar.close()
    plot_loss_curve(metrics.records(), out_dir / "loss.png", title=f"finetune {out_dir.name}")
    summary = {"step": cfg.max_steps, "train_loss": loss_val, "val_loss": val_loss,
               "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1),
               "seconds": round(time.perf_counter() - t0, 1), "dropped_examples": mixture.dropped,
               "labels": {k: len(v) for k, v in labels.items()}}
    write_summary(out_dir, "finetune", summary)
    return summary


def cli(argv: list[str] | None = None, prog: str = "python -m training.finetune") -> int:
    return run_job(main, FinetuneConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
