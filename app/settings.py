"""ServerSettings: every knob of the HTTP service, from SEEDLING_* variables (pydantic-settings).

    settings = ServerSettings()                                      # environment, ./.env, /run/secrets
    settings = ServerSettings(checkpoint="ckpt/", max_num_seqs=4)    # explicit values win (tests, CLI flags)

Each field is one variable (`max_num_seqs` <- `SEEDLING_MAX_NUM_SEQS`), read from the environment, a
`.env` file in the working directory, then Docker secrets (`/run/secrets/seedling_api_keys`). The
engine's knobs take their names and defaults from `EngineConfig`. A bad value, an unknown SEEDLING_*
name or an unsafe combination raises `SettingsError` naming the variable and the valid values.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

from model.config import QUANTIZATIONS
from model.engine import EngineConfig

ENV_PREFIX = "SEEDLING_"
SECRETS_DIR = Path("/run/secrets")  # Docker/compose secrets; read only when present
# SEEDLING_* variables of other parts of Seedling, read from the environment only (not from .env)
# model/: data home, native kernels (where they are built, which variant runs)
FOREIGN_ENV = frozenset({"SEEDLING_HOME", "SEEDLING_NATIVE_DIR", "SEEDLING_CPU_ISA"})
_ENGINE = EngineConfig()  # the engine's defaults, read (never restated) by the fields below
CommaList = Annotated[tuple[str, ...], NoDecode]  # "a, b," (or lines) in the environment -> ("a", "b")
Source = PydanticBaseSettingsSource


class SettingsError(ValueError):
    """A bad server setting (the message names the environment variable)."""


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", dotenv_filtering="match_prefix",
                                      env_ignore_empty=True, extra="forbid", validate_by_name=True)

    # ---- model and engine
    checkpoint: str | None = Field(None,
        description="checkpoint directory to serve; unset = SmolLM2-135M-Instruct, fetched on first start")
    model_name: str | None = Field(None,
        description="name in /v1/models, accepted as `model`; unset = the checkpoint directory's name")
    adapters_dir: str | None = Field(None, description="adapters (one subdirectory each; classification heads: "
                                     "head.json) served by name; unset = none")
    adapters_poll_s: float = Field(2.0, ge=0, description="seconds between scans of adapters_dir for new, "
                                   "changed or removed LoRA adapters; 0 = at start only")
    device: str = Field("auto", description="auto (cuda when present, else cpu) | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto",
        description="auto: bf16 on cuda, f32 on cpu")
    quantize: Literal[("auto", "none", *QUANTIZATIONS)] = Field(  # type: ignore[valid-type]
        "auto", description="auto: q4 where the native CPU kernels run, else none (bench/quality.py)")
    max_num_seqs: int = Field(_ENGINE.max_num_seqs, ge=1,
        description="sequences decoded together (KV-cache slots)")
    max_model_len: int = Field(_ENGINE.max_model_len, ge=16,
        description="prompt + generated tokens per sequence (one slot's length)")
    max_num_batched_tokens: int = Field(_ENGINE.max_num_batched_tokens, ge=1,
        description="tokens per engine step, prefill chunks + decodes (raised to max_num_seqs)")
    prefill_chunk: int = Field(_ENGINE.prefill_chunk, ge=1,
        description="longest prefill piece per sequence per step (bounds a long prompt's stall)")
    enable_prefix_caching: bool = Field(_ENGINE.enable_prefix_caching, validation_alias="SEEDLING_PREFIX_CACHING",
                                        description="reuse the K/V of a shared prompt prefix (e.g. a long system prompt)")
    cuda_graphs: bool = Field(_ENGINE.cuda_graphs,
        description="replay GPU decode steps as CUDA graphs (opt-in; not yet measured on a GPU)")
    warmup: bool = Field(True, description="run one tiny generation before /ready turns green")
    engine_stall_timeout_s: float = Field(120.0, ge=2, description="a step hanging longer: /health 503, exit 1")
    # ---- requests
    max_tokens_default: int = Field(256, ge=1, description="max new tokens when a request does not say")
    max_tokens_limit: int = Field(1024, ge=1, description="the most new tokens a request may ask for (400 above)")
    max_queued_requests: int = Field(64, ge=0, description="items waiting beyond max_num_seqs before 429")
    max_batch_items: int = Field(64, ge=1, description="items in one list input (texts, prompts)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(300.0, gt=0, description="per-request deadline (504, aborted)")
    default_system_prompt: str | None = Field(None, description="system message added when a chat has none")
    # ---- access
    api_keys: CommaList = Field((), repr=False,
        description="accepted bearer keys (comma list); empty = no authentication")
    api_keys_file: str | None = Field(None, description="file with more keys, one per line (Docker secret)")
    allow_unauthenticated: bool = Field(False,
        description="allow a non-loopback host without any key (refused otherwise)")
    open_paths: CommaList = Field(("/health", "/ready", "/metrics"),
        description="paths that need no key when keys are set")
    cors_origins: CommaList = Field((), description="allowed CORS origins (\"*\" for any); empty = no CORS")
    # ---- process
    host: str = Field("127.0.0.1",
        description="bind address of `python -m app` (0.0.0.0, as in Docker, needs a key)")
    port: int = Field(8000, ge=1, le=65535, description="bind port of `python -m app`")
    drain_timeout_s: float = Field(30.0, ge=0,
        description="on SIGTERM: seconds in-flight requests get to finish (then 503)")
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(str.lower)] = Field(
        "info", description="log level of the server and uvicorn")
    log_prompts: bool = Field(False, description="log prompts and outputs (off: privacy)")
    static_dir: str | None = Field(None, description="playground files served at /; unset = app/static")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_explain(exc)) from None

    @field_validator("api_keys", "open_paths", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        return _split(value) if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if self.max_tokens_default > self.max_tokens_limit:
            raise ValueError(f"SEEDLING_MAX_TOKENS_DEFAULT={self.max_tokens_default} must be <= "
                             f"SEEDLING_MAX_TOKENS_LIMIT={self.max_tokens_limit}")
        if self.max_batch_items > self.admission_limit:
            raise ValueError(
                f"SEEDLING_MAX_BATCH_ITEMS={self.max_batch_items} is larger than the admission limit "
                f"SEEDLING_MAX_NUM_SEQS + SEEDLING_MAX_QUEUED_REQUESTS = {self.admission_limit}: a request "
                "with that many items could never be admitted (429 forever); lower it or raise the others")
        if self.api_keys_file:
            self.api_keys = (*self.api_keys, *_read_keys(self.api_keys_file))
        if not all(self.api_keys):
            raise ValueError("SEEDLING_API_KEYS must not contain empty keys")
        if not self.api_keys and not self.allow_unauthenticated and not _is_loopback(self.host):
            raise ValueError(
                f"SEEDLING_HOST={self.host} is reachable from other machines but no API key is set: give "
                "SEEDLING_API_KEYS or SEEDLING_API_KEYS_FILE, bind 127.0.0.1, or set "
                "SEEDLING_ALLOW_UNAUTHENTICATED=1 to serve without authentication on purpose")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Source, env_settings: Source,
                                   dotenv_settings: Source, file_secret_settings: Source) -> tuple[Source, ...]:
        """The default order (explicit, environment, .env, secrets) after refusing unknown SEEDLING_*
        names: pydantic-settings would silently ignore a mistyped variable."""
        for source, where in ((env_settings, "the environment"), (dotenv_settings, ".env")):
            if isinstance(source, EnvSettingsSource):
                _refuse_unknown(source.env_vars, where)
        secrets = (SecretsSettingsSource(settings_cls, secrets_dir=SECRETS_DIR),) if SECRETS_DIR.is_dir() else ()
        return (init_settings, env_settings, dotenv_settings, *secrets)

    @property
    def admission_limit(self) -> int:
        """Requests (items) in flight at most: running slots plus the waiting queue."""
        return self.max_num_seqs + self.max_queued_requests

    def engine_config(self, max_model_len: int) -> EngineConfig:
        """The engine's config from the fields that share its names; `max_model_len` as the model allows."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)
                  if f.name in type(self).model_fields}
        shared["max_num_batched_tokens"] = max(self.max_num_batched_tokens, self.max_num_seqs)
        return EngineConfig(**{**shared, "max_model_len": max_model_len})

    def resolve_checkpoint(self) -> Path:
        """The checkpoint directory; fetches and converts the default model when none is set."""
        from model.checkpoint import resolve_checkpoint  # heavy import, only when needed

        return resolve_checkpoint(self.checkpoint)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """{SEEDLING_NAME: field name} for every setting."""
        return {f.validation_alias if isinstance(f.validation_alias, str) else ENV_PREFIX + name.upper(): name
                for name, f in cls.model_fields.items()}


