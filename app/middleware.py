"""Pure-ASGI middleware: request id, access log, API-key auth, body-size limit.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and client disconnects pass through
untouched. Order per request: request id -> API key (401, from the headers alone: an unauthenticated
body is never read) -> body limit (413) -> the app.
Auth is deny-by-default: with keys set, every path needs one except SEEDLING_OPEN_PATHS and the
playground's own files, matched on the route path (the root path stripped, so `uvicorn --root-path`
and prefix-stripping proxies change nothing). /docs and /openapi.json need a key too.
Prompts and outputs never reach these logs; only method, path, status, time and the request id.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import STATUS, error_envelope
from .settings import ServerSettings

log = logging.getLogger("seedling.access")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def install_log_filter(level: str) -> None:
    """Every `seedling.*` record carries `request_id`; the level follows the settings."""
    logger = logging.getLogger("seedling")
    logger.setLevel(level.upper())
    if not any(isinstance(f, _RequestIdFilter) for f in logger.filters):
        logger.addFilter(_RequestIdFilter())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
        handler.addFilter(_RequestIdFilter())
        logger.addHandler(handler)
        logger.propagate = False


def route_path(scope: Scope) -> str:
    """The path the router matches: `path` without `root_path` (ASGI servers include it in `path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


async def _send_error(send: Send, status: int, message: str, type_: str, extra: list[tuple[bytes, bytes]],
                      code: str | None = None) -> None:
    body = json.dumps(error_envelope(message, type_, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: ServerSettings, public_files: frozenset[str] = frozenset()) -> None:
        """`public_files`: route paths of the playground's static files (a page that asks for the key)."""
        self.app = app
        self.settings = settings
        self.keys = [k.encode() for k in settings.api_keys]
        self.open_paths = frozenset(settings.open_paths)
        self.public_files = public_files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        rid = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        id_header = (b"x-request-id", rid.encode())
        t0 = time.perf_counter()
        status_holder = {"status": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], id_header]
                status_holder["status"] = message["status"]
            await send(message)

        try:
            if not self._authorized(scope, headers):
                await _send_error(send_with_id, 401, "missing or invalid API key (Authorization: Bearer <key>)",
                                  STATUS["unauthorized"][1], [(b"www-authenticate", b"Bearer")], "invalid_api_key")
                return
            receive = await self._limit_body(scope, headers, receive, send_with_id)
            if receive is None:
                return
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %s %.1fms", scope["method"], scope["path"], status_holder["status"],
                     (time.perf_counter() - t0) * 1000)
            request_id_var.reset(token)

    def _authorized(self, scope: Scope, headers: dict[str, str]) -> bool:
        if not self.keys or scope["method"] == "OPTIONS":  # CORS preflights carry no credentials
            return True
        path = route_path(scope)
        if path in self.open_paths or (scope["method"] in ("GET", "HEAD") and path in self.public_files):
            return True
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        given_b = given.encode()
        ok = False
        for key in self.keys:  # compare against every key: time does not depend on which matched
            ok |= hmac.compare_digest(given_b, key)
        return ok

    async def _limit_body(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send
                          ) -> Receive | None:
        """Buffer the body up to max_body_bytes (413 beyond), then replay it to the app."""
        limit = self.settings.max_body_bytes
        too_large = (413, f"request body is larger than {limit} bytes", STATUS["body_too_large"][1], [],
                     "body_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, *too_large)
            return None
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _send_error(send, *too_large)
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay
