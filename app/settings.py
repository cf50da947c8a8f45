"""ServerSettings: the HTTP service's knobs, one SEEDLING_* variable a field (the table: docs/configuration.md).

`ServerSettings()` reads the environment, ./.env, then /run/secrets; explicit values win (tests, CLI flags). A bad
value, an unknown SEEDLING_* name or an unsafe combination raises SettingsError naming the variable.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.config import QUANTIZATIONS
from model.engine import EngineConfig

ENV_PREFIX = "SEEDLING_"
SECRETS_DIR = Path("/run/secrets")  # Docker/compose secrets; read only when present
FOREIGN_ENV = frozenset({"SEEDLING_HOME", "SEEDLING_NATIVE_DIR", "SEEDLING_CPU_ISA"})  # model/'s; not in .env
_ENGINE = EngineConfig()  # the engine's defaults, read (never restated) by the fields below


class SettingsError(ValueError):
    """A bad server setting (the message names the environment variable)."""


def _device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise ValueError("must be auto, cpu, cuda or cuda:N")


def _split(text: str) -> tuple[str, ...]:
    """Commas or whitespace: `k1, k2` in a variable, one key per line in a file."""
    return tuple(part for part in re.split(r"[,\s]+", text) if part)


Count = Annotated[int, Field(ge=1)]
Device = Annotated[str, AfterValidator(_device)]
LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(str.lower)]
CommaList = Annotated[tuple[Annotated[str, Field(min_length=1)], ...], NoDecode,
                      BeforeValidator(lambda v: _split(v) if isinstance(v, str) else v)]  # "a, b," -> ("a", "b")


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", dotenv_filtering="match_prefix",
                                      env_ignore_empty=True, extra="forbid")

    # ---- model and engine (the engine's knobs: EngineConfig's names and defaults)
    checkpoint: str | None = Field(None, description="checkpoint directory; unset = SmolLM2-135M-Instruct (fetched once)")
    model_name: str | None = Field(None, description="name in /v1/models and `model`; unset = the checkpoint's name")
    adapters_dir: str | None = Field(None, description="adapters and heads (a subdirectory each) served by name")
    adapters_poll_s: float = Field(2.0, ge=0, description="seconds between scans of adapters_dir; 0 = at start only")
    device: Device = Field("auto", description="auto (cuda when present, else cpu) | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on cuda, f32 on cpu")
    quantize: Literal[("auto", "none", *QUANTIZATIONS)] = Field(  # type: ignore[valid-type]
        "auto", description="auto: q4 where the native CPU kernels run, else none (bench/quality.py)")
    max_num_seqs: Count = Field(_ENGINE.max_num_seqs, description="sequences decoded together (KV-cache slots)")
    max_model_len: int = Field(_ENGINE.max_model_len, ge=16, description="prompt + generated tokens per sequence")
    max_num_batched_tokens: Count = Field(_ENGINE.max_num_batched_tokens, description="tokens per step (raised to max_num_seqs)")
    prefill_chunk: Count = Field(_ENGINE.prefill_chunk, description="longest prefill piece per sequence per step")
    prefix_caching: bool = Field(_ENGINE.enable_prefix_caching, description="reuse the K/V of a shared prompt prefix")
    cuda_graphs: bool = Field(_ENGINE.cuda_graphs, description="replay GPU decode steps as CUDA graphs (opt-in)")
    warmup: bool = Field(True, description="run one tiny generation before /ready turns green")
    engine_stall_timeout_s: float = Field(120.0, ge=2, description="a step hanging longer: /health 503, exit 1")
    # ---- requests
    max_tokens_default: Count = Field(256, description="max new tokens when a request does not say")
    max_tokens_limit: Count = Field(1024, description="the most new tokens a request may ask for (400 above)")
    max_queued_requests: int = Field(64, ge=0, description="items waiting beyond max_num_seqs before 429")
    max_batch_items: Count = Field(64, description="items in one list input (texts, prompts)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(300.0, gt=0, description="per-request deadline (504, aborted)")
    default_system_prompt: str | None = Field(None, description="system message added when a chat has none")
    # ---- access
    api_keys: CommaList = Field((), repr=False, description="accepted bearer keys; empty = no authentication")
    api_keys_file: str | None = Field(None, description="file with more keys, one per line (Docker secret)")
    allow_unauthenticated: bool = Field(False, description="allow a non-loopback host without any key")
    open_paths: CommaList = Field(("/health", "/ready", "/metrics"), description="paths that need no key")
    cors_origins: CommaList = Field((), description="allowed CORS origins (\"*\" for any); empty = no CORS")
    # ---- process
    host: str = Field("127.0.0.1", description="bind address of `python -m app` (0.0.0.0 needs a key)")
    port: int = Field(8000, ge=1, le=65535, description="bind port of `python -m app`")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: seconds in-flight requests get to finish")
    log_level: LogLevel = Field("info", description="log level of the server and uvicorn")
    log_prompts: bool = Field(False, description="log prompts and outputs (off: privacy)")
    static_dir: str | None = Field(None, description="playground files served at /; unset = app/static")

    def __init__(self, **values: object) -> None:
        """Also refuses unknown SEEDLING_* variables (pydantic-settings would ignore a misspelt one)."""
        known = self.env_names()
        for name in (key.upper() for key in os.environ):
            if name.startswith(ENV_PREFIX) and name not in known.keys() | FOREIGN_ENV:
                raise SettingsError(_unknown(name, list(known), " in the environment"))
        try:
            super().__init__(_secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None, **values)
        except ValidationError as exc:
            raise SettingsError(_explain(exc, explicit=values.keys())) from None

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if self.max_tokens_default > self.max_tokens_limit:
            raise ValueError(f"SEEDLING_MAX_TOKENS_DEFAULT={self.max_tokens_default} must be <= "
                             f"SEEDLING_MAX_TOKENS_LIMIT={self.max_tokens_limit}")
        if self.max_batch_items > self.admission_limit:
            raise ValueError(f"SEEDLING_MAX_BATCH_ITEMS={self.max_batch_items} is larger than the admission limit "
                             f"SEEDLING_MAX_NUM_SEQS + SEEDLING_MAX_QUEUED_REQUESTS = {self.admission_limit}: a request "
                             "with that many items could never be admitted (429 forever); lower it or raise the others")
        self.api_keys += _read_keys(self.api_keys_file) if self.api_keys_file else ()
        if not self.api_keys and not self.allow_unauthenticated and not _is_loopback(self.host):
            raise ValueError(f"SEEDLING_HOST={self.host} is reachable from other machines but no API key is set: give "
                             "SEEDLING_API_KEYS or SEEDLING_API_KEYS_FILE, bind 127.0.0.1, or set "
                             "SEEDLING_ALLOW_UNAUTHENTICATED=1 to serve without authentication on purpose")
        return self

    @property
    def admission_limit(self) -> int:
        """Requests (items) in flight at most: running slots plus the waiting queue."""
        return self.max_num_seqs + self.max_queued_requests

    def engine_config(self, max_model_len: int) -> EngineConfig:
        """The engine's knobs; `max_model_len` as the model allows, enough batched tokens for one decode each."""
        return EngineConfig(max_num_seqs=self.max_num_seqs, max_model_len=max_model_len,
                            max_num_batched_tokens=max(self.max_num_batched_tokens, self.max_num_seqs),
                            prefill_chunk=self.prefill_chunk, enable_prefix_caching=self.prefix_caching,
                            cuda_graphs=self.cuda_graphs)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """{SEEDLING_NAME: field name} for every setting."""
        return {ENV_PREFIX + name.upper(): name for name in cls.model_fields}


