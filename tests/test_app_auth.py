"""API keys: deny by default on every route (docs included) under any root path, checked from the
headers before the body is read; keys from a file or a Docker secret; no open bind without keys.

No model is loaded (the loader fails): every assertion is about the key check in front of the app.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.settings as settings_module
from app.main import create_app
from app.settings import ServerSettings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer k2"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _no_model(settings: ServerSettings):
    raise FileNotFoundError("no model in the auth tests")


def _app(tmp_path: Path, **overrides: object):
    static = tmp_path / "static"
    static.mkdir(exist_ok=True)
    (static / "index.html").write_text("<html>playground</html>")
    (static / "app.js").write_text("// the playground")
    values: dict = dict(api_keys=("k1", "k2"), static_dir=str(static), warmup=False)
    values.update(overrides)
    return create_app(ServerSettings(_env_file=None, **values), loader=_no_model)


@pytest.mark.parametrize("root_path", ["", "/api"])  # /api: `uvicorn --root-path /api` puts it in `path`
def test_every_route_needs_a_key_except_probes(tmp_path: Path, root_path: str) -> None:
    with TestClient(_app(tmp_path), root_path=root_path) as c:
        for method, path in [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"), ("POST", "/chat"),
                             ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/tokenize"),
                             ("POST", "/classify"), ("GET", "/no-such-route"), ("POST", "/")]:
            r = c.request(method, root_path + path, json=CHAT)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert c.get(root_path + "/openapi.json", headers=AUTH).json()["info"]["title"] == "Seedling"
        assert c.get(root_path + "/docs", headers={"X-API-Key": "k1"}).status_code == 200
        r = c.post(root_path + "/chat", json=CHAT, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed"  # past the key check
        assert c.get(root_path + "/metrics").status_code == 200
        for probe in ("/health", "/ready"):  # open: red here because the model failed to load
            assert c.get(root_path + probe).json()["error"]["code"] == "load_failed"
        # the playground's own files are public (the page asks for the key and sends it)
        assert "playground" in c.get(root_path + "/").text
        assert c.get(root_path + "/app.js").status_code == 200


def test_open_paths_are_configurable(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path, open_paths=("/health",))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=AUTH).status_code == 200
        assert c.get("/health").status_code == 503  # open, red: no model


def test_key_is_checked_before_the_body_is_read(tmp_path: Path) -> None:
    app = _app(tmp_path)
    with TestClient(app) as c:  # an unauthenticated 2 MB body: 401, never buffered (it used to be 413)
        r = c.post("/chat", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
        assert r.status_code == 401

    statuses: list[int] = []

    async def receive() -> dict:
        raise AssertionError("the body was read before the key was checked")

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/v1/completions", "raw_path": b"/api/v1/completions",
             "root_path": "/api", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("test", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"10")]}
    asyncio.run(app(scope, receive, send))
    assert statuses == [401]


def test_keys_from_a_file_and_a_docker_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated 2026-12\nk-file-1\nk-file-2, k-file-3\n")
    settings = ServerSettings(_env_file=None, api_keys=("k-env",), api_keys_file=str(key_file), host="0.0.0.0")
    assert settings.api_keys == ("k-env", "k-file-1", "k-file-2", "k-file-3")
    with TestClient(create_app(settings.model_copy(update={"warmup": False}), loader=_no_model)) as c:
        assert c.post("/tokenize", json={"text": "a"}).status_code == 401
        assert c.post("/tokenize", json={"text": "a"}, headers={"X-API-Key": "k-file-3"}).status_code == 503
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "seedling_api_keys").write_text("k-secret\n")
    monkeypatch.setattr(settings_module, "SECRETS_DIR", secrets)
    assert ServerSettings(_env_file=None, host="0.0.0.0").api_keys == ("k-secret",)
    for bad, needle in [("missing", "cannot be read: No such file"), ("empty", "holds no key")]:
        if bad == "empty":
            (tmp_path / bad).write_text("# nothing yet\n")
        with pytest.raises(SettingsError, match=f"SEEDLING_API_KEYS_FILE='.*{bad}' {needle}"):
            ServerSettings(_env_file=None, api_keys_file=str(tmp_path / bad))


def test_no_open_bind_without_keys() -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        with pytest.raises(SettingsError, match=f"SEEDLING_HOST={host} is reachable from other machines"):
            ServerSettings(_env_file=None, host=host)
        assert ServerSettings(_env_file=None, host=host, allow_unauthenticated=True).host == host
        assert ServerSettings(_env_file=None, host=host, api_keys=("k",)).host == host
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert ServerSettings(_env_file=None, host=host).host == host


@pytest.mark.parametrize("env, args, needle", [
    ({}, ["--host", "0.0.0.0"], "SEEDLING_HOST=0.0.0.0 is reachable from other machines but no API key is set"),
    ({"SEEDLING_MAX_NUM_SEQS": "4", "SEEDLING_MAX_QUEUED_REQUESTS": "4"}, [],
     "SEEDLING_MAX_BATCH_ITEMS=64 is larger than the admission limit"),
])
def test_python_m_app_refuses_bad_settings_at_start(env: dict, args: list[str], needle: str, tmp_path: Path) -> None:
    """Exit status 2 and one line naming the variable, before any model is loaded (these used to start
    and serve: openly on every interface, or with "429, retry" forever for a large list input)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEEDLING_") or k == "SEEDLING_HOME"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "app", "--port", str(port), *args], cwd=tmp_path, timeout=120,
                          env={**base, "PYTHONPATH": str(ROOT), "SEEDLING_CHECKPOINT": str(tmp_path), **env},
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
