"""ServerSettings: every knob of the HTTP service, read from SEEDLING_* environment variables.

    settings = ServerSettings.from_env()            # os.environ
    settings = ServerSettings(checkpoint="ckpt/", max_num_seqs=4)   # tests, explicit

Each field below is one environment variable: `max_num_seqs` <- `SEEDLING_MAX_NUM_SEQS`.
Values are validated in `__post_init__`; a mistyped or unknown SEEDLING_* variable fails loudly
at startup instead of being ignored. `checkpoint=None` means the default SmolLM2 checkpoint,
fetched and converted on first start (`model.convert.ensure_default_model`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from model.config import QUANTIZATIONS

ENV_PREFIX = "SEEDLING_"
# SEEDLING_* variables that belong to other parts of Seedling (not server settings)
FOREIGN_ENV = frozenset({"SEEDLING_HOME", "SEEDLING_NATIVE_DIR"})  # model/: data home, native kernels


class SettingsError(ValueError):
    """A bad server setting (the message names the environment variable)."""


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass
class ServerSettings:
    checkpoint: str | None = None  # checkpoint directory; None = default SmolLM2 (fetched on first start)
    model_name: str | None = None  # name served in /v1/models and accepted as `model`; None = dir name
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    max_num_seqs: int = 16  # sequences decoded together (KV-cache slots)
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    max_num_batched_tokens: int = 512  # tokens per engine step (prefill chunks + decodes)
    prefill_chunk: int = 256  # longest prefill piece per sequence per step (bounds decode stalls)
    prefix_caching: bool = True  # reuse the K/V of a shared prompt prefix (long system prompts)
    cuda_graphs: bool = False  # on a GPU, replay decode steps as CUDA graphs (opt-in; bench/gpu_check.py)
    quantize: str = "none"  # none | int8 (weight-only) | w8a8 (int8 weights + activations, CPU) | q4 (Q4_1 blocks, native CPU forward); bench/quality.py
    max_tokens_default: int = 256  # max new tokens when a request does not say
    max_tokens_limit: int = 1024  # the most new tokens a request may ask for (400 above)
    max_queued_requests: int = 64  # requests waiting beyond max_num_seqs before 429 overloaded
    request_timeout_s: float = 300.0  # per-request deadline (504 after it; the request is aborted)
    api_keys: tuple[str, ...] = ()  # accepted bearer keys (comma list in env); empty = no auth
    cors_origins: tuple[str, ...] = ()  # allowed CORS origins (comma list; "*" for any); empty = no CORS
    default_system_prompt: str | None = None  # system message added when a chat has none
    log_level: str = "info"  # debug | info | warning | error
    log_prompts: bool = False  # log prompts and outputs (off by default: privacy)
    host: str = "127.0.0.1"  # bind address for `python -m app`
    port: int = 8000  # bind port for `python -m app`
    drain_timeout_s: float = 30.0  # on SIGTERM: seconds to let in-flight requests finish
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    max_batch_items: int = 64  # items in one list input (/summarize texts, /v1/completions prompts)
    warmup: bool = True  # run one tiny generation before /ready turns green
    static_dir: str | None = None  # playground files served at /; None = app/static if present

    def __post_init__(self) -> None:
        self.api_keys = tuple(self.api_keys)
        self.cors_origins = tuple(self.cors_origins)
        self.log_level = self.log_level.lower()
        checks = [
            (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             "device", "must be auto, cpu, cuda or cuda:N"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
             "must be auto, float32, bfloat16 or float16"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_model_len >= 16, "max_model_len", "must be >= 16"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1"),
            (self.prefill_chunk >= 1, "prefill_chunk", "must be >= 1"),
            (self.quantize in ("none", *QUANTIZATIONS), "quantize", f"must be none or one of {', '.join(QUANTIZATIONS)}"),
            (1 <= self.max_tokens_default <= self.max_tokens_limit, "max_tokens_default",
             "must be in [1, max_tokens_limit]"),
            (self.max_queued_requests >= 0, "max_queued_requests", "must be >= 0"),
            (self.request_timeout_s > 0, "request_timeout_s", "must be > 0"),
            (self.log_level in ("debug", "info", "warning", "error", "critical"), "log_level",
             "must be debug, info, warning, error or critical"),
            (0 < self.port < 65536, "port", "must be in 1..65535"),
            (self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0"),
            (self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024"),
            (self.max_batch_items >= 1, "max_batch_items", "must be >= 1"),
            (all(self.api_keys), "api_keys", "must not contain empty keys"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} {why}, got {getattr(self, name)!r}")

    @property
    def admission_limit(self) -> int:
        """Requests (items) in flight at most: running slots plus the waiting queue."""
        return self.max_num_seqs + self.max_queued_requests

    def resolve_checkpoint(self) -> Path:
        """The checkpoint directory; fetches and converts the default model when none is set."""
        if self.checkpoint:
            return Path(self.checkpoint)
        from model.convert import ensure_default_model  # heavy import, only when needed

        return Path(ensure_default_model())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ServerSettings:
        """Settings from SEEDLING_* variables (unknown ones raise), then explicit overrides."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX) or key in FOREIGN_ENV:
                continue
            name = key[len(ENV_PREFIX):].lower()
            if name not in fields:
                known = ", ".join(ENV_PREFIX + n.upper() for n in fields)
                raise SettingsError(f"unknown setting {key}; known: {known}")
            values[name] = _parse(key, raw, str(fields[name].type))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def env_table(self) -> list[tuple[str, str, str]]:
        """(variable, default, help) rows for the README, from the field comments' defaults."""
        return [(ENV_PREFIX + f.name.upper(), repr(getattr(self, f.name)), str(f.type))
                for f in dataclasses.fields(self)]


def _parse(key: str, raw: str, type_name: str) -> object:
    raw = raw.strip()
    try:
        if type_name.startswith("tuple"):
            return _csv(raw)
        if type_name == "bool":
            lowered = raw.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        if type_name == "int":
            return int(raw.replace("_", ""))
        if type_name == "float":
            return float(raw)
        if type_name == "str | None":
            return raw or None
        return raw
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not a valid {type_name}") from None
