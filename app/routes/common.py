"""Helpers shared by the routers: the service dependency, request ids, SSE framing, logprob shapes."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from model.sampling import SamplingParams

from ..errors import ApiError, Unavailable, to_api_error
from ..protocol import ErrorResponse
from ..service import Service

log = logging.getLogger("seedling.routes")

OpenAPIResponses = dict[int | str, dict[str, Any]]  # FastAPI's own type for a route's `responses=`
# OpenAPI `responses=` for every generating route: the statuses our error table can produce
ERROR_RESPONSES: OpenAPIResponses = {
    status: {"model": ErrorResponse, "description": why} for status, why in (
        (400, "invalid parameter, malformed JSON, or prompt too long"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "overloaded: retry after Retry-After seconds"),
        (503, "not ready, draining, or engine failed"),
        (504, "request deadline exceeded"),
    )
}
SSE_RESPONSE: OpenAPIResponses = {
    200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"}}}}},
          "description": "JSON, or an SSE stream when `stream` is true"},
}


async def get_service(request: Request) -> Service:
    """The request's Service, or 503 while the model loads (async: FastAPI runs a sync dependency in a
    worker thread, a thread hop per request for two attribute reads)."""
    state = request.app.state.seedling
    if state.service is None:
        if state.load_error is not None:
            raise Unavailable(f"model failed to load: {state.load_error}", code="load_failed")
        raise Unavailable("model is loading; retry shortly", code="not_ready",
                          headers={"Retry-After": "5"})
    return state.service


async def prompt_items(svc: Service, conversations: list[list[dict[str, str]]], params: SamplingParams,
                     explicit_max_tokens: bool, param: str = "messages") -> list[tuple[list[int], SamplingParams]]:
    """Each conversation -> (prompt ids, params fitted to it): refused by its characters first, then
    rendered and tokenized off the event loop (see app/prompt_guard.py)."""
    for conv in conversations:
        svc.prompts.check((m["content"] for m in conv), param)

    def build() -> list[tuple[list[int], SamplingParams]]:
        items = []
        for conv in conversations:
            ids = svc.chat_prompt(conv)
            items.append((ids, svc.fit(ids, params, explicit_max_tokens, param=param)))
        return items

    return await svc.prompts.run(build)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "req-unknown"


def sse(data: Mapping[str, object] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n"


def error_event(exc: BaseException) -> str:
    err = to_api_error(exc)
    if not isinstance(exc, ApiError):
        log.error("error during stream: %r", exc)
    return sse(err.envelope())


def event_stream(svc: Service, events: Callable[[], AsyncIterator[str]], n_items: int = 1) -> StreamingResponse:
    """Admit now (so 429/503 are real statuses), then stream; errors become an SSE error event,
    the stream always ends with [DONE], and the admission is released however it ends."""
    reservation = svc.client.reserve(n_items)

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in events():
                yield chunk
        except Exception as exc:  # noqa: BLE001 - every error becomes an event; the status is sent
            yield error_event(exc)
        finally:
            reservation.release()
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def token_text(svc: Service, token_id: int) -> tuple[str, list[int]]:
    """(printable text, raw UTF-8 bytes) of one token, for logprobs."""
    if not 0 <= token_id < svc.tokenizer.vocab_size:  # model vocab can be padded past the tokenizer's
        return "", []
    raw = svc.tokenizer.token_bytes(token_id)
    if not raw:
        return svc.tokenizer.decode([token_id], skip_special=False), []
    return raw.decode("utf-8", errors="replace"), list(raw)
