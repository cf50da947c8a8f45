"""The official `openai` client against the app, unchanged (its httpx client is our TestClient)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from tests.test_app_support import USER_HI, app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    with make_client(settings_for(app_checkpoint, api_keys=("sk-test",))) as c:
        yield c


@pytest.fixture(scope="module")
def oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=client, max_retries=0)


def test_models(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list().data] == ["tiny"]


def test_chat_completion(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="tiny", messages=USER_HI, max_tokens=5, temperature=0, seed=1,
                                       logprobs=True, top_logprobs=3, stop=["\n\n\n\n"])
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 5 and resp.usage.prompt_tokens > 0
    assert len(choice.logprobs.content[0].top_logprobs) == 3


def test_chat_completion_stream(oai: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", messages=USER_HI, max_completion_tokens=6, temperature=0,
                  extra_body={"ignore_eos": True})
    stream = oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    plain = oai.chat.completions.create(**kwargs)
    assert text == plain.choices[0].message.content


def test_completions(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(model="tiny", prompt=["Hello", "World"], max_tokens=3, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    chunks = list(oai.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_map_to_openai_exceptions(client: TestClient, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="tiny", messages=USER_HI, n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=USER_HI)
    bad_key = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    engine_client = client.app.state.seedling.client
    held = engine_client.reserve(engine_client.admission_limit)
    try:
        with pytest.raises(openai.RateLimitError):
            oai.chat.completions.create(model="tiny", messages=USER_HI)
    finally:
        held.release()
