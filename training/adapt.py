"""Train a LoRA task adapter (peft) on a CPU and publish it in peft's format.

    python -m training.adapt --preset translate-de --time_budget_min 20
    python -m training.adapt --name my-intents --train classify=my_data/train.jsonl --max_steps 300
    seedling-train adapt --help

The base model stays frozen; peft wraps Seedling's own `Transformer` (HF module names q_proj ...
down_proj) with low-rank updates. Examples are rendered with `model.tasks` prompts and
`model.tokenizer.render_chat` (what the server sends), the loss counts assistant tokens only, and
short examples are packed into rows of `--seq_len` tokens (`training.packing`). On a CPU with
AVX512-BF16 the forward runs under bf16 autocast (`--dtype auto`).

Every `--save_every` steps the run writes `<out_dir>/state.pt` (LoRA weights, AdamW state, RNG,
best-so-far weights, metrics); re-running the same command after a kill -9 resumes from it and ends
with the same weights as an uninterrupted run. `--time_budget_min` stops early (state kept: re-run
to continue). The weights with the lowest validation loss are published atomically to
`<adapters_dir>/<name>/`: adapter_config.json + adapter_model.safetensors (peft) + seedling.json
(base checkpoint identity, tasks, data, metrics). `model.adapters` reads and merges them.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
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
    atomic_torch_save,
    config_dict,
    field,
    lr_at,
    make_optimizer,
    rng_state,
    run_job,
    seed_everything,
    set_lr,
    set_rng_state,
    set_threads,
    write_json,
    write_summary,
)
from training.data import DataError, SFTExample, render_example, task_messages
from training.finetune import Source, fit_chat, load_sources, parse_source
from training.packing import DocumentAttention, PackedBatch, PackedStream, collate

SHARED = "../shared/data"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# options that do not change the result: a resumed run may change them
# (eval_every / save_every change which steps compete for "best" and where a kill resumes, never the weights)
_RUNTIME_KEYS = {"time_budget_min", "progress", "threads", "fresh", "adapters_dir", "out_dir", "eval_every",
                 "save_every"}


@dataclass
class AdaptConfig:
    name: str = field("adapter", help="adapter name: published to <adapters_dir>/<name>/")
    init_from: str = field("default", help="base checkpoint dir, or 'default' (SmolLM2-135M-Instruct)")
    train: list[str] = field(default_factory=list, help="training data: [task[/name]=]path (JSONL / .jsonl.gz)")
    val: list[str] = field(default_factory=list, help="validation data for model selection (same syntax); "
                           "empty = hold out --val_examples records of each training source")
    adapters_dir: str = field("adapters", help="where the adapter is published")
    out_dir: str = field("", help="run directory for state.pt / metrics.jsonl (default runs/adapt/<name>)")
    max_records: int = field(0, help="seeded sample of this many training records per source (0 = all)")
    val_examples: int = field(64, help="validation examples per source (a seeded sample)")
    max_len: int = field(512, help="longest rendered example in tokens; longer ones are dropped (chats cut)")
    seq_len: int = field(1024, help="tokens per packed row")
    batch_rows: int = field(1, help="packed rows per micro-batch")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    max_steps: int = field(100, help="optimizer steps (the LR schedule's length)")
    lr: float = field(1e-3, help="peak learning rate")
    min_lr: float = field(1e-4, help="final learning rate (cosine)")
    warmup_steps: int = field(5, help="linear warmup steps")
    weight_decay: float = field(0.0, help="AdamW weight decay on the LoRA matrices")
    grad_clip: float = field(1.0, help="clip the global gradient norm (0 = off)")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: float = field(32.0, help="LoRA alpha (update scale = alpha / r)")
    lora_dropout: float = field(0.0, help="dropout on the LoRA input")
    lora_targets: list[str] = field(default_factory=lambda: list(TARGETS), help="projections that get LoRA")
    eval_every: int = field(25, help="validation loss every N steps (and at the end); the best is published")
    save_every: int = field(5, help="write the resume state every N steps (and at every evaluation)")
    time_budget_min: float = field(0.0, help="stop training after this many minutes, counted over resumes "
                                   "(0 = no limit); the best weights so far are published")
    seed: int = field(1234, help="seed for sampling, data order and LoRA init")
    device: str = field("auto", help="auto, cpu, cuda")
    dtype: str = field("auto", help="auto (bf16 autocast where the CPU/GPU has bf16), bf16 or fp32")
    threads: int = field(1, help="CPU threads for torch (0 = torch default; 1 is fastest on a busy CPU)")
    fresh: bool = field(False, help="ignore an existing state.pt and start over")
    progress: bool = field(True, help="show a tqdm progress bar")

    def __post_init__(self) -> None:
        for name in ("batch_rows", "grad_accum", "max_steps", "eval_every", "save_every", "seq_len", "lora_r"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        unknown = sorted(set(self.lora_targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown lora_targets {unknown}; choose from {TARGETS}")
        if not self.out_dir:
            self.out_dir = f"runs/adapt/{self.name}"


def _task_preset(task: str, train: str, val: str, **kw: Any) -> dict[str, Any]:
    return dict(name=kw.pop("name", task), train=[f"{task}={SHARED}/{train}"],
                val=[f"{task}={SHARED}/{val}"] if val else [], **kw)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(max_steps=6, seq_len=512, max_len=256, threads=1, lora_r=4, lora_alpha=8.0, warmup_steps=1, eval_every=3,
                 save_every=2, val_examples=4, progress=False),
    "translate-de": _task_preset(tasks.TRANSLATE, "multi30k_en_de/train.jsonl.gz", "multi30k_en_de/validation.jsonl",
                                 name="translate-de", max_records=16000, max_steps=420, warmup_steps=8, eval_every=60,
                                 val_examples=64, seq_len=256, batch_rows=4, max_len=192),
    "translate-zh": _task_preset(tasks.TRANSLATE, "tatoeba_en_zh/train.jsonl.gz", "tatoeba_en_zh/validation.jsonl",
                                 name="translate-zh", max_records=16000, max_steps=300, warmup_steps=8, eval_every=60,
                                 val_examples=64, seq_len=256, batch_rows=4, max_len=192),
    "summarize": _task_preset(tasks.SUMMARIZE, "dialogsum/train.jsonl", "dialogsum/validation.jsonl",
                              max_records=4000, max_steps=130, warmup_steps=8, eval_every=33, seq_len=1024,
                              max_len=1024, val_examples=32),
    "classify": _task_preset(tasks.CLASSIFY, "banking77/train.jsonl", "", max_steps=60, seq_len=1024,
                             max_len=1024, val_examples=200),
    "chat": _task_preset(tasks.CHAT, "bitext_customer_support/train.jsonl", "bitext_customer_support/validation.jsonl",
                         max_steps=40, seq_len=1024, max_len=512, val_examples=32),
}


# ---------------------------------------------------------------------------- data
def render(source: Source, record: dict[str, Any], tokenizer: Any, max_len: int) -> SFTExample | None:
    """One record as a training example (the prompts of `model.tasks`, all labels listed for
    classify as /classify lists them); None when it does not fit max_len or is malformed."""
    try:
        msgs = task_messages(source.task, record, source.labels)
    except (DataError, KeyError, ValueError, tasks.TaskError):
        return None
    if source.task == tasks.CHAT:
        return fit_chat(msgs, tokenizer, max_len)
    ex = render_example(tokenizer, msgs, source.task)
    return ex if len(ex.ids) <= max_len and any(ex.loss_mask) else None


def _load(specs: list[str], max_records: int) -> list[Source]:
    for spec in specs:
        if parse_source(spec)[3] != 1.0:
            raise TrainingError(f"{spec!r}: adapt takes every record of each source (cap with --max_records); "
                                "mixture weights are finetune's")
    return load_sources(specs, max_records)


def build_examples(cfg: AdaptConfig, tokenizer: Any) -> tuple[list[SFTExample], list[SFTExample], dict[str, Any]]:
    """(train, validation, info). Without --val, each training source gives up its first
    --val_examples records (after a seeded shuffle) to validation: Banking77 has no validation split."""
    sources = _load(cfg.train, 0)
    vals = _load(cfg.val, 0) if cfg.val else []
    rng = random.Random(cfg.seed)
    train, val, info = [], [], {"sources": []}
    for s in sources:
        records = list(s.records)
        rng.shuffle(records)
        held = [] if vals else records[:cfg.val_examples]
        records = records if vals else records[cfg.val_examples:]
        records = records[:cfg.max_records] if cfg.max_records else records
        ex = [e for r in records if (e := render(s, r, tokenizer, cfg.max_len))]
        val += [e for r in held if (e := render(s, r, tokenizer, cfg.max_len))]
        train += ex
        info["sources"].append({"task": s.task, "path": str(s.path), "records": len(records), "examples": len(ex),
                                "tokens": sum(len(e.ids) for e in ex)})
    for s in vals:
        records = list(s.records)
        rng.shuffle(records)
        val += [e for r in records[:cfg.val_examples] if (e := render(s, r, tokenizer, cfg.max_len))]
    if not train or not val:
        raise TrainingError(f"{len(train)} training / {len(val)} validation examples fit --max_len {cfg.max_len}; "
                            "need at least one of each")
    info["tasks"] = sorted({s.task for s in sources})
    info["labels"] = {s.name: s.labels for s in sources if s.labels}
    return train, val, info


# ---------------------------------------------------------------------------- model
def bf16_supported(device: torch.device) -> bool:
    """bf16 matmuls are fast on CUDA and on CPUs with AVX512-BF16 / AMX (measured ~1.3x over fp32
    for forward+backward on the 2-core EPYC); elsewhere autocast would emulate them slowly."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    use_bf16 = dtype == "bf16" or (dtype == "auto" and bf16_supported(device))
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_lora(model: torch.nn.Module, cfg: AdaptConfig) -> Any:
    """peft's LoRA around the frozen Transformer; LoRA init is seeded by cfg.seed."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")
    return get_peft_model(model, lora)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def packed_loss(model: torch.nn.Module, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens of a packed batch; logits only where they count
    (the 49k-wide output head is the costliest matmul of a 135M model)."""
    index = batch.w.flatten().nonzero()[:, 0].to(device)  # (K,) flattened target positions
    logits = model(batch.x.to(device), batch.positions.to(device),
                   kv_cache=DocumentAttention(batch.doc.to(device)), logits_index=index)  # (K, V)
    return F.cross_entropy(logits.float(), batch.y.flatten().to(device).index_select(0, index))


