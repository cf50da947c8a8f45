"""/extract: text (or a list of texts) + a JSON schema -> objects valid for the schema, batched like the
other task endpoints; the prompt lives in model.tasks (one definition)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from model import tasks
from tests.schema_suite import SCHEMAS, invalid
from tests.test_app_support import make_client, settings_for

ORDER = {"type": "object", "properties": {
    "order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
    "intent": {"enum": ["refund", "cancel", "track"]},
    "date": {"type": "string", "format": "date"},
    "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "object", "properties": {
        "sku": {"type": "string", "maxLength": 6}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}},
    "required": ["order_id", "intent", "date", "items"]}
TEXTS = ["Order AB-1234 from 2026-11-30: two mugs arrived broken, I want my money back.",
         "你好, where is my parcel? Order CD-9876.", "Cancel XY-0001 please."]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the tiny model: see tests/test_structured_output.py


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_sp_tokenizer: Any) -> Iterator[TestClient]:
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    config = preset("test", vocab_size=tiny_sp_tokenizer.vocab_size, max_seq_len=2048)
    path = save_checkpoint(tmp_path_factory.mktemp("extract") / "tiny", Transformer(config).init_weights(5).eval(),
                           tiny_sp_tokenizer, {})
    with make_client(settings_for(Path(path), max_model_len=2048, max_tokens_default=300, max_tokens_limit=300,
                                  max_num_seqs=16, max_queued_requests=64, max_batch_items=64)) as c:
        yield c


def test_extract_messages_show_the_schema_and_the_text() -> None:
    [message] = tasks.extract_messages("  Order AB-1234.  ", ORDER)
    assert message["role"] == "user" and message["content"].endswith("Text: Order AB-1234.")
    assert json.dumps(ORDER, separators=(",", ":")) in message["content"]
    with pytest.raises(tasks.TaskError) as err:
        tasks.extract_messages(" ", ORDER)
    assert err.value.param == "text"


def test_one_text_gives_one_valid_object(client: TestClient) -> None:
    r = client.post("/extract", json={"text": TEXTS[0], "schema": ORDER})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "stop" and invalid(json.dumps(body["data"]), ORDER) is None
    assert body["model"] == "tiny" and body["usage"]["completion_tokens"] > 0


def test_a_list_of_texts_is_extracted_in_one_batch(client: TestClient) -> None:
    """Every schema of the suite, three texts each at temperature 1: every object validates."""
    for i, schema in enumerate(SCHEMAS):
        r = client.post("/extract", json={"text": TEXTS, "schema": schema, "temperature": 1.0, "seed": i})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["finish_reason"] for x in body["results"]] == ["stop"] * 3, i
        assert [invalid(json.dumps(x["data"]), schema) for x in body["results"]] == [None] * 3, i
        assert body["usage"]["completion_tokens"] == sum(x["usage"]["completion_tokens"] for x in body["results"])


def test_cut_short_by_max_tokens_is_null_data(client: TestClient) -> None:
    body = client.post("/extract", json={"text": TEXTS[0], "schema": ORDER, "max_tokens": 3}).json()
    assert body["data"] is None and body["finish_reason"] == "length"


@pytest.mark.parametrize("body, param, why", [
    ({"text": "x", "schema": {"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}]}}}},
     "schema", "schema.properties.a: oneOf is not supported"),
    ({"text": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}},
     "schema", "no-such-type"),
    ({"text": "x", "schema": [1]}, "schema", ""),
    ({"text": "x"}, "schema", ""),
    ({"text": "  ", "schema": ORDER}, "text", "non-empty"),
    ({"text": [], "schema": ORDER}, "text", ""),
    ({"text": "x", "schema": ORDER, "shema": 1}, "shema", ""),
])
def test_bad_input_is_a_400_naming_the_field(client: TestClient, body: dict[str, Any], param: str, why: str) -> None:
    r = client.post("/extract", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and why in error["message"], error
