"""The engine thread behind the HTTP layer: disconnect aborts, engine failure, drain.

These drive the ASGI app directly (custom receive/send) so a test can disconnect mid-request;
the engine is slowed down (or broken) through `create_app(loader=...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.main import load_model
from app.settings import ServerSettings
from model.config import preset
from model.sampling import SamplingParams
from model.transformer import Transformer
from tests.test_app_support import (  # noqa: F401 - fixtures
    USER_HI,
    app_checkpoint,
    engine_running,
    in_flight,
    make_client,
    settings_for,
)


def slow_loader(delay_s: float, fail: threading.Event | None = None):
    def load(settings: ServerSettings):
        loaded = load_model(settings)
        step = loaded.engine.step

        def slow_step():
            time.sleep(delay_s)
            if fail is not None and fail.is_set():
                raise RuntimeError("simulated device failure")
            return step()

        loaded.engine.step = slow_step
        return loaded
    return load


async def asgi_call(app: Any, path: str, body: dict, disconnect_after: float | None = None
                    ) -> tuple[int, bytes]:
    """POST `body` to the app; disconnect after `disconnect_after` seconds (None: never)."""
    sent_body = False
    gone = asyncio.Event()
    status, chunks = 0, []

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        if disconnect_after is None:
            await gone.wait()
        else:
            await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await app(scope, receive, send)
    return status, b"".join(chunks)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_disconnect_aborts_and_frees_slots(app_checkpoint: Path) -> None:  # noqa: F811
    settings = settings_for(app_checkpoint, max_tokens_limit=200)
    with make_client(settings, loader=slow_loader(0.02)) as client:
        app = client.app
        long = {"messages": USER_HI, "max_tokens": 200, "temperature": 0}
        for path, body in (("/chat", long), ("/chat", {**long, "stream": True}),
                           ("/v1/chat/completions", {**long, "ignore_eos": True}),
                           ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 200, "stream": True,
                                                "ignore_eos": True})):
            result: dict = {}

            def run(path=path, body=body, result=result) -> None:
                result["out"] = asyncio.run(asgi_call(app, path, body, disconnect_after=0.5))

            t0 = time.monotonic()
            thread = threading.Thread(target=run)
            thread.start()
            assert wait_until(lambda: engine_running(client) > 0), path  # it really is decoding
            thread.join(10)
            # 200 tokens x 20 ms would take 4 s; the disconnect at 0.5 s aborted it
            assert wait_until(lambda: in_flight(client) == 0 and engine_running(client) == 0, 3), path
            assert time.monotonic() - t0 < 3.5, path
        metrics = client.get("/metrics").text
        assert 'outcome="client_disconnected"' in metrics


def test_engine_failure_errors_every_stream_and_health_turns_red(app_checkpoint: Path) -> None:  # noqa: F811
    fail = threading.Event()
    settings = settings_for(app_checkpoint, max_tokens_limit=200)
    with make_client(settings, loader=slow_loader(0.02, fail)) as client:
        app = client.app
        body = {"messages": USER_HI, "max_tokens": 200, "temperature": 0}

        async def two_requests() -> list[tuple[int, bytes]]:
            plain = asyncio.create_task(asgi_call(app, "/chat", body))
            streamed = asyncio.create_task(asgi_call(app, "/chat", {**body, "stream": True}))
            await asyncio.sleep(0.3)
            fail.set()
            return await asyncio.gather(plain, streamed)

        (s1, b1), (s2, b2) = asyncio.run(two_requests())
        assert s1 == 503 and json.loads(b1)["error"]["code"] == "engine_failed"
        assert s2 == 200  # the stream had started: the error is an SSE event, then [DONE]
        events = [e for e in b2.decode().split("\n\n") if e]
        assert "engine failed" in json.loads(events[-2][len("data: "):])["error"]["message"]
        assert events[-1] == "data: [DONE]"
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        r = client.post("/chat", json={"messages": USER_HI})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert "seedling_engine_healthy 0.0" in client.get("/metrics").text


def test_drain_finishes_in_flight_then_refuses(app_checkpoint: Path) -> None:  # noqa: F811
    settings = settings_for(app_checkpoint, max_tokens_limit=100)
    with make_client(settings, loader=slow_loader(0.01)) as client:
        app = client.app
        engine_client = app.state.seedling.client

        async def scenario() -> tuple[tuple[int, bytes], bool]:
            running = asyncio.create_task(asgi_call(app, "/v1/chat/completions",
                                                    {"messages": USER_HI, "max_tokens": 60, "ignore_eos": True,
                                                     "temperature": 0}))
            await asyncio.sleep(0.2)
            engine_client.begin_drain()
            idle = await engine_client.wait_idle(10)
            return await running, idle

        (status, body), idle = asyncio.run(scenario())
        assert idle and status == 200
        assert json.loads(body)["usage"]["completion_tokens"] == 60  # finished, not cut off
        assert client.post("/chat", json={"messages": USER_HI}).status_code == 503
        assert client.get("/ready").status_code == 503


def _instrumented_engine(events: list[str], piece_delay_s: float = 0.0):
    """A tiny engine whose scoring pieces and steps append to `events` (scoring closed early: "closed")."""
    from tests.test_engine import VOCAB, make_engine

    model = Transformer(preset("test", vocab_size=VOCAB, max_seq_len=1024)).init_weights(seed=1).eval()
    engine = make_engine(model)  # prefill_chunk 64
    score_steps, step = engine.score_steps, engine.step

    def counted_score_steps(*args):
        inner = score_steps(*args)

        def pieces():
            try:
                while True:
                    next(inner)
                    events.append("piece")
                    time.sleep(piece_delay_s)
                    yield
            except StopIteration as done:
                events.append("scored")
                return done.value
            except GeneratorExit:
                events.append("closed")
                inner.close()
                raise
        return pieces()

    def counted_step():
        events.append("step")
        return step()

    engine.score_steps, engine.step = counted_score_steps, counted_step
    return engine


def test_scoring_runs_between_decode_steps_not_before_them() -> None:
    """One /classify text's scoring (a 230-token prompt, 80 labels: 9 forwards) shares the engine with a
    decoding request piece by piece, instead of holding the engine for all 9 forwards at once."""
    from app.engine_client import EngineClient

    events: list[str] = []
    engine = _instrumented_engine(events)
    client = EngineClient(engine, admission_limit=8).start()
    prompt, conts = [(7 * i) % 50 + 1 for i in range(230)], [[i % 50 + 1, 3] for i in range(80)]

    async def run() -> list[float]:
        decoding = asyncio.Event()

        async def decode() -> None:  # long enough to outlast the scoring; cancelled after it
            async for _ in client.generate("victim", [1, 2, 3], SamplingParams(max_tokens=400, temperature=0,
                                                                               ignore_eos=True)):
                decoding.set()
        victim = asyncio.create_task(decode())
        await decoding.wait()
        scores = await client.score(prompt, conts)
        victim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await victim
        return scores

    try:
        scores = asyncio.run(run())
    finally:
        client.stop()
    pieces = [i for i, e in enumerate(events) if e == "piece"]
    assert len(pieces) == 8 and "scored" in events
    assert "step" in events[pieces[0]:pieces[-1]], "decode steps ran between the scoring pieces"
    assert scores == pytest.approx(engine.score(prompt, conts), abs=1e-5)


def test_cancelled_scoring_stops_before_its_next_piece() -> None:
    """A deadline or a disconnect cancels the caller: the scoring job is closed, not run to the end."""
    from app.engine_client import EngineClient

    events: list[str] = []
    client = EngineClient(_instrumented_engine(events, piece_delay_s=0.05), admission_limit=8).start()
    prompt, conts = [(7 * i) % 50 + 1 for i in range(230)], [[i % 50 + 1, 3] for i in range(80)]

    async def run() -> None:
        job = asyncio.create_task(client.score(prompt, conts))
        while "piece" not in events:  # started: cancel mid-way
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    try:
        asyncio.run(run())
        assert wait_until(lambda: "closed" in events, timeout=5)
    finally:
        client.stop()
    assert "scored" not in events and events.count("piece") < 8