@torch.no_grad()
def validate(model: torch.nn.Module, examples: list[SFTExample], cfg: AdaptConfig, pad_id: int,
             device: torch.device) -> float:
    """Token-weighted validation loss over every validation example (packed in file order)."""
    was = model.training
    model.eval()
    stream = PackedStream(examples, cfg.seq_len, cfg.seed, shuffle=False)
    rows = stream.epoch(0)
    total = count = 0.0
    for i in range(0, len(rows), cfg.batch_rows):
        batch = collate(examples, rows[i:i + cfg.batch_rows], pad_id)
        with precision(device, cfg.dtype):
            loss = packed_loss(model, batch, device)
        total += loss.item() * batch.targets
        count += batch.targets
    model.train(was)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------- resume state
@dataclass
class RunState:
    """Everything a resumed run needs to continue bit for bit."""
    step: int = 0
    seconds: float = 0.0  # training wall time so far, over all resumes
    tokens: int = 0
    best_loss: float = math.inf
    best_step: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    last_val: float = math.nan
    val_step: int = -1  # the step last_val was measured at

    def save(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             cfg: AdaptConfig) -> None:
        atomic_torch_save({"run": self.__dict__, "lora": trainable(model), "optimizer": optimizer.state_dict(),
                           "rng": rng_state(), "config": _fingerprint(cfg)}, path)

    @classmethod
    def load(cls, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             cfg: AdaptConfig) -> RunState:
        blob = torch.load(path, weights_only=False)
        saved = {k: v for k, v in blob["config"].items() if k not in _RUNTIME_KEYS}
        if saved != _fingerprint(cfg):
            changed = sorted(k for k in saved.keys() | _fingerprint(cfg).keys()
                             if saved.get(k) != _fingerprint(cfg).get(k))
            raise TrainingError(f"{path} was written with different settings ({', '.join(changed)}); "
                                "re-run with the same flags, or pass --fresh to start over")
        load_trainable(model, blob["lora"])
        optimizer.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"])
        return cls(**blob["run"])


