"""ServerSettings from SEEDLING_* env vars, and the app shell without a model (static playground, probes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import ServerSettings, SettingsError


def test_from_env_parses_types_and_lists() -> None:
    s = ServerSettings.from_env({"SEEDLING_API_KEYS": "k1, k2,", "SEEDLING_MAX_NUM_SEQS": "4",
                                 "SEEDLING_REQUEST_TIMEOUT_S": "2.5", "SEEDLING_LOG_PROMPTS": "yes",
                                 "SEEDLING_CHECKPOINT": "", "SEEDLING_HOME": "/ignored", "PATH": "/bin"})
    assert s.api_keys == ("k1", "k2") and s.max_num_seqs == 4 and s.request_timeout_s == 2.5
    assert s.log_prompts is True and s.checkpoint is None
    assert s.admission_limit == 4 + s.max_queued_requests


@pytest.mark.parametrize("env, needle", [
    ({"SEEDLING_MAX_NUM_SEQ": "4"}, "unknown setting SEEDLING_MAX_NUM_SEQ"),
    ({"SEEDLING_PORT": "http"}, "SEEDLING_PORT"),
    ({"SEEDLING_DEVICE": "tpu"}, "SEEDLING_DEVICE"),
    ({"SEEDLING_LOG_PROMPTS": "maybe"}, "SEEDLING_LOG_PROMPTS"),
    ({"SEEDLING_MAX_TOKENS_DEFAULT": "5000"}, "SEEDLING_MAX_TOKENS_DEFAULT"),
])
def test_bad_settings_fail_loudly(env: dict, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        ServerSettings.from_env(env)


def _broken_loader(settings: ServerSettings):
    raise FileNotFoundError("no checkpoint here")


def test_playground_mount_and_load_failure(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>playground</html>")
    app = create_app(ServerSettings(static_dir=str(tmp_path), warmup=False), loader=_broken_loader)
    with TestClient(app) as client:
        assert "playground" in client.get("/").text
        r = client.get("/missing.js")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = client.post("/nope", json={})
        assert r.status_code == 404 and "error" in r.json()
        for probe in ("/health", "/ready"):
            assert client.get(probe).status_code == 503  # the model failed to load: red, with the reason
        assert "no checkpoint here" in client.get("/health").json()["error"]["message"]
        r = client.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed"
