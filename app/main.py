"""create_app(settings): the FastAPI app — lifespan (load checkpoint, start/stop the engine thread),
middleware (request id, body limit, API keys, CORS), the error table, routers, the playground.

    uvicorn --factory app.main:app_from_env      # or: python -m app / seedling
    app = create_app(ServerSettings(checkpoint="ckpt/"))   # tests

The model loads in the background after startup: /health answers at once, /ready turns green when
the model is loaded and warm. `loader` can replace checkpoint loading (tests inject broken engines).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from .engine_client import EngineClient
from .errors import KIND_BY_STATUS, STATUS, ApiError, InternalError, error_envelope
from .metrics import Metrics
from .middleware import RequestContextMiddleware, install_log_filter
from .routes import openai, tasks, utility
from .service import ClientGone, Service
from .settings import ServerSettings

log = logging.getLogger("seedling.app")
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class Loaded:
    """What loading produces: an engine (not yet running) and what the routes need besides it."""

    engine: Any
    tokenizer: Any
    meta: dict[str, Any]
    model_name: str
    max_model_len: int


@dataclass
class AppState:
    settings: ServerSettings
    metrics: Metrics | None = None
    client: EngineClient | None = None
    service: Service | None = None
    load_error: str | None = None
    warm: bool = False


def load_model(settings: ServerSettings) -> Loaded:
    """Checkpoint -> LLMEngine on the right device and dtype (runs in a worker thread)."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.engine import EngineConfig, LLMEngine
    from model.quantize import optimize_for_inference

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = settings.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
    path = settings.resolve_checkpoint()
    ckpt = load_checkpoint(path, device=device, dtype=getattr(torch, dtype_name))
    max_model_len = min(settings.max_model_len, ckpt.config.max_seq_len)
    if max_model_len < settings.max_model_len:
        log.warning("max_model_len %d lowered to the model's max_seq_len %d", settings.max_model_len,
                    max_model_len)
    config = EngineConfig(max_num_seqs=settings.max_num_seqs, max_model_len=max_model_len,
                          max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_num_seqs),
                          prefill_chunk=settings.prefill_chunk, enable_prefix_caching=settings.prefix_caching,
                          cuda_graphs=settings.cuda_graphs)
    model = optimize_for_inference(ckpt.model, quantize=settings.quantize, tokenizer=ckpt.tokenizer)
    engine = LLMEngine(model, ckpt.tokenizer, config)
    name = settings.model_name or str(ckpt.meta.get("name") or Path(path).resolve().name)
    quantized = "" if settings.quantize == "none" else f", {settings.quantize}"
    log.info("loaded %s from %s on %s (%s%s), max_model_len %d", name, path, device, dtype_name, quantized,
             max_model_len)
    return Loaded(engine, ckpt.tokenizer, ckpt.meta, name, max_model_len)


async def _start(app: FastAPI, state: AppState, loader: Callable[[ServerSettings], Loaded]) -> None:
    """Background startup: load, start the engine thread, warm up, then mark ready."""
    settings = state.settings
    try:
        loaded = await asyncio.to_thread(loader, settings)
        client = EngineClient(loaded.engine, admission_limit=settings.admission_limit).start()
        state.client = client
        effective = settings if loaded.max_model_len == settings.max_model_len else _with_len(
            settings, loaded.max_model_len)
        state.service = Service(effective, loaded.tokenizer, client, loaded.model_name, loaded.meta,
                                state.metrics)
        if settings.warmup:
            await _warmup(state.service)
        state.warm = True
        log.info("ready")
    except Exception as exc:  # noqa: BLE001 - reported by /health and /ready
        log.exception("startup failed")
        state.load_error = f"{type(exc).__name__}: {exc}"


def _with_len(settings: ServerSettings, max_model_len: int) -> ServerSettings:
    import dataclasses

    return dataclasses.replace(settings, max_model_len=max_model_len)


async def _warmup(svc: Service) -> None:
    from model.sampling import SamplingParams

    ids = svc.tokenizer.encode("Hello") or [0]
    deadline = asyncio.get_running_loop().time() + 120
    with svc.client.reserve(1):
        async for _ in svc.client.generate("warmup", ids, SamplingParams(max_tokens=2, temperature=0), deadline):
            pass


def create_app(settings: ServerSettings | None = None,
               loader: Callable[[ServerSettings], Loaded] = load_model) -> FastAPI:
    settings = settings or ServerSettings.from_env()
    state = AppState(settings)
    state.metrics = Metrics(state)
    install_log_filter(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start(app, state, loader))
        try:
            yield
        finally:
            starting.cancel()
            if state.client is not None:
                state.client.begin_drain()
                if not await state.client.wait_idle(settings.drain_timeout_s):
                    log.warning("drain timeout: aborting %d requests", state.client.in_flight)
                await asyncio.to_thread(state.client.stop)

    app = FastAPI(title="Seedling", version="0.1.0", lifespan=lifespan,
                  description="Small Llama-family LMs over HTTP: task endpoints and an OpenAI-compatible API.")
    app.state.seedling = state
    _install_error_handlers(app)
    app.include_router(tasks.router)
    app.include_router(openai.router)
    app.include_router(utility.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestContextMiddleware, settings=settings)
    static = Path(settings.static_dir) if settings.static_dir else STATIC_DIR
    if static.is_dir():
        app.mount("/", _StaticOr404(directory=static, html=True), name="static")
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory app.main:app_from_env`."""
    return create_app(ServerSettings.from_env())


class _StaticOr404(StaticFiles):
    """The playground at /: anything it does not have (and any non-GET) is our 404 envelope."""

    async def get_response(self, path: str, scope: Any) -> Any:
        if scope["method"] not in ("GET", "HEAD"):
            raise StarletteHTTPException(status_code=404)
        return await super().get_response(path, scope)


# ----------------------------------------------------------------------------
# the error table, applied

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def _is_field(part: object) -> bool:
    """Keep field names and list indexes in an error location; drop pydantic's union-member tags
    such as 'list[Message]' or 'str'."""
    if isinstance(part, int):
        return True
    text = str(part)
    return text.isidentifier() and text.lower() not in _TYPE_TAGS

def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and _is_field(p)]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}"
            param = None
        else:
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more errors)"
        kind = "invalid_request"
        return JSONResponse(error_envelope(message, STATUS[kind][1], param, "invalid_value"),
                            status_code=STATUS[kind][0])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = KIND_BY_STATUS.get(exc.status_code, "invalid_request")
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(
                       exc.status_code, str(exc.detail))
        status = exc.status_code if exc.status_code in KIND_BY_STATUS else 400
        return JSONResponse(error_envelope(message, STATUS[kind][1], None, None), status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed",
                                       "param": None, "code": None}}, status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(InternalError("internal server error", code="internal_error"))