# ----------------------------------------------------------------------------
# errors that name the variable

def _refuse_unknown(env_vars: Mapping[str, str | None], where: str) -> None:
    known = ServerSettings.env_names()
    allowed = known.keys() | (FOREIGN_ENV if where == "the environment" else frozenset())
    for name in (key.upper() for key in env_vars):
        if name.startswith(ENV_PREFIX) and name not in allowed:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SettingsError(f"unknown setting {name} in {where}{hint}; known: {', '.join(sorted(known))}")


def _explain(exc: ValidationError) -> str:
    """One part per problem: `SEEDLING_PORT='http': Input should be a valid integer ...`."""
    env = {field: name for name, field in ServerSettings.env_names().items()}
    env.update({name: name for name in env.values()})  # an aliased field reports its alias
    parts = []
    for err in exc.errors():
        message, where = err["msg"].removeprefix("Value error, "), str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {where}; known: {', '.join(sorted(ServerSettings.model_fields))}")
        elif where in env:
            value = "" if where == "api_keys" else f"={err['input']!r}"  # never echo a key
            parts.append(f"{env[where]}{value}: {message}")
        else:  # a cross-field check: its message names the variables
            parts.append(message)
    return "; ".join(parts)


def _split(text: str) -> tuple[str, ...]:
    """Commas or whitespace: `k1, k2` in a variable, one key per line in a file."""
    return tuple(part for part in re.split(r"[,\s]+", text) if part)


def _read_keys(path: str) -> tuple[str, ...]:
    """Keys from a file such as a Docker secret (`#` starts a comment line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"SEEDLING_API_KEYS_FILE={path!r} cannot be read: {exc.strerror}") from None
    keys = _split(" ".join(line for line in lines if not line.lstrip().startswith("#")))
    if not keys:
        raise ValueError(f"SEEDLING_API_KEYS_FILE={path!r} holds no key")
    return keys


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
