"""Utility routes: /tokenize, /detokenize, /health (liveness), /ready (readiness), /metrics.

/health, /ready and /metrics are open (no API key) so probes and scrapers work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import STATUS, InvalidRequest, error_envelope
from ..protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from ..service import Service
from .common import ERROR_RESPONSES, OpenAPIResponses, get_service

if TYPE_CHECKING:
    from ..main import AppState

router = APIRouter(tags=["utility"])
PROBE_RESPONSES: OpenAPIResponses = {503: {"model": ErrorResponse, "description": "not healthy"}}


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, svc: Service = Depends(get_service)) -> TokenizeResponse:
    if (body.text is None) == (body.messages is None):
        raise InvalidRequest("give exactly one of text or messages", param="text")
    if body.text is not None:  # off the event loop: up to the body limit of text to count
        add_bos = body.add_special_tokens and svc.tokenizer.bos_id is not None
        ids = await svc.prompts.run(svc.tokenizer.encode, body.text, add_bos)
    else:
        ids = await svc.prompts.run(svc.chat_prompt, [m.model_dump() for m in body.messages or []])
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=svc.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, svc: Service = Depends(get_service)) -> DetokenizeResponse:
    vocab = svc.tokenizer.vocab_size
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise InvalidRequest(f"token ids must be in [0, {vocab}), got {bad[0]}", param="tokens")
    return DetokenizeResponse(text=svc.tokenizer.decode(body.tokens, skip_special=body.skip_special_tokens))


def _unhealthy(message: str, code: str) -> JSONResponse:
    status, type_ = STATUS["unavailable"]
    return JSONResponse(error_envelope(message, type_, code=code), status_code=status)


@router.get("/health", response_model=HealthResponse, responses=PROBE_RESPONSES)
async def health(request: Request) -> HealthResponse | JSONResponse:
    """Liveness: red (503) when the model could not load, the engine thread failed, or it stopped
    beating (a step hangs past SEEDLING_ENGINE_STALL_TIMEOUT_S)."""
    state: AppState = request.app.state.seedling
    if state.load_error is not None:
        return _unhealthy(f"model failed to load: {state.load_error}", "load_failed")
    problem = state.engine_problem()
    if problem is not None:
        code, message = problem
        return _unhealthy(message, code)
    return HealthResponse(status="ok", detail="loading" if state.service is None else None)


@router.get("/ready", response_model=HealthResponse, responses=PROBE_RESPONSES)
async def ready(request: Request) -> HealthResponse | JSONResponse:
    """Readiness: 503 until the model is loaded and warm, while draining, and after a failure or
    while the engine is stalled (a load balancer then sends nothing more here)."""
    state: AppState = request.app.state.seedling
    if state.load_error is not None:
        return _unhealthy(f"model failed to load: {state.load_error}", "load_failed")
    if state.service is None or not state.warm:
        return _unhealthy("model is loading", "not_ready")
    problem = state.engine_problem()
    if problem is not None:
        return _unhealthy(problem[1], problem[0])
    if state.client.draining:
        return _unhealthy("server is draining", "draining")
    return HealthResponse(status="ready", serving_path=state.service.serving_path)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    registry = request.app.state.seedling.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
