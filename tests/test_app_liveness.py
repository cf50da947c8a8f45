"""Liveness and shutdown: a hung engine turns /health red, a dead engine ends `python -m app` with exit
status 1 (so `docker run --restart unless-stopped` restarts it), and a stream still running when the
drain timeout ends gets an error event and [DONE], with one log line and no traceback.

The subprocess tests run the real entry point on the tiny checkpoint; the engine misbehaves through the
test-only hook tests/fixtures/engine_fault/sitecustomize.py (ENGINE_FAULT=fail:N | slow:S).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.main import load_model
from app.settings import ServerSettings
from tests.test_app_support import USER_HI, app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
FAULT_HOOK = ROOT / "tests" / "fixtures" / "engine_fault"


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_hung_engine_turns_health_red_then_green(app_checkpoint: Path) -> None:  # noqa: F811
    gate = threading.Event()

    def hanging_loader(settings: ServerSettings):
        loaded = load_model(settings)
        step = loaded.engine.step

        def hang_until_released():
            gate.wait(60)
            return step()

        loaded.engine.step = hang_until_released
        return loaded

    settings = settings_for(app_checkpoint, warmup=False, engine_stall_timeout_s=2)
    with make_client(settings, loader=hanging_loader) as c:
        assert c.get("/health").status_code == 200
        replies: list[httpx.Response] = []
        request = threading.Thread(target=lambda: replies.append(
            c.post("/chat", json={"messages": USER_HI, "max_tokens": 2})))
        request.start()
        try:
            assert _wait_until(lambda: c.get("/health").status_code == 503, timeout=20), "hung engine, /health 200"
            error = c.get("/health").json()["error"]
            assert error["code"] == "engine_stalled" and "no heartbeat for" in error["message"]
            assert c.get("/ready").json()["error"]["code"] == "engine_stalled"
        finally:
            gate.set()
            request.join(60)
        assert replies[0].status_code == 200
        assert _wait_until(lambda: c.get("/health").status_code == 200, timeout=10), "beating again: green"
        assert c.get("/ready").status_code == 200


# ---------------------------------------------------------------------------- the real entry point
@pytest.fixture
def serve(app_checkpoint: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, str, Path]]]:  # noqa: F811
    """Start `python -m app` on the tiny checkpoint with extra env; wait for /ready; kill on teardown."""
    procs: list[subprocess.Popen] = []

    def start(**env: str) -> tuple[subprocess.Popen, str, Path]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDLING_") or k == "SEEDLING_HOME"}
        log = tmp_path / f"server-{port}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                env={**base_env, "PYTHONPATH": f"{FAULT_HOOK}{os.pathsep}{ROOT}",
                     "SEEDLING_CHECKPOINT": str(app_checkpoint), "SEEDLING_WARMUP": "0", **env},
                stdout=out, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
            try:
                return httpx.get(base + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait_until(ready, timeout=180), f"server not ready:\n{log.read_text()[-3000:]}"
        return proc, base, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_dead_engine_exits_nonzero(serve: Callable[..., tuple[subprocess.Popen, str, Path]]) -> None:
    proc, base, log = serve(ENGINE_FAULT="fail:1")
    r = httpx.post(base + "/chat", json={"messages": USER_HI, "max_tokens": 4}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
    try:
        status = proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process outlived its engine (Docker would never restart it):\n{log.read_text()[-2000:]}")
    assert status == 1, log.read_text()[-2000:]
    assert "shutting down (exit status 1)" in log.read_text()


def test_drain_timeout_ends_streams_with_an_error_then_done(
        serve: Callable[..., tuple[subprocess.Popen, str, Path]]) -> None:
    proc, base, log = serve(ENGINE_FAULT="slow:0.1", SEEDLING_DRAIN_TIMEOUT_S="1", SEEDLING_LOG_LEVEL="info")
    body = {"messages": USER_HI, "max_tokens": 150, "ignore_eos": True, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)  # ~15 s of generation left; the drain gives it 1 s
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "drain_timeout" and error["type"] == "service_unavailable_error"
    assert 3 < len(events) < 100, "generated for about the drain timeout, then ended"
    assert proc.wait(60) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert sum("drain timeout" in line for line in text.splitlines()) == 1, text[-3000:]
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
