"""Abusive requests (issue 13, request path): each gets a 4xx naming the field or the documented
behaviour, never a 500, and never leaks into another request (its engine key, its stream, its
admission slots).

The engine is slowed or made to fail through `create_app(loader=...)`, as in test_app_engine_client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import load_model
from app.settings import ServerSettings
from model.engine import RequestRejected
from tests.test_app_engine_client import asgi_call, slow_loader, wait_until
from tests.test_app_support import (  # noqa: F401 - fixtures
    USER_HI,
    app_checkpoint,
    engine_running,
    in_flight,
    make_client,
    settings_for,
)


@pytest.fixture(scope="module")
def client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    with make_client(settings_for(app_checkpoint, max_tokens_limit=200)) as c:
        yield c


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


# ---------------------------------------------------------------------------- logit_bias

@pytest.mark.parametrize("key", ["²", "٣", "𝟓", " 5", "5 ", "+5", "5.0", "-1", "0x5", "", "99999999999999999999"])
def test_logit_bias_key_that_is_not_a_plain_token_id_is_400(client: TestClient, key: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 1, "logit_bias": {key: 1}})
    assert r.status_code == 400, (key, r.text)
    assert error_of(r)["param"] == "logit_bias"


def test_logit_bias_token_id_outside_the_vocabulary_is_400(client: TestClient) -> None:
    vocab = client.app.state.seedling.service.tokenizer.vocab_size
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logit_bias": {str(vocab): 1}})
    assert r.status_code == 400 and error_of(r)["param"] == "logit_bias"
    assert str(vocab) in error_of(r)["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logit_bias": {str(vocab - 1): 1}})
    assert r.status_code == 200, r.text


def test_logit_bias_is_bounded_to_300_entries(client: TestClient) -> None:
    vocab = client.app.state.seedling.service.tokenizer.vocab_size
    bias = {str(i): -1.0 for i in range(301)}
    assert vocab > 301
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 1, "logit_bias": bias})
    assert r.status_code == 400 and error_of(r)["param"] == "logit_bias"
    assert "300" in error_of(r)["message"]
    del bias["300"]
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 1, "logit_bias": bias})
    assert r.status_code == 200, r.text


def test_logit_bias_steers_the_reply(client: TestClient) -> None:
    """+100 on one token makes greedy decoding pick it every step (the bias is really applied)."""
    token = 42
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                             "logit_bias": {str(token): 100}, "logprobs": 0})
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    svc = client.app.state.seedling.service
    assert tokens == [svc.tokenizer.token_bytes(token).decode("utf-8", "replace")] * 4


# ---------------------------------------------------------------------------- request ids and batches

LONG = {"max_tokens": 120, "ignore_eos": True, "temperature": 0}


def test_client_request_id_is_only_echoed_never_the_engine_key(app_checkpoint: Path) -> None:  # noqa: F811
    """`X-Request-Id: atk-1` in flight, then a 4-prompt batch with `X-Request-Id: atk`: its items are
    not named `cmpl-atk-0..3` in the engine, so nothing collides and nothing is aborted across."""
    with make_client(settings_for(app_checkpoint, max_tokens_limit=200), loader=slow_loader(0.02)) as client, \
            ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/completions", json={"prompt": "a", **LONG},
                            headers={"X-Request-Id": "atk-1"})
        assert wait_until(lambda: engine_running(client) > 0)
        batch = client.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 3},
                            headers={"X-Request-Id": "atk"})
        assert batch.status_code == 200, batch.text
        assert batch.headers["x-request-id"] == "atk" and len(batch.json()["choices"]) == 4
        # a streamed batch under the same id that disconnects must not abort the first request
        with client.stream("POST", "/v1/completions", json={"prompt": ["a", "b"], "stream": True, **LONG},
                           headers={"X-Request-Id": "atk"}) as s:
            next(s.iter_lines())
        done = first.result(timeout=30)
        assert done.status_code == 200, done.text
        assert done.headers["x-request-id"] == "atk-1"
        assert done.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
        assert wait_until(lambda: in_flight(client) == 0 and engine_running(client) == 0, 5)


def rejecting_loader(bad_prompt: list[int], delay_s: float = 0.02):
    """The engine (slowed) rejects one particular prompt when it is added, as it would a bad item."""
    def load(settings: ServerSettings):
        loaded = slow_loader(delay_s)(settings)
        add = loaded.engine.add_request

        def add_request(request_id, prompt_ids, params, **kwargs):
            if list(prompt_ids) == bad_prompt:
                raise RequestRejected("simulated rejection of one batch item")
            return add(request_id, prompt_ids, params, **kwargs)

        loaded.engine.add_request = add_request
        return loaded
    return load


@pytest.mark.parametrize("stream", [False, True])
def test_failed_batch_item_cancels_its_siblings_and_keeps_the_admission_bound(
        app_checkpoint: Path, stream: bool) -> None:  # noqa: F811
    bad = [11, 12, 13]
    with make_client(settings_for(app_checkpoint, max_tokens_limit=200), loader=rejecting_loader(bad)) as client:
        body = {"prompt": [[5, 6], [7, 8], [9, 10], bad], "max_tokens": 200, "ignore_eos": True,
                "temperature": 0, "stream": stream}
        r = client.post("/v1/completions", json=body)
        if stream:
            assert r.status_code == 200
            assert "simulated rejection" in r.text and r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.status_code == 400 and "simulated rejection" in error_of(r)["message"]
        # the batch's slots are free (in_flight 0) only if its siblings stopped too: 200 tokens x 20 ms
        # = 4 s if they kept decoding past the released admission bound
        assert wait_until(lambda: engine_running(client) == 0, 1.0), "siblings still decoding"
        assert in_flight(client) == 0


# ---------------------------------------------------------------------------- stop strings

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": USER_HI}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/chat", {"messages": USER_HI}),
])
def test_stop_string_length_is_capped(client: TestClient, path: str, body: dict) -> None:
    from model.sampling import MAX_STOP_CHARS

    r = client.post(path, json={**body, "max_tokens": 2, "stop": ["x" * (MAX_STOP_CHARS + 1)]})
    assert r.status_code == 400 and error_of(r)["param"] == "stop", r.text
    assert str(MAX_STOP_CHARS) in error_of(r)["message"]
    r = client.post(path, json={**body, "max_tokens": 2, "stop": ["x" * MAX_STOP_CHARS] * 16})
    assert r.status_code == 200, r.text
    r = client.post(path, json={**body, "max_tokens": 2, "stop": ["x"] * 17})
    assert r.status_code == 400 and error_of(r)["param"] == "stop"


# ---------------------------------------------------------------------------- /classify

def counting_score_loader(delay_s: float, calls: list[int]):
    """The engine's scoring slowed down and counted (one call per text scored)."""
    def load(settings: ServerSettings):
        loaded = load_model(settings)
        score_steps = loaded.engine.score_steps

        def slow_score_steps(prompt_ids, continuations, *rest):
            calls.append(len(prompt_ids))
            time.sleep(delay_s)
            return score_steps(prompt_ids, continuations, *rest)

        loaded.engine.score_steps = slow_score_steps
        return loaded
    return load


