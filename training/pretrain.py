"""Pretraining: causal-LM training on packed token windows, one process or many (torchrun + DDP).

    python -m training.pretrain --preset cpu-demo --data_dir runs/demo/tok --out_dir runs/demo/pretrain
    torchrun --nproc_per_node 8 -m training.pretrain --preset gpu --data_dir ... --out_dir ...
    seedling-train pretrain --help

Reads `train.bin` / `val.bin` and the tokenizer that `train_tokenizer` wrote into `data_dir`.
Writes into `out_dir`: `checkpoint` (a symlink the server loads, moved atomically every `save_every`
steps onto `checkpoint.versions/step_XXXXXXXX/`; the previous one is kept), `state/step_XXXXXXXX.pt` (optimizer, RNG and data position for that checkpoint),
`metrics.jsonl`, `loss.png`, `config.json`. Re-running the same command resumes exactly where the
last checkpoint left off (same losses, same weights as an uninterrupted run, on CPU fp32).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ModelConfig, preset
from model.device import resolve_device
from model.transformer import Transformer
from training.common import (
    Dist,
    MetricsLog,
    TrainingError,
    all_reduce_mean,
    atomic_torch_save,
    autocast,
    barrier,
    close_distributed,
    config_dict,
    field,
    init_distributed,
    lr_at,
    make_optimizer,
    plot_loss_curve,
    rng_state,
    run_job,
    seed_everything,
    set_lr,
    set_rng_state,
    set_threads,
    write_json,
    write_summary,
)
from training.data import PackedWindows, read_shard


@dataclass
class PretrainConfig:
    data_dir: str = field("", help="directory written by train_tokenizer (tokenizer/, train.bin, val.bin)")
    out_dir: str = field("runs/pretrain", help="output directory (checkpoint/, state/, metrics.jsonl, loss.png)")
    model: str = field("cpu-small", help="model shape preset from model.config (test, cpu-small, gpu-125m)")
    dim: int = field(0, help="override the preset's width (0 = keep)")
    n_layers: int = field(0, help="override the preset's depth (0 = keep)")
    n_heads: int = field(0, help="override the preset's query heads (0 = keep)")
    n_kv_heads: int = field(0, help="override the preset's key/value heads (0 = keep)")
    ffn_dim: int = field(0, help="override the preset's SwiGLU width (0 = keep)")
    seq_len: int = field(256, help="tokens per training window")
    batch_size: int = field(8, help="windows per micro-batch per process")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    max_steps: int = field(1000, help="optimizer steps in total")
    lr: float = field(1e-3, help="peak learning rate")
    min_lr: float = field(1e-4, help="learning rate at the end of the cosine decay")
    warmup_steps: int = field(50, help="linear warmup steps")
    weight_decay: float = field(0.1, help="AdamW weight decay for matrices (norms and biases: none)")
    beta1: float = field(0.9, help="AdamW beta1")
    beta2: float = field(0.95, help="AdamW beta2")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0 = off)")
    eval_every: int = field(100, help="validate every N steps (and at the end)")
    eval_batches: int = field(8, help="validation micro-batches per evaluation")
    save_every: int = field(100, help="write a checkpoint every N steps (and at the end)")
    log_every: int = field(10, help="write a metrics record every N steps")
    seed: int = field(1337, help="seed for weights and data order")
    device: str = field("auto", help="auto, cpu, cuda, cuda:N")
    dtype: str = field("bf16", help="bf16 (autocast on CUDA) or fp32; CPU always trains in fp32")
    compile: bool = field(False, help="torch.compile the model")
    threads: int = field(0, help="CPU threads for torch (0 = torch default)")
    resume: bool = field(True, help="resume from out_dir/checkpoint when it exists")
    stop_at: int = field(0, help="stop after this step as if killed (tests); 0 = run to max_steps")
    peak_tflops: float = field(0.0, help="accelerator peak TFLOP/s for MFU (0 = 989 on CUDA, none on CPU)")
    progress: bool = field(True, help="show a tqdm progress bar")

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError("dtype must be bf16 or fp32")


PRESETS: dict[str, dict[str, Any]] = {
    # seconds, for tests
    "tiny": dict(model="test", seq_len=32, batch_size=4, max_steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=4,
                 eval_every=10, eval_batches=2, save_every=10, log_every=1, progress=False, threads=1),
    # ~3 minutes on a quiet 2-core CPU (one thread: on a shared CPU, OpenMP threads spin against other
    # processes and two threads ran 3x slower than one): a ~4M-parameter model, 0.3M tokens
    "cpu-demo": dict(model="cpu-small", dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768,
                     seq_len=128, batch_size=8, max_steps=300, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                     eval_every=100, eval_batches=4, save_every=100, log_every=10, threads=1),
    # a real run: ~125M parameters, 0.5M tokens per step on one GPU (scale grad_accum down for more GPUs)
    "gpu": dict(model="gpu-125m", seq_len=1024, batch_size=32, grad_accum=16, max_steps=20000, lr=6e-4,
                min_lr=6e-5, warmup_steps=700, eval_every=500, eval_batches=20, save_every=1000,
                log_every=10, compile=True),
}


# ---------------------------------------------------------------------------- helpers
def model_config(cfg: PretrainConfig, tokenizer: Any) -> ModelConfig:
    overrides = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
                 if getattr(cfg, k)}
    base = preset(cfg.model)
    return preset(cfg.model, **overrides, vocab_size=tokenizer.vocab_size,
                  max_seq_len=max(cfg.seq_len, base.max_seq_len),
                  bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (non-embedding params + head) + attention (PaLM appendix B)."""
    n = c.num_params() - (c.vocab_size * c.dim if c.tie_embeddings else 0) + c.vocab_size * c.dim
    return 6 * n + 12 * c.n_layers * c.dim * seq_len