def _fingerprint(cfg: AdaptConfig) -> dict[str, Any]:
    return {k: v for k, v in config_dict(cfg).items() if k not in _RUNTIME_KEYS}


# ---------------------------------------------------------------------------- training loop
@dataclass
class Run:
    """The objects one training run works on (built once by `main`)."""
    cfg: AdaptConfig
    model: Any  # peft.PeftModel around model.transformer.Transformer
    optimizer: torch.optim.Optimizer
    stream: PackedStream
    val: list[SFTExample]
    pad_id: int
    device: torch.device
    metrics: MetricsLog
    state_path: Path


def train_step(run: Run, step: int) -> tuple[float, int]:
    """One optimizer step over grad_accum micro-batches of packed rows; returns (loss, tokens)."""
    cfg = run.cfg
    set_lr(run.optimizer, lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps))
    run.optimizer.zero_grad(set_to_none=True)
    rows = run.stream.rows(step * cfg.batch_rows * cfg.grad_accum, cfg.batch_rows * cfg.grad_accum)
    loss_sum, tokens = 0.0, 0
    for i in range(cfg.grad_accum):
        batch = collate(run.stream.examples, rows[i * cfg.batch_rows:(i + 1) * cfg.batch_rows], run.pad_id)
        with precision(run.device, cfg.dtype):
            loss = packed_loss(run.model, batch, run.device)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
        tokens += int((batch.doc >= 0).sum())
    loss_val = loss_sum / cfg.grad_accum
    if not math.isfinite(loss_val):
        raise TrainingError(f"loss became {loss_val} at step {step + 1}; lower --lr")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.grad_clip)
    run.optimizer.step()
    return loss_val, tokens


