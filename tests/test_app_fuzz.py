"""Schemathesis fuzz of the app's own OpenAPI schema: no 5xx, no schema violations; and a Hypothesis fuzz
of abusive requests (headers, logit_bias, stop, labels, list inputs, several at once): no 5xx.

Positive cases (schema-valid requests) must get a documented status and a body matching the
schema; negative cases (schema-invalid requests) must get a documented 4xx, never a 5xx. A bounded
number of examples per operation keeps it to well under a minute on the tiny checkpoint.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_app_support import app_checkpoint, in_flight, make_client, settings_for  # noqa: F401 - fixtures

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 8}


@pytest.fixture(scope="module")
def client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    # small limits keep generated requests fast; a large queue so fuzzing never hits 429
    with make_client(settings_for(app_checkpoint, max_tokens_default=4, max_tokens_limit=16,
                                  max_queued_requests=64, max_batch_items=4)) as c:
        yield c


def operations(client: TestClient) -> list:
    schema = schemathesis.openapi.from_dict(client.app.openapi())
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_fuzz_openapi(client: TestClient, mode: GenerationMode) -> None:
    ops = operations(client)
    assert {op.path for op in ops} >= {"/chat", "/summarize", "/translate", "/classify", "/v1/chat/completions",
                                       "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                                       "/ready", "/metrics"}
    for op in ops:
        if mode is GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to make invalid in a parameterless GET

        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            kwargs.pop("session", None)
            response = client.request(**kwargs)
            case.validate_response(response, checks=CHECKS)

        check()


# ---------------------------------------------------------------------------- hand-written abuse fuzz
# The schema fuzz above sends schema-shaped bodies with fixed headers. This one varies what the schema
# does not describe: headers (request ids that collide, keys, content types), the values of logit_bias,
# stop, labels and list inputs, and several requests at once. Every response must be < 500, and no
# stream may carry an internal error.

KEY = "fuzz-key"


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` three times in four, so most requests get past validation and reach the engine."""
    return st.integers(0, 3).flatmap(lambda i: valid if i else invalid)


WORD = st.text("abc xyz.é中", min_size=1, max_size=12)
TOKEN_ID = st.integers(0, 300).map(str)
BAD_TOKEN_ID = st.one_of(st.integers(-3, 10**6).map(str), st.sampled_from(["²", "٣", " 5", "5.0", "0x1", "", "1" * 30]),
                         st.text(max_size=4))
LOGIT_BIAS = mostly(st.none() | st.dictionaries(TOKEN_ID, st.floats(-100, 100), max_size=4),
                    st.dictionaries(BAD_TOKEN_ID, st.floats(-150, 150) | st.integers(-100, 100), max_size=4)
                    | st.just({str(i): 1 for i in range(301)}) | st.just("not a dict"))
STOP = mostly(st.none() | WORD | st.lists(WORD, max_size=3),
              st.lists(st.text(max_size=6), max_size=18) | st.just(["x" * 257]) | st.just([1, 2]) | st.just(""))
PROMPT = mostly(WORD | st.lists(WORD, min_size=1, max_size=3) | st.lists(st.integers(0, 300), min_size=1, max_size=6),
                st.lists(st.integers(-2, 10**6), max_size=6) | st.lists(st.lists(st.integers(-2, 600), max_size=4),
                                                                         max_size=3)
                | st.just([]) | st.integers() | st.lists(WORD, min_size=5, max_size=6))
LABELS = mostly(st.lists(WORD, min_size=2, max_size=3, unique=True),
                st.none() | st.lists(st.text(max_size=12), max_size=5) | st.just([]) | st.just(["a"] * 300))
MESSAGE = st.fixed_dictionaries({"role": mostly(st.just("user"), st.sampled_from(["system", "assistant", "tool", ""])),
                                 "content": mostly(WORD, st.text(max_size=20) | st.none())})
MESSAGES = mostly(st.lists(MESSAGE, min_size=1, max_size=2), st.just([]) | WORD)
SAMPLING = {"max_tokens": mostly(st.integers(1, 4), st.none() | st.integers(-1, 20)),
            "temperature": mostly(st.floats(0, 2), st.floats(-1, 3) | st.just("hot")),
            "stop": STOP, "stream": st.booleans()}


def _body(path: str, draw) -> dict:
    common = {k: draw(v) for k, v in SAMPLING.items()}
    if path == "/v1/chat/completions":
        return {**common, "messages": draw(MESSAGES), "logit_bias": draw(LOGIT_BIAS)}
    if path == "/v1/completions":
        return {**common, "prompt": draw(PROMPT), "logit_bias": draw(LOGIT_BIAS)}
    if path == "/chat":
        return {**common, "messages": draw(mostly(MESSAGES, st.lists(MESSAGES, max_size=3)))}
    if path == "/summarize":
        return {**common, "text": draw(PROMPT)}
    return {"text": draw(PROMPT), "labels": draw(LABELS), "multi_label": draw(st.booleans())}


@st.composite
def abusive_request(draw) -> dict:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/chat", "/summarize", "/classify"]))
    body = {k: v for k, v in _body(path, draw).items() if v is not None}
    headers = {"content-type": draw(mostly(st.just("application/json"), st.sampled_from(
        ["application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded", ""])))}
    rid = draw(st.one_of(st.none(), st.sampled_from(["atk", "atk-1", "cmpl-atk-1", "chatcmpl-atk", "x" * 200]),
                         st.text(st.characters(codec="ascii"), max_size=20)))
    if rid is not None:
        headers["x-request-id"] = rid
    auth = draw(mostly(st.sampled_from(["bearer", "x-api-key"]), st.sampled_from(["wrong", "none", "garbage"])))
    headers.update({"bearer": {"authorization": f"Bearer {KEY}"}, "x-api-key": {"x-api-key": KEY},
                    "wrong": {"authorization": "Bearer nope"}, "none": {},
                    "garbage": {"authorization": "Basic %%%"}}[auth])
    content = json.dumps(body).encode()
    if draw(st.integers(0, 9)) == 0:  # now and then: truncated JSON
        content = content[:draw(st.integers(0, len(content)))]
    return {"path": path, "content": content, "headers": headers}


@pytest.fixture(scope="module")
def keyed_client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    with make_client(settings_for(app_checkpoint, max_tokens_default=4, max_tokens_limit=16, max_queued_requests=8,
                                  max_batch_items=4, api_keys=(KEY,))) as c:
        yield c


def test_fuzz_abusive_requests_never_get_a_5xx(keyed_client: TestClient) -> None:
    seen: collections.Counter = collections.Counter()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(abusive_request(), min_size=1, max_size=3))
    def check(batch: list[dict]) -> None:
        with ThreadPoolExecutor(len(batch)) as pool:  # at once: ids collide, admission is shared
            responses = list(pool.map(lambda r: keyed_client.post(r["path"], content=r["content"],
                                                                  headers=r["headers"]), batch))
        for request, response in zip(batch, responses, strict=True):
            seen[response.status_code] += 1
            assert response.status_code < 500, (request, response.text[:500])
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                assert "internal_error" not in response.text, (request, response.text[-500:])
            if "x-request-id" in request["headers"] and response.status_code != 401:
                rid = request["headers"]["x-request-id"]
                assert response.headers["x-request-id"] == rid or not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid)

    check()
    assert seen[200] and seen[400] and seen[401], seen  # the fuzz reached the engine, the validation and auth
    assert keyed_client.get("/health").status_code == 200
    assert in_flight(keyed_client) == 0
