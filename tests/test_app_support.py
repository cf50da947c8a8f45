"""Shared fixtures and helpers for the app tests (tests/test_app_*.py import from here).

`app_checkpoint` is the conftest tiny model with its vocabulary cut to the tokenizer's, so random
sampling never draws an id the tokenizer cannot spell. `make_client(settings)` starts an app under
TestClient (lifespan included) and waits for /ready.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import ServerSettings

TINY_LABELS = {"sentiment": ["positive", "negative"]}


@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_sp_tokenizer: Any) -> Path:
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    config = preset("test", vocab_size=tiny_sp_tokenizer.vocab_size)
    model = Transformer(config).init_weights(7).eval()
    path = tmp_path_factory.mktemp("app_ckpt") / "tiny-app"
    return Path(save_checkpoint(path, model, tiny_sp_tokenizer, {"labels": TINY_LABELS}))


def settings_for(checkpoint: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = dict(checkpoint=str(checkpoint), model_name="tiny", max_num_seqs=4,
                                  max_tokens_default=8, max_tokens_limit=64, max_queued_requests=8,
                                  max_batch_items=12, warmup=True, static_dir="/nonexistent")
    values.update(overrides)
    return ServerSettings(_env_file=None, **values)  # no ./.env: tests see only these values


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"app not ready: {client.get('/ready').text}")


@contextmanager
def make_client(settings: ServerSettings, **app_kwargs: Any) -> Iterator[TestClient]:
    app = create_app(settings, **app_kwargs)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def in_flight(client: TestClient) -> int:
    return client.app.state.seedling.client.in_flight  # type: ignore[attr-defined]


def engine_running(client: TestClient) -> int:
    engine_client = client.app.state.seedling.client  # type: ignore[attr-defined]
    return engine_client.stats.running if engine_client.stats else 0


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert text.endswith("\n\n"), "SSE body must end with a blank line"
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), f"bad SSE block {block!r}"
        events.append(block[len("data: "):])
    return events


USER_HI = [{"role": "user", "content": "Hello, how are you?"}]