@torch.no_grad()
def validate(model: torch.nn.Module, windows: PackedWindows, batches: int, batch_size: int,
             device: torch.device, dtype: str) -> float:
    """Mean next-token loss over the first `batches * batch_size` validation windows (fixed order)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(batches * batch_size, windows.n_windows)
    for first in range(0, n, batch_size):
        x, y = windows.batch(first, min(batch_size, n - first))
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def state_path(out_dir: Path, step: int) -> Path:
    return out_dir / "state" / f"step_{step:08d}.pt"


def save(out_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer, tokenizer: Any, step: int,
         meta: dict[str, Any]) -> None:
    """Training state first, then the checkpoint as version step_N of out_dir/checkpoint, published
    atomically, then older states removed: a kill at any point leaves a published checkpoint whose
    state file exists (model.versioned rolls an interrupted publish forward or back)."""
    from model.checkpoint import save_checkpoint

    atomic_torch_save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()},
                      state_path(out_dir, step))
    save_checkpoint(out_dir / "checkpoint", model, tokenizer, {**meta, "step": step}, version=f"step_{step:08d}")
    for p in (out_dir / "state").glob("step_*.pt"):
        if p != state_path(out_dir, step):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the job, step by step
@dataclass
class Run:
    """What one pretraining process holds: built by `setup`, resumed by `resume`, advanced by `train`."""
    cfg: PretrainConfig
    device: torch.device
    dist: Dist
    out_dir: Path
    data_dir: Path
    tokenizer: Any
    mcfg: ModelConfig
    train_windows: PackedWindows
    val_windows: PackedWindows
    model: Transformer
    optimizer: torch.optim.Optimizer
    metrics: MetricsLog

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum * self.dist.world_size


@dataclass
class Meter:
    """Throughput since the last metrics record, the latest losses, and MFU when a peak is known."""
    last_step: int  # of the last metrics record
    flops_per_token: float
    peak_tflops: float
    t0: float
    last_t: float
    tok_s: float = 0.0
    loss: float = float("nan")
    val_loss: float = float("nan")

    def mfu(self, tok_s: float) -> float:
        return round(self.flops_per_token * tok_s / (self.peak_tflops * 1e12), 4)


def setup(cfg: PretrainConfig) -> Run:
    """1. process, device, output; 2. tokenizer, data, model, optimizer (weights seeded by cfg.seed)."""
    from model.tokenizer import Tokenizer

    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    out_dir, data_dir = Path(cfg.out_dir), Path(cfg.data_dir)
    if not cfg.data_dir:
        raise TrainingError("--data_dir is required (the directory train_tokenizer wrote)")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", config_dict(cfg))
    barrier(dist)

    tok_dir = data_dir / "tokenizer"
    if not tok_dir.exists():
        raise TrainingError(f"{tok_dir} not found; run `seedling-train train_tokenizer --out_dir {data_dir}` first")
    tokenizer = Tokenizer.load(tok_dir)
    mcfg = model_config(cfg, tokenizer)
    train_windows = PackedWindows(read_shard(data_dir / "train.bin", mcfg.vocab_size).tokens, cfg.seq_len, cfg.seed)
    val_windows = PackedWindows(read_shard(data_dir / "val.bin", mcfg.vocab_size).tokens, cfg.seq_len, cfg.seed,
                                shuffle=False)
    seed_everything(cfg.seed)
    model = Transformer(mcfg).init_weights(cfg.seed).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device)
    return Run(cfg, device, dist, out_dir, data_dir, tokenizer, mcfg, train_windows, val_windows, model, optimizer,
               MetricsLog(out_dir / "metrics.jsonl", enabled=dist.is_main))


def resume(run: Run) -> int:
    """3. The step to start from: the published checkpoint's, with its weights, optimizer and RNG state
    restored and later metrics records dropped; 0 (and a fresh metrics log) without one."""
    from model.checkpoint import load_checkpoint, read_meta, recover_checkpoint

    start = 0
    ckpt_dir = recover_checkpoint(run.out_dir / "checkpoint") if run.cfg.resume else None
    if ckpt_dir is not None:
        start = int(read_meta(ckpt_dir)["step"])
        sp = state_path(run.out_dir, start)
        if not sp.exists():
            raise TrainingError(f"{ckpt_dir} is at step {start} but {sp} is missing; cannot resume exactly "
                                f"(pass --no-resume with a new --out_dir to start over)")
        loaded = load_checkpoint(ckpt_dir, device="cpu", dtype=torch.float32)
        if loaded.config.to_dict() != run.mcfg.to_dict():
            raise TrainingError(f"{ckpt_dir} has a different model shape than this config; use a new --out_dir")
        run.model.load_state_dict(loaded.model.state_dict())
        state = torch.load(sp, map_location=run.device, weights_only=True)
        run.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        run.metrics.truncate_after(start)
        if run.dist.is_main:
            print(f"resumed from {ckpt_dir} at step {start}")
    elif run.dist.is_main:
        run.metrics.reset()
    barrier(run.dist)
    return start


def wrap(run: Run) -> torch.nn.Module:
    """4. The model the loop runs: compiled and/or DDP-wrapped (the same parameters as `run.model`)."""
    train_model: torch.nn.Module = run.model
    if run.cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    if run.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    train_model.train()
    return train_model


def train_step(run: Run, train_model: torch.nn.Module, step: int, lr: float) -> float:
    """One optimizer update at `lr` over grad_accum micro-batches; the loss, averaged over processes."""
    cfg, dist = run.cfg, run.dist
    set_lr(run.optimizer, lr)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        g = (step * cfg.grad_accum + micro) * dist.world_size + dist.rank  # global micro-batch index
        x, y = run.train_windows.batch(g * cfg.batch_size, cfg.batch_size)  # (B, T) each
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        sync = micro == cfg.grad_accum - 1 or not dist.enabled
        # DDP all-reduces gradients only on the last micro-batch of the step
        with train_model.no_sync() if not sync else contextlib.nullcontext():  # type: ignore[operator]
            with autocast(run.device, cfg.dtype):
                logits = train_model(x)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    return all_reduce_mean(loss_sum / cfg.grad_accum, dist).item()


def nan_error(run: Run, loss: float, step: int) -> TrainingError:
    """The error for a loss that is not finite: nothing is saved; it names the last good checkpoint."""
    from model.checkpoint import read_meta, recover_checkpoint

    good = recover_checkpoint(run.out_dir / "checkpoint")
    where = f"the last good checkpoint is {good} (step {read_meta(good)['step']})" if good else \
        "no checkpoint was written yet"
    return TrainingError(f"loss became {loss} at step {step + 1}; stopped without saving; {where}. "
                         "Lower --lr or raise --warmup_steps, then re-run to resume from it")


def after_step(run: Run, meter: Meter, done: int, lr: float, grad_norm: float, bar: Any) -> None:
    """Every log_every / eval_every / save_every steps (and at the end): metrics record, validation, checkpoint."""
    cfg, last = run.cfg, done == run.cfg.max_steps
    now = time.perf_counter()
    if done % cfg.log_every == 0 or last:
        meter.tok_s = run.tokens_per_step * (done - meter.last_step) / max(now - meter.last_t, 1e-9)
        meter.last_t, meter.last_step = now, done
        rec: dict[str, Any] = {"step": done, "loss": meter.loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens": done * run.tokens_per_step, "tok_s": round(meter.tok_s, 1)}
        if meter.peak_tflops:
            rec["mfu"] = meter.mfu(meter.tok_s)
        run.metrics.write(rec)
    bar.set_postfix(loss=f"{meter.loss:.3f}", tok_s=f"{meter.tok_s:,.0f}", lr=f"{lr:.1e}")
    if done % cfg.eval_every == 0 or last:
        meter.val_loss = validate(run.model, run.val_windows, cfg.eval_batches, cfg.batch_size, run.device, cfg.dtype)
        ppl = math.exp(min(meter.val_loss, 50))
        run.metrics.write({"step": done, "val_loss": meter.val_loss, "val_ppl": ppl})
        if run.dist.is_main:
            bar.write(f"step {done}: val loss {meter.val_loss:.4f}, ppl {ppl:.2f}")
    if done % cfg.save_every == 0 or last:
        if run.dist.is_main:
            meta = {"job": "pretrain", "data": str(run.data_dir), "config": config_dict(cfg),
                    "metrics": {"val_loss": meter.val_loss, "train_loss": meter.loss}}
            save(run.out_dir, run.model, run.optimizer, run.tokenizer, done, meta)
            plot_loss_curve(run.metrics.records(), run.out_dir / "loss.png", title=f"pretrain {run.out_dir.name}")
        barrier(run.dist)


def train(run: Run, start: int) -> tuple[int, Meter]:
    """5. The loop, one optimizer update per step, from `start` to max_steps (or stop_at); the last step done."""
    from tqdm import tqdm

    cfg = run.cfg
    if run.dist.is_main:
        print(f"model {run.mcfg.num_params() / 1e6:.2f}M params; {run.train_windows.n_windows} train windows of "
              f"{cfg.seq_len}; {run.tokens_per_step} tokens/step on {run.dist.world_size} process(es), {run.device}")
    train_model = wrap(run)
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and run.dist.is_main),
               dynamic_ncols=True, unit="step")
    now = time.perf_counter()
    meter = Meter(start, flops_per_token(run.mcfg, cfg.seq_len),
                  cfg.peak_tflops or (989.0 if run.device.type == "cuda" else 0.0), t0=now, last_t=now)
    done = start
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        meter.loss = train_step(run, train_model, step, lr)
        if not math.isfinite(meter.loss):
            bar.close()
            error = nan_error(run, meter.loss, step)
            close_distributed(run.dist)
            raise error
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip).item() \
            if cfg.grad_clip > 0 else 0.0
        run.optimizer.step()
        done = step + 1
        bar.update(1)
        after_step(run, meter, done, lr, grad_norm, bar)
        if cfg.stop_at and done >= cfg.stop_at:
            break
    bar.close()
    return done, meter


def summarize(run: Run, start: int, done: int, meter: Meter) -> dict[str, Any]:
    """6. summary.json and one printed line: losses, throughput over the whole run, MFU."""
    elapsed = time.perf_counter() - meter.t0
    summary: dict[str, Any] = {
        "step": done, "train_loss": meter.loss, "val_loss": meter.val_loss,
        "val_ppl": math.exp(min(meter.val_loss, 50)) if math.isfinite(meter.val_loss) else None,
        "tokens_per_s": round(run.tokens_per_step * (done - start) / elapsed, 1), "seconds": round(elapsed, 1)}
    if meter.peak_tflops:
        summary["mfu"] = meter.mfu(summary["tokens_per_s"])
    if run.dist.is_main:
        write_summary(run.out_dir, "pretrain", summary)
    return summary


def main(cfg: PretrainConfig) -> dict[str, Any]:
    run = setup(cfg)
    start = resume(run)
    if start >= cfg.max_steps:
        print(f"already at step {start} >= max_steps {cfg.max_steps}; nothing to do")
        close_distributed(run.dist)
        return {"step": start}
    done, meter = train(run, start)
    summary = summarize(run, start, done, meter)
    close_distributed(run.dist)
    return summary


def cli(argv: list[str] | None = None, prog: str = "python -m training.pretrain") -> int:
    return run_job(main, PretrainConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
