"""EngineClient: one background thread owns the LLMEngine and the device; asyncio talks to it.

Owns: the engine thread, the command queue into it, one `RequestStream` per request out of it,
admission (how many items may be in flight), drain and failure state.
Must not: run a forward pass on the event loop, know about HTTP, or hold scheduling policy
(the engine schedules; this only feeds it and fans its outputs out).

    client = EngineClient(engine, admission_limit=80).start()
    with client.reserve(1):                                   # 429 Overloaded / 503 Unavailable
        async for out in client.generate("req-1", prompt_ids, params):  # "req-1": a label for logs
            ...                                               # RequestOutput deltas
    scores = await client.score(prompt_ids, [cont_a, cont_b]) # runs on the engine thread too
    per_text = await client.score_each([(prompt_ids, conts), ...])  # cancellable between texts

Threading: the event loop only enqueues commands (add / abort / score / stop) and awaits its
stream; the engine thread drains commands between steps, calls `engine.step()`, and hands each
step's outputs to the right event loop with ONE `call_soon_threadsafe` per loop per step.
If `step()` raises, every open stream gets the error, `failure` is set (/health turns red) and
the thread stops; nothing is retried. The thread beats `heartbeat` (time.monotonic()) at least every
HEARTBEAT_S, busy or idle, so a hung step shows as a stale heartbeat (`stalled_s`).

Engine request keys are made here (a counter), never taken from the caller: a client-chosen
X-Request-Id may collide with another request's, and a key collision would reject one request
and let an abort of it end the other's stream.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from model.engine import EngineStats, LLMEngine, RequestOutput
from model.sampling import SamplingParams

from .errors import DeadlineExceeded, EngineDead, Overloaded, RequestAborted, Unavailable, to_api_error

log = logging.getLogger("seedling.engine_client")


# ----------------------------------------------------------------------------
# per-request stream (filled from the engine thread, read on the request's event loop)

@dataclass
class RequestStream:
    request_id: str  # the engine's key: unique, made by EngineClient
    label: str  # the caller's name for it (logs only)
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    t_created: float = field(default_factory=time.perf_counter)
    t_added: float | None = None  # when the engine thread handed it to engine.add_request
    done: bool = False


@dataclass
class Reservation:
    """Admission for `n` items; release exactly once (context manager or `.release()`)."""

    client: EngineClient
    n: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.client._release(self.n)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class OutputObserver(Protocol):
    """Sees every output of a request (app.metrics.RequestTimer), with when the engine took it."""

    def on_output(self, out: RequestOutput, t_added: float | None = None) -> None: ...


# ----------------------------------------------------------------------------
# commands into the engine thread

T = TypeVar("T")


@dataclass(frozen=True)
class _Add:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _FailAll:
    error: BaseException


@dataclass(frozen=True)
class _Call(Generic[T]):
    future: concurrent.futures.Future[T]
    fn: Callable[..., T]
    args: tuple[object, ...]


@dataclass
class PiecewiseCall(Generic[T]):
    """Engine work run one forward at a time between engine steps (`LLMEngine.score_steps`). The future
    stays pending until the work ends, so a caller's cancel (deadline, disconnect) still lands and the
    work stops before its next piece."""
    future: concurrent.futures.Future[T]
    start: Callable[[], Generator[None, None, T]]
    steps: Generator[None, None, T] | None = None

    def advance(self) -> bool:
        """Run one piece on the engine thread; True once the call is over (done, failed or cancelled)."""
        if self.future.cancelled():
            if self.steps is not None:
                self.steps.close()
            return True
        try:
            if self.steps is None:
                self.steps = self.start()
            next(self.steps)
        except StopIteration as done:
            if self.future.set_running_or_notify_cancel():
                self.future.set_result(done.value)
            return True
        except Exception as exc:
            self.fail(_api_error(exc))
            return True
        return False

    def fail(self, error: BaseException) -> None:
        if self.steps is not None:
            self.steps.close()
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)


@dataclass(frozen=True)
class _Stop:
    pass


# a call's result type is its caller's business (the engine thread only passes it on)
_Command = _Add | _Abort | _FailAll | _Call[Any] | PiecewiseCall[Any] | _Stop
HEARTBEAT_S = 1.0  # the idle engine thread wakes this often just to beat


class EngineClient:
    def __init__(self, engine: LLMEngine, admission_limit: int, retry_after_s: int = 1) -> None:
        self.engine = engine
        self.admission_limit = admission_limit
        self.retry_after_s = retry_after_s
        self.failure: BaseException | None = None
        self.draining = False
        self.stats: EngineStats | None = None  # last snapshot (written by the engine thread)
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._lock = threading.Lock()
        self._in_flight = 0
        self._keys = itertools.count()
        self._calls: collections.deque[_Call[Any] | PiecewiseCall[Any]] = collections.deque()  # engine thread only
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()  # written by the engine thread once per loop

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EngineClient:
        self._thread = threading.Thread(target=self._run, name="seedling-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread, join it."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stalled_s(self) -> float:
        """Seconds since the engine thread last beat: about 0 while it steps or idles, growing while
        one step (or engine call) hangs."""
        return time.monotonic() - self.heartbeat

    def begin_drain(self) -> None:
        """Stop admitting; in-flight requests continue."""
        self.draining = True

    def fail_all(self, error: BaseException) -> None:
        """End every open request with `error` (the drain timeout passed); the engine keeps running."""
        self._commands.put(_FailAll(error))

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while self._in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # ------------------------------------------------------------------ admission
    def reserve(self, n: int = 1) -> Reservation:
        """Admit n items or raise: Unavailable (failed / draining / stopped), Overloaded (full)."""
        if self.failure is not None:
            raise Unavailable(f"engine failed: {self.failure!r}", code="engine_failed")
        if self.draining:
            raise Unavailable("server is draining (shutting down); retry on another replica",
                              code="draining")
        if self._thread is None:
            raise Unavailable("engine is not running", code="not_ready")
        with self._lock:
            if self._in_flight + n > self.admission_limit:
                raise Overloaded(
                    f"server is at capacity ({self._in_flight} requests in flight, limit "
                    f"{self.admission_limit}); retry after {self.retry_after_s}s",
                    code="overloaded", headers={"Retry-After": str(self.retry_after_s)})
            self._in_flight += n
        return Reservation(self, n)

    def _release(self, n: int) -> None:
        with self._lock:
            self._in_flight -= n
            assert self._in_flight >= 0, "released more than reserved"

    # ------------------------------------------------------------------ requests
    async def generate(self, label: str, prompt_ids: Sequence[int], params: SamplingParams,
                       deadline: float | None = None, timer: OutputObserver | None = None,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs until one is finished, from the base model or the LoRA `adapter`. Leaving
        early (disconnect, cancellation, or `deadline` (loop.time()) passing -> DeadlineExceeded) aborts
        the request in the engine and frees its cache slot. `label` names it in logs only (the engine key is made here).
        `timer.on_output(out, t_added)` sees every output (metrics)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        stream = RequestStream(f"seq-{next(self._keys)}", label, loop)
        self._commands.put(_Add(stream, list(prompt_ids), params, adapter))
        alarm = None
        if deadline is not None:
            alarm = loop.call_at(deadline, stream.queue.put_nowait, DeadlineExceeded(
                "request deadline exceeded; the request was aborted", code="timeout"))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.done = True
                    raise item
                if item.finished:
                    stream.done = True
                if timer is not None:
                    timer.on_output(item, stream.t_added)
                yield item
                if stream.done:
                    return
        finally:
            if alarm is not None:
                alarm.cancel()
            if not stream.done:
                self._commands.put(_Abort(stream.request_id))

    async def score(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]],
                    adapter: str | None = None) -> list[float]:
        """engine.score on the engine thread, one forward at a time between engine steps: sum
        log p(continuation | prompt) per continuation."""
        return await self.run_in_pieces(functools.partial(
            self.engine.score_steps, list(prompt_ids), [list(c) for c in continuations], adapter))

    async def score_each(self, jobs: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                         adapter: str | None = None) -> list[list[float]]:
        """`score` for each (prompt, continuations) job, one engine call per job: cancelling the
        caller (deadline, disconnect) stops it before the next job, and decodes run between jobs
        instead of waiting behind one call that scores every job."""
        return [await self.score(prompt, conts, adapter) for prompt, conts in jobs]

    async def score_after(self, prompts: Sequence[Sequence[int]], continuation: Sequence[int],
                          adapter: str | None = None) -> list[float]:
        """engine.score_after on the engine thread, one forward at a time between engine steps: sum
        log p(continuation | prompt) per prompt (/classify's channel direction)."""
        return await self.run_in_pieces(functools.partial(
            self.engine.score_after_steps, [list(p) for p in prompts], list(continuation), adapter))

    async def run_in_pieces(self, start: Callable[[], Generator[None, None, T]]) -> T:
        """Run the generator `start()` returns on the engine thread, one piece between two engine steps
        (PiecewiseCall); cancelling the caller stops it before its next piece."""
        self._check_alive()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put(PiecewiseCall(future, start))
        return await asyncio.wrap_future(future)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) on the engine thread between steps (it may touch the device)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def submit(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        """Queue fn(*args) for the engine thread from any thread (the adapter watcher hands its models
        over this way); the future holds the result, or the error (EngineDead once the thread is gone)."""
        self._check_alive()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put(_Call(future, fn, args))
        return future

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise EngineDead(f"engine failed: {self.failure!r}")
        if self._thread is None:
            raise EngineDead("engine is not running")

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._snapshot()
            while True:
                self.heartbeat = time.monotonic()
                busy = self.engine.has_unfinished()
                # 1. commands: wait (one heartbeat at most) while idle, otherwise take whatever is queued;
                #    engine calls (scoring) are set aside in self._calls
                while True:
                    wait = not busy and not self._calls
                    try:
                        command = self._commands.get(block=wait, timeout=HEARTBEAT_S if wait else None)
                    except queue.Empty:
                        break
                    if isinstance(command, _Stop):
                        self._shutdown(RequestAborted("server shutting down"))
                        return
                    if isinstance(command, _Call | PiecewiseCall):
                        self._calls.append(command)
                        continue
                    self._handle(command)
                    busy = self.engine.has_unfinished()
                # 2. at most one engine call, or one piece of a piecewise call, between two steps: clients
                #    that keep work queued (/classify texts) would otherwise never let the decodes run;
                #    an unfinished piecewise call goes to the back of the line (round robin)
                if self._calls:
                    command = self._calls.popleft()
                    if isinstance(command, PiecewiseCall):
                        if not command.advance():
                            self._calls.append(command)
                    else:
                        self._handle(command)
                # 3. one engine step for everything running
                if busy:
                    outputs = self.engine.step()
                    self._dispatch(outputs)
                    self._snapshot()
        except BaseException as exc:  # noqa: BLE001 - any engine failure ends every stream
            log.exception("engine thread failed")
            self.failure = exc
            self._shutdown(EngineDead(f"engine failed: {exc!r}"))

    def _handle(self, command: _Command) -> None:
        if isinstance(command, _Add):
            stream = command.stream
            try:
                self.engine.add_request(stream.request_id, command.prompt_ids, command.params,
                                        adapter=command.adapter)
            except Exception as exc:  # a request error (too long, rejected): only this stream
                self._deliver(stream, _api_error(exc))
                return
            stream.t_added = time.perf_counter()
            self._streams[stream.request_id] = stream
        elif isinstance(command, _Abort):
            if self._streams.pop(command.request_id, None) is not None:
                self.engine.abort(command.request_id)
                self._snapshot()
        elif isinstance(command, _FailAll):
            self._fail_streams(command.error)
        elif isinstance(command, _Call):
            if command.future.set_running_or_notify_cancel():
                try:
                    command.future.set_result(command.fn(*command.args))
                except Exception as exc:
                    command.future.set_exception(_api_error(exc))
        else:  # pragma: no cover - _Stop is handled by the loop
            raise AssertionError(f"unexpected command {command!r}")

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = defaultdict(list)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop[stream.loop].append((stream, out))
        for loop, items in by_loop.items():
            _call_in_loop(loop, _put_many, items)

    def _deliver(self, stream: RequestStream, item: RequestOutput | BaseException) -> None:
        _call_in_loop(stream.loop, stream.queue.put_nowait, item)

    def _snapshot(self) -> None:
        try:
            self.stats = self.engine.stats()
        except Exception:  # stats are best effort
            log.debug("engine.stats() failed", exc_info=True)

    def _fail_streams(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            with contextlib.suppress(Exception):  # the engine may be broken; streams still get the error
                self.engine.abort(request_id)
            self._deliver(stream, error)
        self._streams.clear()
        self._snapshot()

    def _shutdown(self, error: BaseException) -> None:
        """Fail every open stream and pending command with `error`."""
        self._fail_streams(error)
        while True:
            try:
                command = self._calls.popleft() if self._calls else self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                self._deliver(command.stream, error)
            elif isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(error)
            elif isinstance(command, PiecewiseCall):
                command.fail(error)


def _api_error(exc: Exception) -> Exception:
    """The engine's request errors as the HTTP layer's (400 naming the field); anything else is a bug
    in this request's handling: logged here, a 500 for this request only."""
    error = to_api_error(exc)
    if error is not exc and error.status >= 500:
        log.error("engine rejected a request with an unexpected error", exc_info=exc)
    return error


def _put_many(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the request's loop is closed: nobody listens any more
        loop.call_soon_threadsafe(fn, *args)
