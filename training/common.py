"""Shared pieces of the training jobs: config parsing, devices, seeding, optimiser, LR schedule,
distributed setup, atomic files, metrics log and loss curve.

Jobs share these functions, not a base class: each job (`training/<job>.py`) is a config
dataclass, a `PRESETS` dict and `main(cfg)`, and its `__main__` is one line:

    raise SystemExit(main(parse_config(PretrainConfig, PRESETS, description=__doc__)))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from model.checkpoint import CheckpointError
from model.device import DeviceError
from model.versioned import atomic_write_bytes

C = TypeVar("C")
log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A failure the user can act on; the job prints its message (one line) and exits non-zero."""


# ---------------------------------------------------------------------------- config parsing
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string",
             "list": "a list"}


def _validate(cls: type[C], values: Mapping[str, Any]) -> C:
    """The config object, with values converted and checked by pydantic (the configs stay plain
    dataclasses; pydantic validates them as they are): "10" -> 10, "yes" -> True, and __post_init__
    runs. Every problem becomes one line naming the key."""
    import pydantic

    try:
        return pydantic.TypeAdapter(cls).validate_python(dict(values))
    except pydantic.ValidationError as e:
        raise TrainingError("; ".join(_describe(cls, err) for err in e.errors())) from None


def _describe(cls: type, err: Any) -> str:
    if not err["loc"]:  # raised by the dataclass's own __post_init__ checks
        return f"invalid {cls.__name__}: {err['msg'].removeprefix('Value error, ')}"
    key = ".".join(str(part) for part in err["loc"])
    kind = err["type"].split("_")[0]
    what = f"must be {_EXPECTED[kind]}" if kind in _EXPECTED else err["msg"].lower()
    return f"config key {key!r} {what}, got {err['input']!r}"


def field(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a one-line help text (shown by --help); `default_factory=` as usual."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def load_config_file(path: Path) -> dict[str, Any]:
    """A JSON or YAML mapping of field name -> value."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) if Path(path).suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise TrainingError(f"config file {path} cannot be read: {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: config file must hold a mapping of option -> value")
    return data


def build_config(cls: type[C], presets: Mapping[str, Mapping[str, Any]], preset: str | None = None,
                 file_values: Mapping[str, Any] | None = None, **overrides: Any) -> C:
    """defaults < preset < config file < overrides; unknown keys raise TrainingError."""
    if preset and preset not in presets:
        raise TrainingError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    known = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for origin, layer in ((f"preset {preset!r}", presets[preset] if preset else {}),
                          ("config file", file_values or {}), ("overrides", overrides)):
        if unknown := sorted(set(layer) - set(known)):
            raise TrainingError(f"unknown config keys in {origin}: {unknown}; valid keys: {known}")
        values.update(layer)
    return _validate(cls, values)


def make_parser(cls: type, presets: Mapping[str, Any], prog: str | None = None,
                description: str | None = None) -> argparse.ArgumentParser:
    """One --flag per dataclass field (with its help line), plus --preset and --config."""
    parser = argparse.ArgumentParser(prog=prog, description=(description or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="named set of defaults (flags and --config override it)")
    parser.add_argument("--config", type=Path, default=None, help="JSON or YAML file of option: value")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, factory = hints[f.name], f.default_factory
        default = factory() if factory is not dataclasses.MISSING else (  # type: ignore[misc]
            None if f.default is dataclasses.MISSING else f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata.get('help', '')} (default: {default!r})"}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
            kwargs["nargs"] = "*"
        parser.add_argument("--" + f.name, **kwargs)  # other values stay strings; _validate converts them
    return parser


def parse_config(cls: type[C], presets: Mapping[str, Mapping[str, Any]], argv: Sequence[str] | None = None,
                 prog: str | None = None, description: str | None = None) -> C:
    parser = make_parser(cls, presets, prog=prog, description=description)
    args = vars(parser.parse_args(argv))
    preset, config_path = args.pop("preset"), args.pop("config")
    file_values = load_config_file(config_path) if config_path else None
    return build_config(cls, presets, preset, file_values, **args)


def run_job(main: Any, cls: type[C], presets: Mapping[str, Mapping[str, Any]], argv: Sequence[str] | None = None,
            prog: str | None = None, description: str | None = None) -> int:
    """Parse flags into a config and run `main(cfg)`; TrainingError becomes a one-line message + exit 1."""
    try:
        cfg = parse_config(cls, presets, argv, prog=prog, description=description)
        main(cfg)
    except (TrainingError, DeviceError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def config_dict(cfg: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


# ---------------------------------------------------------------------------- devices and seeds
def set_threads(n: int) -> None:
    """Intra-op CPU threads (0 = torch's default). On a shared CPU, 1 thread avoids OpenMP threads
    spinning against other processes: tiny models run ~10x faster that way."""
    if n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- distributed
@dataclasses.dataclass
class Dist:
    """Where this process sits in a `torchrun` job (rank 0 of 1 when run plainly)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (env WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local)


def close_distributed(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------- optimiser and schedule
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: matrices (weights of Linear/Embedding) decay; norms and biases do not.
    Tied parameters are seen once (named_parameters de-duplicates them)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`.
    `step` counts optimiser updates from 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device, dtype: str) -> Any:
    """bf16 autocast on CUDA when asked; a no-op context elsewhere (CPU trains in fp32)."""
    import contextlib

    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- files
def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_summary(out_dir: Path, job: str, summary: Mapping[str, Any]) -> None:
    """A job's end: `out_dir/summary.json`, and the same as one printed line `job: key=value, ...`."""
    write_json(out_dir / "summary.json", summary)
    print(f"{job}: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


# ---------------------------------------------------------------------------- metrics log + plot
class MetricsLog:
    """Appends one JSON object per line to `path`; `truncate_after(step)` drops records a killed run
    wrote after its last checkpoint, so a resumed run's log reads as if it had never stopped."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def reset(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every record; a line that is not a JSON object (the torn last line of a killed run) is
        skipped with a warning rather than failing the resume or the plot."""
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                out.append(record)
            else:
                log.warning("%s:%d is not a JSON record (a write cut off by a kill?); skipped: %.60s",
                            self.path, n, line)
        return out


def plot_loss_curve(records: Iterable[Mapping[str, Any]], path: Path, title: str = "loss") -> None:
    """Train loss per step and validation loss where measured, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = list(records)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def format_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}T"