CLASSIFY_6 = {"text": [f"review number {i}: fine" for i in range(6)], "labels": ["positive", "negative"]}


def test_classify_deadline_stops_the_scoring(app_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    calls: list[int] = []
    with make_client(settings_for(app_checkpoint), loader=counting_score_loader(0.3, calls)) as client:
        calls.clear()
        settings = client.app.state.seedling.service.settings
        monkeypatch.setattr(settings, "request_timeout_s", 0.2)
        r = client.post("/classify", json=CLASSIFY_6)
        assert r.status_code == 504 and error_of(r)["type"] == "timeout_error"
        monkeypatch.setattr(settings, "request_timeout_s", 300.0)
        # the engine thread takes commands in order: once this reply is back, any scoring still queued
        # behind the 504 would have run. Only the text being scored at the deadline may finish.
        assert client.post("/chat", json={"messages": USER_HI, "max_tokens": 1}).status_code == 200
        assert len(calls) <= 2, f"{len(calls)} of 6 texts scored after a 504 at the first"
        assert in_flight(client) == 0


def test_classify_disconnect_stops_the_scoring(app_checkpoint: Path) -> None:  # noqa: F811
    calls: list[int] = []
    with make_client(settings_for(app_checkpoint), loader=counting_score_loader(0.3, calls)) as client:
        calls.clear()
        status, _ = asyncio.run(asgi_call(client.app, "/classify", CLASSIFY_6, disconnect_after=0.2))
        assert client.post("/chat", json={"messages": USER_HI, "max_tokens": 1}).status_code == 200
        assert len(calls) <= 2, f"{len(calls)} of 6 texts scored after the client left at the first"
        assert in_flight(client) == 0


# ---------------------------------------------------------------------------- tokenizing off the event loop

def watched_tokenizer_loader(encoded: list[int], gate: threading.Event, entered: threading.Event,
                             block_above: int):
    """The tokenizer records the length of every text it encodes and, for a text longer than
    `block_above`, signals `entered` and waits for `gate` (a slow tokenization, made deterministic)."""
    def load(settings: ServerSettings):
        loaded = load_model(settings)
        encode = loaded.tokenizer.encode

        def watched_encode(text, add_bos=False):
            encoded.append(len(text))
            if len(text) > block_above:
                entered.set()
                gate.wait(20)
            return encode(text, add_bos=add_bos)

        loaded.tokenizer.encode = watched_encode
        return loaded
    return load


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", lambda text: {"prompt": text, "max_tokens": 1}),
    ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
    ("/chat", lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
    ("/summarize", lambda text: {"text": [text, "short"], "max_tokens": 1}),
    ("/tokenize", lambda text: {"text": text}),
])
def test_tokenizing_a_long_prompt_does_not_block_the_event_loop(app_checkpoint: Path, path: str, body) -> None:  # noqa: F811
    encoded: list[int] = []
    gate, entered = threading.Event(), threading.Event()
    loader = watched_tokenizer_loader(encoded, gate, entered, block_above=200)
    with make_client(settings_for(app_checkpoint), loader=loader) as client, ThreadPoolExecutor(2) as pool:
        try:
            slow = pool.submit(client.post, path, json=body("hello " * 36))
            assert entered.wait(20), "the long text was never tokenized"
            # the tokenizer is busy with the long text; the server still answers meanwhile
            probe = pool.submit(client.get, "/health")
            assert probe.result(timeout=10).status_code == 200
            assert not slow.done()
        finally:
            gate.set()
        assert slow.result(timeout=20).status_code == 200, slow.result().text


