"""The error kinds of the HTTP service and the ONE table that maps them to HTTP status.

Every error leaves the server in the OpenAI envelope
    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}
whether it is raised by a handler (`ApiError` subclasses), by the engine (`EngineError`,
`SamplingError`, `TaskError` are translated in `to_api_error`), by request validation (FastAPI's
422 is overridden to 400 naming the field), or by Starlette (404/405 routes).
"""

from __future__ import annotations

from typing import TypedDict


class ErrorBody(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(TypedDict):
    """What every error response (and SSE error event) carries."""

    error: ErrorBody


class ApiError(Exception):
    """An error with an envelope; `kind` picks the HTTP status from STATUS."""

    kind = "invalid_request"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return STATUS[self.kind][0]

    def envelope(self) -> ErrorEnvelope:
        return error_envelope(self.message, STATUS[self.kind][1], self.param, self.code)


class InvalidRequest(ApiError):
    """400: a parameter the request got wrong (`param` names it)."""

    kind = "invalid_request"


class PromptTooLongError(InvalidRequest):
    """400 context_length_exceeded: the prompt (plus max_tokens) does not fit the model."""


class Unauthorized(ApiError):
    """401: no API key, or a wrong one."""

    kind = "unauthorized"


class NotFound(ApiError):
    """404: no such route or model."""

    kind = "not_found"


class BodyTooLarge(ApiError):
    """413: the body is over SEEDLING_MAX_BODY_BYTES."""

    kind = "body_too_large"


class Overloaded(ApiError):
    """429: admission is full; retry after Retry-After seconds."""

    kind = "overloaded"


class Unavailable(ApiError):
    """503: loading, draining, or the engine failed."""

    kind = "unavailable"


class EngineDead(Unavailable):
    """The engine thread failed; open and new requests error out (503, /health red)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_failed")


class RequestAborted(Unavailable):
    """The engine client stopped (shutdown) while this request was running."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="shutting_down")


class DeadlineExceeded(ApiError):
    """504: the request ran past SEEDLING_REQUEST_TIMEOUT_S and was aborted."""

    kind = "timeout"


class InternalError(ApiError):
    """500: a bug; the message says nothing more (the log has the traceback)."""

    kind = "internal"


# kind -> (HTTP status, OpenAI `type`)
STATUS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "unauthorized": (401, "authentication_error"),
    "not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "body_too_large": (413, "invalid_request_error"),
    "overloaded": (429, "overloaded_error"),
    "unavailable": (503, "service_unavailable_error"),
    "timeout": (504, "timeout_error"),
    "internal": (500, "internal_error"),
}
# status -> kind for errors raised by Starlette itself (unknown routes, wrong methods)
KIND_BY_STATUS = {status: kind for kind, (status, _) in STATUS.items()}


def error_envelope(message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> ErrorEnvelope:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def to_api_error(exc: BaseException) -> ApiError:
    """Translate errors from `model` (engine, sampling, tasks) into ApiError; others are internal."""
    if isinstance(exc, ApiError):
        return exc
    from model.sampling import SamplingError
    from model.tasks import TaskError

    if isinstance(exc, SamplingError | TaskError):
        return InvalidRequest(str(exc), param=exc.param, code="invalid_value")
    try:
        from model.engine import PromptTooLong, RequestRejected, UnknownAdapter
    except ImportError:  # engine not importable: nothing more to translate
        return InternalError("internal error", code="internal_error")
    if isinstance(exc, UnknownAdapter):  # unloaded between the route's check and the engine's
        return NotFound(f"model {exc.name!r} does not exist (see GET /v1/models)", param="model",
                        code="model_not_found")
    if isinstance(exc, PromptTooLong):
        return prompt_too_long(exc.prompt_tokens, exc.max_model_len)
    if isinstance(exc, RequestRejected):
        return InvalidRequest(str(exc), code="request_rejected")
    return InternalError("internal error", code="internal_error")


def prompt_too_long(prompt_tokens: int, max_model_len: int, max_tokens: int | None = None,
                    param: str = "messages") -> ApiError:
    extra = f" plus max_tokens {max_tokens}" if max_tokens is not None else ""
    return PromptTooLongError(
        f"prompt is {prompt_tokens} tokens{extra}, but this model's maximum context length is "
        f"{max_model_len} tokens; shorten the prompt (it is never truncated silently)",
        param=param, code="context_length_exceeded")
