"""create_app(settings): the FastAPI app — lifespan (load checkpoint, start/stop the engine thread),
middleware (request id, body limit, API keys, CORS), the error table, routers, the playground.

    uvicorn --factory app.main:app_from_env      # or: python -m app / seedling
    app = create_app(ServerSettings(checkpoint="ckpt/"))   # tests

The model loads in the background after startup: /health answers at once, /ready turns green when
the model and the LoRA adapters in SEEDLING_ADAPTERS_DIR are loaded and warm; a background watcher
(model/adapter_watch.py) then serves adapters added, changed or removed there, without a restart. `loader` can replace checkpoint loading (tests inject broken engines).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import JsonValue
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from model.engine import LLMEngine
from model.tokenizer import Tokenizer

from .engine_client import EngineClient
from .errors import KIND_BY_STATUS, STATUS, ApiError, InternalError, Unavailable, error_envelope
from .heads import HeadRegistry, HeadService
from .metrics import Metrics
from .middleware import RequestContextMiddleware, install_log_filter
from .routes import openai, tasks, utility
from .service import ClientGone, Service
from .settings import ServerSettings

if TYPE_CHECKING:
    from model.adapter_watch import AdapterWatcher
    from model.inference import InferenceModel

log = logging.getLogger("seedling.app")
STATIC_DIR = Path(__file__).parent / "static"
DRAIN_GRACE_S = 5.0  # after the drain timeout: time for the error events and [DONE] to reach clients


@dataclass
class Loaded:
    """What loading produces: an engine (not yet running) and what the routes need besides it."""

    engine: LLMEngine
    tokenizer: Tokenizer
    meta: dict[str, JsonValue]  # the checkpoint's seedling.json
    model_name: str
    max_model_len: int
    serving_path: str = "unknown"  # which forward serves (model.inference.Capabilities.path)
    checkpoint_dir: Path | None = None  # where the weights came from (heads are checked against them)
    adapter_builder: Callable[[Path], InferenceModel] | None = None  # adapter dir -> a model the engine can serve


@dataclass
class AppState:
    settings: ServerSettings
    metrics: Metrics | None = None
    client: EngineClient | None = None
    service: Service | None = None
    load_error: str | None = None
    warm: bool = False
    watcher: AdapterWatcher | None = None  # while SEEDLING_ADAPTERS_DIR is set
    drain_timer: asyncio.TimerHandle | None = None

    def engine_problem(self) -> tuple[str, str] | None:
        """(code, message) when the engine thread died or stopped beating (hung), else None.
        /health reports it and `python -m app` exits non-zero on it, so a supervisor restarts us."""
        client = self.client
        if client is None:
            return None
        if client.failure is not None:
            return "engine_failed", f"engine failed: {client.failure!r}"
        stalled, limit = client.stalled_s(), self.settings.engine_stall_timeout_s
        if stalled > limit:
            return "engine_stalled", f"engine stalled: no heartbeat for {stalled:.0f}s (limit {limit:g}s)"
        return None

    def begin_drain(self) -> None:
        """Stop admitting now; once drain_timeout_s has passed, end what still runs with an error
        (an SSE error event then [DONE], or a 503) before the server would cut it. On the event loop."""
        if self.client is None or self.drain_timer is not None:
            return
        self.client.begin_drain()
        self.drain_timer = asyncio.get_running_loop().call_later(self.settings.drain_timeout_s, self._drain_timeout)

    def _drain_timeout(self) -> None:
        client = self.client
        if client is not None and client.in_flight:
            log.warning("drain timeout (%gs): ending %d in-flight requests with an error",
                        self.settings.drain_timeout_s, client.in_flight)
            client.fail_all(Unavailable("server shut down: the drain timeout passed", code="drain_timeout"))


def load_model(settings: ServerSettings) -> Loaded:
    """Checkpoint -> LLMEngine on the right device and dtype (runs in a worker thread)."""

    from model.checkpoint import resolve_checkpoint
    from model.device import resolve_device, resolve_dtype
    from model.engine import LLMEngine
    from model.inference import adapt_for_serving, load_for_serving

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    path = resolve_checkpoint(settings.checkpoint)
    served = load_for_serving(path, device=device, dtype=dtype, quantize=settings.quantize)
    max_model_len = min(settings.max_model_len, served.model.config.max_seq_len)
    if max_model_len < settings.max_model_len:
        log.warning("max_model_len %d lowered to the model's max_seq_len %d", settings.max_model_len,
                    max_model_len)
    config = settings.engine_config(max_model_len)
    engine = LLMEngine(served.model, served.tokenizer, config)
    name = settings.model_name or str(served.meta.get("name") or Path(path).resolve().name)
    log.info("loaded %s from %s on %s (%s), max_model_len %d", name, path, device,
             served.model.capabilities.path, max_model_len)
    return Loaded(engine, served.tokenizer, served.meta, name, max_model_len, served.model.capabilities.path,
                  checkpoint_dir=Path(path), adapter_builder=functools.partial(adapt_for_serving, served))


async def _start(app: FastAPI, state: AppState, loader: Callable[[ServerSettings], Loaded]) -> None:
    """Background startup: load, start the engine thread, warm up, then mark ready."""
    settings = state.settings
    try:
        loaded = await asyncio.to_thread(loader, settings)
        client = EngineClient(loaded.engine, admission_limit=settings.admission_limit).start()
        state.client = client
        effective = settings.model_copy(update={"max_model_len": loaded.max_model_len})
        heads = await asyncio.to_thread(_heads, settings, loaded, client)
        state.service = Service(effective, loaded.tokenizer, client, loaded.model_name, loaded.meta,
                                state.metrics, loaded.serving_path, heads=heads)
        if settings.adapters_dir and loaded.adapter_builder is not None:
            state.watcher = await _watch_adapters(settings, loaded, client)
        if settings.warmup:
            await _warmup(state.service)
        state.warm = True
        log.info("ready")
    except Exception as exc:  # noqa: BLE001 - reported by /health and /ready
        log.exception("startup failed")
        state.load_error = f"{type(exc).__name__}: {exc}"


def _heads(settings: ServerSettings, loaded: Loaded, client: EngineClient) -> HeadService | None:
    """Classification heads from SEEDLING_ADAPTERS_DIR, checked against the served weights (worker thread:
    hashing the weights takes a second)."""
    if not settings.adapters_dir or loaded.checkpoint_dir is None:
        return None
    from model.head import base_identity

    registry = HeadRegistry(settings.adapters_dir, base_identity(loaded.checkpoint_dir))
    registry.refresh()
    log.info("adapters dir %s: heads %s%s", settings.adapters_dir, sorted(registry.heads) or "none",
             f", refused {sorted(registry.errors)}" if registry.errors else "")
    return HeadService(registry, client, loaded.checkpoint_dir, loaded.tokenizer.pad_id)


async def _watch_adapters(settings: ServerSettings, loaded: Loaded, client: EngineClient) -> AdapterWatcher:
    """Serve every LoRA adapter in adapters_dir now (broken ones logged and skipped), then keep polling it
    on a background thread that builds new ones and hands them to the engine thread between steps."""
    from model.adapter_watch import AdapterWatcher

    engine = loaded.engine
    watcher = AdapterWatcher(
        settings.adapters_dir, loaded.adapter_builder,
        publish=lambda name, model: client.submit(engine.add_adapter, name, model).result(),
        retire=lambda name: client.submit(engine.remove_adapter, name).result(),
        interval_s=settings.adapters_poll_s, reserved=frozenset({loaded.model_name}))
    served = await asyncio.to_thread(watcher.scan)
    log.info("adapters from %s: %s", settings.adapters_dir, ", ".join(served) or "none")
    return watcher.start() if settings.adapters_poll_s > 0 else watcher


async def _warmup(svc: Service) -> None:
    from model.sampling import SamplingParams

    ids = svc.tokenizer.encode("Hello") or [0]
    deadline = asyncio.get_running_loop().time() + 120
    with svc.client.reserve(1):
        async for _ in svc.client.generate("warmup", ids, SamplingParams(max_tokens=2, temperature=0), deadline):
            pass


def create_app(settings: ServerSettings | None = None,
               loader: Callable[[ServerSettings], Loaded] = load_model) -> FastAPI:
    settings = settings or ServerSettings()
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
            if state.watcher is not None:
                await asyncio.to_thread(state.watcher.stop)
            if state.client is not None:
                state.begin_drain()
                if state.engine_problem() is None:  # a dead or hung engine finishes nothing
                    await state.client.wait_idle(settings.drain_timeout_s + DRAIN_GRACE_S)
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
    static = Path(settings.static_dir) if settings.static_dir else STATIC_DIR
    app.add_middleware(RequestContextMiddleware, settings=settings, public_files=_playground_paths(static))
    if static.is_dir():
        app.mount("/", _StaticOr404(directory=static, html=True), name="static")
    return app


def _playground_paths(static: Path) -> frozenset[str]:
    """Route paths of the playground's files: served without a key (the page asks for one and sends it)."""
    if not static.is_dir():
        return frozenset()
    files = {"/" + p.relative_to(static).as_posix() for p in static.rglob("*") if p.is_file()}
    return frozenset(files | ({"/"} if "/index.html" in files else set()))


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory app.main:app_from_env`."""
    return create_app(ServerSettings())


class _StaticOr404(StaticFiles):
    """The playground at /: anything it does not have (and any non-GET) is our 404 envelope."""

    async def get_response(self, path: str, scope: Scope) -> Response:
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
        return JSONResponse(error_envelope("client disconnected", "client_closed"), status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(InternalError("internal server error", code="internal_error"))