# ----------------------------------------------------------------------------
# errors that name the variable

def _unknown(name: str, known: list[str], where: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown setting {name}{where}{hint}; known: {', '.join(sorted(known))}"


def _explain(exc: ValidationError, explicit: Collection[str]) -> str:
    """One part per problem: `SEEDLING_PORT='http': Input should be a valid integer ...`."""
    parts = []
    for err in exc.errors():
        message, field = err["msg"].removeprefix("Value error, "), str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden" and field in explicit:  # ServerSettings(max_num_seq=4)
            parts.append(_unknown(field, list(ServerSettings.model_fields)))
        elif err["type"] == "extra_forbidden":  # the environment is checked first: from .env
            parts.append(_unknown(ENV_PREFIX + field.upper(), list(ServerSettings.env_names()), " in .env"))
        elif field in ServerSettings.model_fields:
            value = "" if field == "api_keys" else f"={err['input']!r}"  # never echo a key
            parts.append(f"{ENV_PREFIX}{field.upper()}{value}: {message}")
        else:  # a cross-field check: its message names the variables
            parts.append(message)
    return "; ".join(parts)


def _read_keys(path: str) -> tuple[str, ...]:
    """Keys from a file such as a Docker secret (`#` starts a comment line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"SEEDLING_API_KEYS_FILE={path!r} cannot be read: {exc.strerror}") from None
    if keys := _split(" ".join(line for line in lines if not line.lstrip().startswith("#"))):
        return keys
    raise ValueError(f"SEEDLING_API_KEYS_FILE={path!r} holds no key")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
