"""ServerSettings from SEEDLING_* env vars, and the app shell without a model (static playground, probes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import ServerSettings, SettingsError


def settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str],
                      dotenv: str | None = None, **overrides: object) -> ServerSettings:
    """ServerSettings() with exactly `env` as the environment and `dotenv` as ./.env."""
    monkeypatch.setattr(os, "environ", dict(env))
    monkeypatch.chdir(tmp_path)
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    return ServerSettings(**overrides)


def test_from_env_parses_types_and_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = settings_from_env(monkeypatch, tmp_path, {
        "SEEDLING_API_KEYS": "k1, k2,", "SEEDLING_MAX_NUM_SEQS": "4", "SEEDLING_REQUEST_TIMEOUT_S": "2.5",
        "SEEDLING_LOG_PROMPTS": "yes", "SEEDLING_CHECKPOINT": "", "SEEDLING_HOME": "/ignored",
        "SEEDLING_PREFIX_CACHING": "0", "PATH": "/bin"}, dotenv="SEEDLING_PORT=9001\nAPI_PORT=1\n")
    assert s.api_keys == ("k1", "k2") and s.max_num_seqs == 4 and s.request_timeout_s == 2.5
    assert s.log_prompts is True and s.checkpoint is None and s.port == 9001
    assert s.admission_limit == 4 + s.max_queued_requests
    assert "k1" not in repr(s), "keys never appear in a repr (logs)"
    engine = s.engine_config(max_model_len=100)
    assert (engine.max_num_seqs, engine.enable_prefix_caching, engine.max_model_len) == (4, False, 100)


@pytest.mark.parametrize("env, needle", [
    ({"SEEDLING_MAX_NUM_SEQ": "4"}, "unknown setting SEEDLING_MAX_NUM_SEQ in the environment "
                                    r"\(did you mean SEEDLING_MAX_NUM_SEQS\?\); known: .*SEEDLING_PORT"),
    ({"SEEDLING_PORT": "http"}, "SEEDLING_PORT='http': Input should be a valid integer"),
    ({"SEEDLING_PORT": "0"}, "SEEDLING_PORT='0': Input should be greater than or equal to 1"),
    ({"SEEDLING_DEVICE": "tpu"}, "SEEDLING_DEVICE='tpu': must be auto, cpu, cuda or cuda:N"),
    ({"SEEDLING_DTYPE": "fp8"}, "SEEDLING_DTYPE='fp8': Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ({"SEEDLING_QUANTIZE": "int4"}, "SEEDLING_QUANTIZE='int4': Input should be 'auto', 'none', 'int8'"),
    ({"SEEDLING_LOG_PROMPTS": "maybe"}, "SEEDLING_LOG_PROMPTS='maybe': Input should be a valid boolean"),
    ({"SEEDLING_MAX_TOKENS_DEFAULT": "5000"}, "SEEDLING_MAX_TOKENS_DEFAULT=5000 must be <= SEEDLING_MAX_TOKENS_LIMIT"),
    ({"SEEDLING_PREFIX_CACHING": "sometimes"}, "^SEEDLING_PREFIX_CACHING='sometimes': Input should be a valid boolean"),
])
def test_bad_settings_fail_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        settings_from_env(monkeypatch, tmp_path, env)


def test_bad_dotenv_and_explicit_names_fail_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"unknown setting SEEDLING_MAX_TOKEN_LIMIT in .env "
                                            r"\(did you mean SEEDLING_MAX_TOKENS_LIMIT\?\)"):
        settings_from_env(monkeypatch, tmp_path, {}, dotenv="SEEDLING_MAX_TOKEN_LIMIT=5\n")
    (tmp_path / ".env").unlink()
    with pytest.raises(SettingsError, match=r"unknown setting max_num_seq \(did you mean max_num_seqs\?\); "
                                            "known: .*max_num_seqs"):
        ServerSettings(max_num_seq=4)


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