def evaluate_and_keep_best(run: Run, st: RunState) -> None:
    st.last_val, st.val_step = validate(run.model, run.val, run.cfg, run.pad_id, run.device), st.step
    run.metrics.write({"step": st.step, "val_loss": st.last_val})
    if st.last_val < st.best_loss:
        st.best_loss, st.best_step, st.best_weights = st.last_val, st.step, trainable(run.model)


def train(run: Run, st: RunState) -> bool:
    """Steps until max_steps or the time budget; returns True when the schedule finished."""
    from tqdm import tqdm

    cfg = run.cfg
    budget = cfg.time_budget_min * 60
    bar = tqdm(total=cfg.max_steps, initial=st.step, disable=not cfg.progress, dynamic_ncols=True, unit="step")
    t_last = time.perf_counter()
    while st.step < cfg.max_steps:
        if budget and st.seconds >= budget:
            bar.write(f"time budget of {cfg.time_budget_min:g} min reached at step {st.step}/{cfg.max_steps}")
            break
        loss, tokens = train_step(run, st.step)
        st.step += 1
        now = time.perf_counter()
        st.seconds, st.tokens, t_last = st.seconds + now - t_last, st.tokens + tokens, now
        run.metrics.write({"step": st.step, "loss": loss, "tok_s": round(st.tokens / st.seconds, 1)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{st.last_val:.3f}", tok_s=f"{st.tokens / st.seconds:,.0f}")
        evaluated = st.step % cfg.eval_every == 0 or st.step == cfg.max_steps
        if evaluated or st.step % cfg.save_every == 0:  # before evaluating: a kill there loses no steps
            st.save(run.state_path, run.model, run.optimizer, cfg)
        if evaluated:
            evaluate_and_keep_best(run, st)
            bar.write(f"step {st.step}: val loss {st.last_val:.4f} (best {st.best_loss:.4f} at {st.best_step})")
            st.save(run.state_path, run.model, run.optimizer, cfg)
        t_last = time.perf_counter()  # evaluation and saving are not training time
    bar.close()
    if st.val_step != st.step:  # stopped by the budget between evaluations: the last weights compete too
        evaluate_and_keep_best(run, st)
        st.save(run.state_path, run.model, run.optimizer, cfg)
    return st.step >= cfg.max_steps


# ---------------------------------------------------------------------------- publishing
def publish(run: Run, st: RunState, base_dir: Path, info: dict[str, Any], finished: bool) -> Path:
    """Write the best weights in peft's format plus seedling.json to a temporary directory next to
    the target, then swap it in: a reader sees the old adapter or the new one, never half of one."""
    from model.adapters import META_FILE, checkpoint_identity

    cfg = run.cfg
    final = Path(cfg.adapters_dir) / cfg.name
    tmp = final.parent / f".{cfg.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    current = trainable(run.model)
    load_trainable(run.model, st.best_weights or current)
    run.model.save_pretrained(str(tmp))
    load_trainable(run.model, current)
    meta = {"format": 1, "name": cfg.name, "base": {"init_from": str(base_dir), **checkpoint_identity(base_dir)},
            "tasks": info["tasks"], "labels": info["labels"], "data": info["sources"],
            "metrics": {"val_loss": st.best_loss, "best_step": st.best_step, "steps": st.step,
                        "finished_schedule": finished, "train_minutes": round(st.seconds / 60, 2),
                        "train_tokens": st.tokens, "tokens_per_s": round(st.tokens / max(st.seconds, 1e-9), 1)},
            "config": config_dict(cfg)}
    write_json(tmp / META_FILE, meta)
    old = final.parent / f".{cfg.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- the job
def main(cfg: AdaptConfig) -> dict[str, Any]:
    from model.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        base_dir = resolve_checkpoint(cfg.init_from)
        ckpt = load_checkpoint(base_dir, device=device, dtype=torch.float32)
    except CheckpointError as e:
        raise TrainingError(str(e)) from e
    tokenizer = ckpt.tokenizer
    train_ex, val_ex, info = build_examples(cfg, tokenizer)
    try:
        stream = PackedStream(train_ex, cfg.seq_len, cfg.seed)
    except ValueError as e:
        raise TrainingError(f"{e}; raise --seq_len to at least --max_len") from e
    model = wrap_lora(ckpt.model, cfg)
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), device)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    run = Run(cfg, model, optimizer, stream, val_ex, pad_id, device, MetricsLog(out_dir / "metrics.jsonl"),
              out_dir / "state.pt")
    st = RunState()
    if run.state_path.exists() and not cfg.fresh:
        st = RunState.load(run.state_path, model, optimizer, cfg)
        run.metrics.truncate_after(st.step)
        print(f"resuming {cfg.name} at step {st.step}/{cfg.max_steps} from {run.state_path}")
    else:
        run.metrics.reset()
    write_json(out_dir / "config.json", config_dict(cfg))
    rows = stream.rows_per_epoch() / (cfg.batch_rows * cfg.grad_accum)
    print(f"adapt {cfg.name}: {len(train_ex)} train / {len(val_ex)} val examples, {rows:.1f} steps per epoch, "
          f"{cfg.max_steps} steps, bf16={bf16_supported(device) if cfg.dtype == 'auto' else cfg.dtype == 'bf16'}")
    if st.step == 0 and st.val_step < 0:
        evaluate_and_keep_best(run, st)
        print(f"step 0: val loss {st.last_val:.4f}")
    finished = train(run, st)
    path = publish(run, st, base_dir, info, finished)
    summary = {"adapter": str(path), "steps": st.step, "finished_schedule": finished, "best_step": st.best_step,
               "val_loss": round(st.best_loss, 4), "train_minutes": round(st.seconds / 60, 2),
               "tokens_per_s": round(st.tokens / max(st.seconds, 1e-9), 1)}
    write_summary(out_dir, "adapt", summary)
    return summary


def cli(argv: list[str] | None = None, prog: str = "python -m training.adapt") -> int:
    return run_job(main, AdaptConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