def test_a_prompt_too_long_by_its_characters_is_refused_before_tokenizing(app_checkpoint: Path) -> None:  # noqa: F811
    encoded: list[int] = []
    loader = watched_tokenizer_loader(encoded, threading.Event(), threading.Event(), block_above=10**9)
    with make_client(settings_for(app_checkpoint), loader=loader) as client:
        svc = client.app.state.seedling.service
        huge = "lorem ipsum " * 80_000  # 960 KB, under the body limit
        for path, body, param in (
                ("/v1/completions", {"prompt": huge}, "prompt"),
                ("/v1/completions", {"prompt": ["short", huge]}, "prompt"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}, "messages"),
                ("/chat", {"messages": [{"role": "user", "content": huge}]}, "messages"),
                ("/translate", {"text": huge, "target_lang": "de"}, "text"),
                ("/classify", {"text": huge, "labels": ["a", "b"]}, "text")):
            encoded.clear()
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            assert error_of(r)["code"] == "context_length_exceeded" and error_of(r)["param"] == param, r.text
            assert max(encoded, default=0) < len(huge) // 2, f"{path} tokenized {max(encoded)} characters first"
        # the bound only refuses what cannot fit: more characters than max_model_len of the longest token
        longest = max(len(svc.tokenizer.token_bytes(i)) for i in range(svc.tokenizer.vocab_size))
        assert svc.prompts.max_chars >= svc.max_model_len * longest
        assert f"{len(huge) + 2} characters" in error_of(r)["message"]  # /classify: the text and its labels


def test_back_to_back_classify_calls_do_not_starve_decodes(app_checkpoint: Path) -> None:  # noqa: F811
    """Two /classify requests keep a scoring call queued at all times; a 3-token chat must still
    finish after a few of their texts, not after all of them (one engine call per step at most)."""
    calls: list[int] = []
    texts = {"text": [f"review number {i}: fine" for i in range(5)], "labels": ["positive", "negative"]}
    with make_client(settings_for(app_checkpoint), loader=counting_score_loader(0.2, calls)) as client, \
            ThreadPoolExecutor(2) as pool:
        assert client.post("/classify", json={**texts, "text": "warm the label set's prior"}).status_code == 200
        calls.clear()
        heavy = [pool.submit(client.post, "/classify", json=texts) for _ in range(2)]
        assert wait_until(lambda: len(calls) >= 2)
        r = client.post("/chat", json={"messages": USER_HI, "max_tokens": 3, "temperature": 0})
        scored_meanwhile = len(calls)
        assert r.status_code == 200 and all(f.result(timeout=60).status_code == 200 for f in heavy)
        assert len(calls) == 10
        assert scored_meanwhile <= 7, f"the chat waited for {scored_meanwhile} of 10 scoring calls"
