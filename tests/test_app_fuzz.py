"""Schemathesis fuzz of the app's own OpenAPI schema: no 5xx, no schema violations.

Positive cases (schema-valid requests) must get a documented status and a body matching the
schema; negative cases (schema-invalid requests) must get a documented 4xx, never a 5xx. A bounded
number of examples per operation keeps it to well under a minute on the tiny checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_app_support import app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures

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
