"""Every route and every error status of the HTTP service, against the tiny random checkpoint."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.test_app_support import (  # noqa: F401 - fixtures
    USER_HI,
    app_checkpoint,
    in_flight,
    make_client,
    settings_for,
    sse_events,
)


@pytest.fixture(scope="module")
def client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    with make_client(settings_for(app_checkpoint)) as c:
        yield c


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---------------------------------------------------------------------------- task endpoints

def test_chat_single_and_list(client: TestClient) -> None:
    r = client.post("/chat", json={"messages": USER_HI, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"]["role"] == "assistant" and isinstance(body["message"]["content"], str)
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert r.headers["x-request-id"] == body["id"]

    r = client.post("/chat", json={"messages": [USER_HI, [{"role": "user", "content": "Bye"}]], "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 2
    assert body["usage"]["completion_tokens"] == sum(x["usage"]["completion_tokens"] for x in body["results"])
    # a list item gives what it gives alone (greedy)
    alone = client.post("/chat", json={"messages": USER_HI, "max_tokens": 3}).json()
    assert body["results"][0]["message"] == alone["message"]


def test_chat_stream_sse_framing(client: TestClient) -> None:
    r = client.post("/chat", json={"messages": USER_HI, "max_tokens": 6, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] <= 6
    text = "".join(json.loads(e).get("delta", "") for e in events[:-1])
    plain = client.post("/chat", json={"messages": USER_HI, "max_tokens": 6}).json()
    assert text == plain["message"]["content"]


def test_chat_stream_rejects_list(client: TestClient) -> None:
    r = client.post("/chat", json={"messages": [USER_HI, USER_HI], "stream": True})
    assert r.status_code == 400 and error_of(r)["param"] == "stream"


def test_summarize_translate_single_and_list(client: TestClient) -> None:
    r = client.post("/summarize", json={"text": "The fox jumps over the dog.", "max_words": 5})
    assert r.status_code == 200, r.text
    assert {"text", "finish_reason", "usage", "id", "model"} <= set(r.json())
    r = client.post("/summarize", json={"text": ["One text.", "Another text."]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = client.post("/translate", json={"text": ["Hello", "World"], "target_lang": "zh", "source_lang": "en"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = client.post("/translate", json={"text": "Hello", "target_lang": "de", "temperature": 0.7, "seed": 3})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_classify_scores_sum_to_one(client: TestClient) -> None:
    labels = ["lost_or_stolen_card", "card_arrival", "exchange_rate"]
    r = client.post("/classify", json={"text": "I lost my card, please block it", "labels": labels})
    assert r.status_code == 200, r.text
    body = r.json()
    assert math.isclose(sum(s["score"] for s in body["scores"]), 1.0, rel_tol=1e-6)
    assert body["label"] == body["scores"][0]["label"] and body["labels"] == [body["label"]]
    assert sorted(s["label"] for s in body["scores"]) == sorted(labels)
    # list input, default labels from the checkpoint's only label set
    r = client.post("/classify", json={"text": ["great", "awful"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [sorted(s["label"] for s in x["scores"]) for x in results] == [["negative", "positive"]] * 2
    # multi_label: independent scores in (0, 1], not normalized
    r = client.post("/classify", json={"text": "great", "labels": labels, "multi_label": True, "threshold": 0.0})
    body = r.json()
    assert r.status_code == 200 and body["multi_label"] is True
    assert all(0 < s["score"] <= 1 for s in body["scores"]) and len(body["labels"]) == 3
    r = client.post("/classify", json={"text": "great", "label_set": "nope"})
    assert r.status_code == 400 and error_of(r)["param"] == "label_set"


# ---------------------------------------------------------------------------- OpenAI-compatible

def test_openai_chat_non_stream_and_params(client: TestClient) -> None:
    body = {"model": "tiny", "messages": USER_HI, "max_completion_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "seed": 1, "stop": ["zzz"], "logit_bias": {"5": -100},
            "ignore_eos": True, "repeat_penalty": 1.0, "top_k": 40, "min_p": 0.05, "cache_prompt": False}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] == 4
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    content = choice["logprobs"]["content"]
    assert len(content) == 4 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)


def test_openai_chat_stream_with_usage(client: TestClient) -> None:
    body = {"model": "tiny", "messages": USER_HI, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert streamed == plain["choices"][0]["message"]["content"]


def test_openai_completions_shapes(client: TestClient) -> None:
    for prompt, n in (("Hello", 1), (["Hello", "World"], 2), ([5, 6, 7], 1), ([[5, 6], [7, 8]], 2)):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == list(range(n))
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0, "echo": True,
                                             "logprobs": None})
    assert r.json()["choices"][0]["text"].startswith("Hi")
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    r = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] <= 6
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}


def default_serving_path() -> str:
    """SEEDLING_QUANTIZE=auto: q4 on the best native kernels this CPU runs, torch fp32 where only the
    portable ones do."""
    from model import native

    isa = native.isa()
    return "torch-fp32" if isa == "generic" else f"native-q4-{isa}"


def test_models_tokenize_detokenize(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 256
    assert models["data"][0]["serving_path"] == default_serving_path()  # the fixture serves the defaults
    ids = client.post("/tokenize", json={"text": "hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    assert client.post("/detokenize", json={"tokens": ids["tokens"]}).json()["text"] == "hello world"
    chat = client.post("/tokenize", json={"messages": USER_HI}).json()
    assert chat["count"] > ids["count"]
    r = client.post("/tokenize", json={"text": "a", "messages": USER_HI})
    assert r.status_code == 400
    r = client.post("/detokenize", json={"tokens": [10**6]})
    assert r.status_code == 400 and error_of(r)["param"] == "tokens"


def test_probes_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/ready").json() == {"status": "ready", "detail": None, "serving_path": default_serving_path()}
    client.post("/chat", json={"messages": USER_HI, "max_tokens": 2})
    text = client.get("/metrics").text
    for name in ("seedling_requests_running", "seedling_requests_waiting", "seedling_kv_cache_usage_ratio",
                 "seedling_prompt_tokens_total", "seedling_generation_tokens_total",
                 "seedling_time_to_first_token_seconds_bucket", "seedling_inter_token_latency_seconds_bucket",
                 "seedling_e2e_request_latency_seconds_bucket", "seedling_queue_time_seconds_bucket",
                 'seedling_requests_total{endpoint="chat",outcome='):
        assert name in text, name


def test_request_id_is_echoed(client: TestClient) -> None:
    r = client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/health", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


def test_concurrent_greedy_equals_alone(client: TestClient) -> None:
    prompts = [[{"role": "user", "content": f"Tell me about number {i}"}] for i in range(8)]
    alone = [client.post("/chat", json={"messages": p, "max_tokens": 12}).json()["message"] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: client.post("/chat", json={"messages": p, "max_tokens": 12}).json()
                                 ["message"], prompts))
    assert together == alone
    assert in_flight(client) == 0


# ---------------------------------------------------------------------------- errors: 400

@pytest.mark.parametrize("payload, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": USER_HI, "max_tokens": "many"}, "max_tokens"),
    ({"messages": USER_HI, "temperature": -1}, "temperature"),
    ({"messages": USER_HI, "bogus": 1}, "bogus"),
    ({"messages": USER_HI, "max_tokens": 65}, "max_tokens"),
    ({"messages": []}, "messages"),
])
def test_bad_fields_name_the_field(client: TestClient, payload: dict, param: str) -> None:
    r = client.post("/chat", json=payload)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param and error_of(r)["type"] == "invalid_request_error"


def test_malformed_json_is_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = client.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_openai_unsupported_values(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "n": 2})
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "top_logprobs": 2})
    assert r.status_code == 400 and error_of(r)["param"] == "top_logprobs"
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "logit_bias": {"x": 1}})
    assert r.status_code == 400 and error_of(r)["param"] == "logit_bias"


def test_prompt_too_long_says_both_counts(client: TestClient) -> None:
    long_text = "hello world " * 400
    r = client.post("/chat", json={"messages": [{"role": "user", "content": long_text}]})
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    n_prompt = client.post("/tokenize", json={"messages": [{"role": "user", "content": long_text}]}).json()["count"]
    assert str(n_prompt) in err["message"]
    # an explicit max_tokens that does not fit next to the prompt is refused, not clamped
    prompt = [5] * 230
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 64})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"


# ---------------------------------------------------------------------------- errors: 404 / 413 / 429 / 503 / 504

def test_404_route_and_model(client: TestClient) -> None:
    r = client.post("/nope", json={})
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": USER_HI})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = client.get("/chat")
    assert r.status_code == 405 and "error" in r.json()


def test_413_body_too_large(client: TestClient) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 1_100_000}]}
    r = client.post("/chat", json=big)
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_429_when_full_with_retry_after(client: TestClient) -> None:
    engine_client = client.app.state.seedling.client
    held = engine_client.reserve(engine_client.admission_limit)
    try:
        r = client.post("/chat", json={"messages": USER_HI})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert error_of(r)["type"] == "overloaded_error"
        r = client.post("/chat", json={"messages": USER_HI, "stream": True})
        assert r.status_code == 429
    finally:
        held.release()
    assert client.post("/chat", json={"messages": USER_HI, "max_tokens": 1}).status_code == 200


def test_503_while_draining(client: TestClient) -> None:
    engine_client = client.app.state.seedling.client
    engine_client.begin_drain()
    try:
        assert client.get("/ready").status_code == 503
        assert client.get("/health").status_code == 200
        r = client.post("/chat", json={"messages": USER_HI})
        assert r.status_code == 503 and error_of(r)["code"] == "draining"
    finally:
        engine_client.draining = False
    assert client.get("/ready").status_code == 200


def test_504_deadline(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = client.app.state.seedling.service
    monkeypatch.setattr(svc.settings, "request_timeout_s", 1e-4)
    r = client.post("/chat", json={"messages": USER_HI, "max_tokens": 64, "temperature": 0})
    assert r.status_code == 504 and error_of(r)["type"] == "timeout_error"
    r = client.post("/v1/chat/completions", json={"messages": USER_HI, "max_tokens": 64, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert json.loads(events[-2])["error"]["type"] == "timeout_error" and events[-1] == "[DONE]"
    monkeypatch.undo()
    assert in_flight(client) == 0


def test_401_api_keys(app_checkpoint: Path) -> None:  # noqa: F811
    with make_client(settings_for(app_checkpoint, api_keys=("k1", "k2"))) as c:
        assert c.post("/chat", json={"messages": USER_HI}).status_code == 401
        r = c.post("/v1/chat/completions", json={"messages": USER_HI}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        ok = c.post("/chat", json={"messages": USER_HI, "max_tokens": 1}, headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert c.post("/tokenize", json={"text": "a"}, headers={"X-Api-Key": "k1"}).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert c.get(path).status_code == 200, path


def test_503_before_ready(app_checkpoint: Path) -> None:  # noqa: F811
    import threading

    from app.main import create_app, load_model

    gate = threading.Event()

    def slow_loader(settings):
        gate.wait(30)
        return load_model(settings)

    app = create_app(settings_for(app_checkpoint), loader=slow_loader)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/ready").status_code == 503
        assert c.get("/health").status_code == 200
        r = c.post("/chat", json={"messages": USER_HI})
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready"
        gate.set()


def test_q4_server_answers_concurrent_requests_exactly_as_alone(app_checkpoint: Path) -> None:  # noqa: F811
    """SEEDLING_QUANTIZE=q4 serves through the native forward, whose outputs do not depend on the
    batch: 6 concurrent greedy requests (one streamed) get the tokens each gets alone."""
    with make_client(settings_for(app_checkpoint, quantize="q4")) as c:
        prompts = [f"Count to {i}" for i in range(6)]
        body = {"max_tokens": 10, "temperature": 0}
        alone = [c.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"]
                 for p in prompts]
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda p: c.post("/v1/completions", json={**body, "prompt": p}).json()
                                     ["choices"][0]["text"], prompts))
        assert together == alone
        r = c.post("/v1/completions", json={**body, "prompt": prompts[0], "stream": True})
        events = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
        assert "".join(e["choices"][0]["text"] for e in events) == alone[0]
        # /classify scores labels through the engine's scratch-cache scoring path, natively too
        labels = ["lost_or_stolen_card", "card_arrival", "exchange_rate"]
        scored = c.post("/classify", json={"text": "I lost my card", "labels": labels}).json()["scores"]
        assert math.isclose(sum(x["score"] for x in scored), 1.0, rel_tol=1e-6)
        assert c.post("/classify", json={"text": "I lost my card", "labels": labels}).json()["scores"] == scored


def test_default_serves_q4_and_falls_back_clearly_without_avx2(app_checkpoint: Path,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SEEDLING_QUANTIZE defaults to auto: q4 on the best kernels this CPU runs, reported by /ready.
    On a CPU without AVX2 (simulated: SEEDLING_CPU_ISA=generic) auto serves through torch, and an
    explicit q4 runs the portable kernels, which give the tokens the SIMD kernels give."""
    from model import native

    body = {"prompt": "Count to 5", "max_tokens": 10, "temperature": 0}
    with make_client(settings_for(app_checkpoint)) as c:
        assert c.get("/ready").json()["serving_path"] == f"native-q4-{native.isa()}"
        fast = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    monkeypatch.setenv("SEEDLING_CPU_ISA", "generic")
    with make_client(settings_for(app_checkpoint)) as c:
        assert c.get("/ready").json()["serving_path"] == "torch-fp32"
        assert c.post("/v1/completions", json=body).status_code == 200
    with make_client(settings_for(app_checkpoint, quantize="q4")) as c:
        assert c.get("/ready").json()["serving_path"] == "native-q4-generic"
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == fast
