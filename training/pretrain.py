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


# ---------------------------------------------------------------------------- the job
def main(cfg: PretrainConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from model.checkpoint import load_checkpoint, read_meta, recover_checkpoint
    from model.tokenizer import Tokenizer

    # 1. process, device, output
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

    # 2. tokenizer, data, model
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
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=dist.is_main)

    # 3. resume
    start = 0
    ckpt_dir = recover_checkpoint(out_dir / "checkpoint") if cfg.resume else None
    if ckpt_dir is not None:
        start = int(read_meta(ckpt_dir)["step"])
        sp = state_path(out_dir, start)
        if not sp.exists():
            raise TrainingError(f"{ckpt_dir} is at step {start} but {sp} is missing; cannot resume exactly "
                                f"(pass --no-resume with a new --out_dir to start over)")
        loaded = load_checkpoint(ckpt_dir, device="cpu", dtype=torch.float32)
        if loaded.config.to_dict() != mcfg.to_dict():
            raise TrainingError(f"{ckpt_dir} has a different model shape than this config; use a new --out_dir")
        model.load_state_dict(loaded.model.state_dict())
        state = torch.load(sp, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        metrics.truncate_after(start)
        if dist.is_main:
            print(f"resumed from {ckpt_dir} at step {start}")
    elif dist.is_main:
        metrics.reset()
    barrier(dist)
    if start >= cfg.max_steps:
        print(f"already at step {start} >= max_steps {cfg.max_steps}; nothing to do")
        close_distributed(dist)
        return {"step": start}

    # 4. wrap for speed / parallelism
    train_model: torch.nn.Module = model
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model.train()

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * dist.world_size
    fpt = flops_per_token(mcfg, cfg.seq_len)
    peak = cfg.peak_tflops or (989.0 if device.type == "cuda" else 0.0)
    if dist.is_main:
        print(f"model {mcfg.num_params() / 1e6:.2f}M params; {train_windows.n_windows} train windows of "
              f"{cfg.seq_len}; {tokens_per_step} tokens/step on {dist.world_size} process(es), {device}")
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and dist.is_main),
               dynamic_ncols=True, unit="step")
    last_t, last_step, tok_s = time.perf_counter(), start, 0.0
    total_t0, val_loss = time.perf_counter(), float("nan")
    meta_base = {"job": "pretrain", "data": str(data_dir), "config": config_dict(cfg)}
    step = start
    # 5. the loop: one optimizer update per step
    for step in range(start, cfg.max_steps):
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            g = (step * cfg.grad_accum + micro) * dist.world_size + dist.rank  # global micro-batch index
            x, y = train_windows.batch(g * cfg.batch_size, cfg.batch_size)  # (B, T) each
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or not dist.enabled
            # DDP all-reduces gradients only on the last micro-batch of the step
            with train_model.no_sync() if not sync else _null():  # type: ignore[operator]
                with autocast(device, cfg.dtype):
                    logits = train_model(x)  # (B, T, V)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_val = all_reduce_mean(loss_sum / cfg.grad_accum, dist).item()
        if not math.isfinite(loss_val):
            good = recover_checkpoint(out_dir / "checkpoint")
            where = f"the last good checkpoint is {good} (step {read_meta(good)['step']})" if good else \
                "no checkpoint was written yet"
            bar.close()
            close_distributed(dist)
            raise TrainingError(f"loss became {loss_val} at step {step + 1}; stopped without saving; {where}. "
                                "Lower --lr or raise --warmup_steps, then re-run to resume from it")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item() \
            if cfg.grad_clip > 0 else 0.0
        optimizer.step()
        done = step + 1
        bar.update(1)

        now = time.perf_counter()
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            tok_s = tokens_per_step * (done - last_step) / max(now - last_t, 1e-9)
            last_t, last_step = now, done
            rec: dict[str, Any] = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                                   "tokens": done * tokens_per_step, "tok_s": round(tok_s, 1)}
            if peak:
                rec["mfu"] = round(fpt * tok_s / (peak * 1e12), 4)
            metrics.write(rec)
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")

        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            val_loss = validate(model, val_windows, cfg.eval_batches, cfg.batch_size, device, cfg.dtype)
            metrics.write({"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            if dist.is_main:
                bar.write(f"step {done}: val loss {val_loss:.4f}, ppl {math.exp(min(val_loss, 50)):.2f}")
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            if dist.is_main:
                save(out_dir, model, optimizer, tokenizer, done,
                     {**meta_base, "metrics": {"val_loss": val_loss, "train_loss": loss_val}})
                plot_loss_curve(metrics.records(), out_dir / "loss.png", title=f"pretrain {out_dir.name}")
            barrier(dist)
        if cfg.stop_at and done >= cfg.stop_at:
            break
    bar.close()

    # 6. summary
    elapsed = time.perf_counter() - total_t0
    steps_run = step + 1 - start
    summary = {"step": step + 1, "train_loss": loss_val, "val_loss": val_loss,
               "val_ppl": math.exp(min(val_loss, 50)) if math.isfinite(val_loss) else None,
               "tokens_per_s": round(tokens_per_step * steps_run / elapsed, 1), "seconds": round(elapsed, 1)}
    if peak:
        summary["mfu"] = round(fpt * summary["tokens_per_s"] / (peak * 1e12), 4)
    if dist.is_main:
        write_json(out_dir / "summary.json", summary)
        print("pretrain: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in summary.items()))
    close_distributed(dist)
    return summary


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


def cli(argv: list[str] | None = None, prog: str = "python -m training.pretrain") -> int:
    return run_job(main, PretrainConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
