"""Structured output (model.grammar): every constrained output parses and validates against its schema,
on the random tiny model (whose unconstrained output is noise, so the grammar does all the work).

The suite (tests/schema_suite.py: 62 schemas x 2 prompts) runs greedy and at temperature 1.0 in the engine,
and streamed and not through the HTTP API; the tiny model runs on one torch thread (two threads only add
barrier waits at this size, and ~10x on a loaded machine)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import openai
import pytest
import torch
import xgrammar
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from model import grammar
from model.engine import EngineConfig, FinishReason, LLMEngine
from model.grammar import GrammarError, ResponseFormat
from model.inference import load_for_serving
from model.sampling import SamplingError, SamplingParams
from model.tokenizer import render_chat
from tests.schema_suite import PROMPTS, SCHEMAS
from tests.schema_suite import invalid as _invalid
from tests.test_app_support import USER_HI, app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> Any:
    return load_for_serving(tiny_checkpoint)


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> None:
    """The tiny model on one torch thread (conftest restores the session's count for the next test)."""
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)


def _engine(served: Any, quantize: str | None = None, max_num_seqs: int = 16) -> LLMEngine:
    model = served.model if quantize is None else load_for_serving(served.path, quantize=quantize).model
    return LLMEngine(model, served.tokenizer, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=256))


def _params(schema: dict[str, Any] | None, temperature: float, seed: int = 0, max_tokens: int = 200
            ) -> SamplingParams:
    fmt = ResponseFormat.json_object() if schema is None else ResponseFormat.json_schema(schema)
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, response_format=fmt)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schema_suite_outputs_validate(served: Any, temperature: float) -> None:
    """len(SCHEMAS) x len(PROMPTS) requests, decoded together: each parses, validates and ends on a stop."""
    engine = _engine(served)
    cases = [(s, p) for s in SCHEMAS for p in PROMPTS]
    assert len(cases) >= 50
    outs = engine.generate([served.tokenizer.encode(p) for _, p in cases],
                           [_params(s, temperature, seed=i) for i, (s, _) in enumerate(cases)])
    bad = [(i, why) for i, ((s, _), o) in enumerate(zip(cases, outs, strict=True))
           if (why := _invalid(o.text, s)) or o.finish_reason.value != "stop"]
    assert not bad, bad[:5]


def test_suite_outputs_do_not_depend_on_batch_mates(served: Any) -> None:
    """Constrained requests (every 8th schema of the suite, seeded T=1) and unconstrained ones decoded
    together give each request the tokens it gets alone."""
    prompt = served.tokenizer.encode(PROMPTS[0])
    plain = [SamplingParams(max_tokens=24, temperature=1.0, seed=7), SamplingParams(max_tokens=16, temperature=0.0)]
    params = [_params(s, 1.0, seed=i) for i, s in enumerate(SCHEMAS[::8])] + plain
    together = _engine(served).generate([prompt] * len(params), params)
    alone = [_engine(served, max_num_seqs=1).generate([prompt], [p])[0] for p in params]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(_invalid(o.text, s) is None for o, s in zip(together, SCHEMAS[::8], strict=False))


def test_json_object_always_parses_greedy_and_sampled_within_any_budget(served: Any) -> None:
    """On the random model a sampled key or string never ends by itself: within its last CLOSE_WITHIN
    tokens the output is closed (model.grammar.ClosingTiers), so it parses whatever the budget."""
    engine = _engine(served)
    prompts = [served.tokenizer.encode(p) for p in PROMPTS * 2]
    outs = engine.generate(prompts, [_params(None, 0.0, seed=i) for i in range(4)])
    assert [_invalid(o.text, None) for o in outs] == [None] * 4
    for budget in (8, 30, 90):
        sampled = engine.generate(prompts * 2, [_params(None, 1.0, seed=i, max_tokens=budget) for i in range(8)])
        assert [_invalid(o.text, None) for o in sampled] == [None] * 8, budget
        assert all(o.finish_reason == FinishReason.STOP for o in sampled)


@pytest.mark.slow
def test_default_model_json_object_and_schema_at_temperature_1(smollm2_checkpoint: Path) -> None:
    served = load_for_serving(smollm2_checkpoint, quantize="q4")
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=8, max_model_len=512))
    chats = [[{"role": "user", "content": f"Describe order {n} as JSON."}] for n in range(4)]
    prompts = [render_chat(served.tokenizer, c, add_generation_prompt=True).ids for c in chats]
    schema = SCHEMAS[14]
    params = [_params(None, 1.0, seed=i, max_tokens=150) for i in range(4)]
    params += [_params(schema, 1.0, seed=i, max_tokens=150) for i in range(4)]
    outs = engine.generate(prompts * 2, params)
    # json_object bounds nothing: without closing, seeds 1 and 3 ran past 150 tokens and were cut
    assert [(o.finish_reason, _invalid(o.text, None)) for o in outs[:4]] == [(FinishReason.STOP, None)] * 4
    assert [(o.finish_reason, _invalid(o.text, schema)) for o in outs[4:]] == [(FinishReason.STOP, None)] * 4


def test_q4_path_outputs_validate(served: Any) -> None:
    engine = _engine(served, quantize="q4")
    cases = [(s, PROMPTS[0]) for s in SCHEMAS[:10]]
    outs = engine.generate([served.tokenizer.encode(p) for _, p in cases],
                           [_params(s, 1.0, seed=i) for i, (s, _) in enumerate(cases)])
    assert [_invalid(o.text, s) for (s, _), o in zip(cases, outs, strict=True)] == [None] * len(cases)


def test_constrained_tokens_do_not_depend_on_batch_mates(served: Any) -> None:
    """A constrained request decoded alone equals the same request beside unconstrained and other
    constrained ones (greedy and seeded sampling)."""
    prompt = served.tokenizer.encode(PROMPTS[0])
    for temperature in (0.0, 1.0):
        target = _params(SCHEMAS[14], temperature, seed=3)
        alone = _engine(served).generate([prompt], [target])[0].token_ids
        mates = [SamplingParams(max_tokens=30, temperature=1.0, seed=9), _params(SCHEMAS[8], 1.0, seed=5),
                 SamplingParams(max_tokens=12, temperature=0.0)]
        together = _engine(served).generate([prompt] * 4, [mates[0], target, mates[1], mates[2]])
        assert together[1].token_ids == alone
        assert _invalid(together[2].text, SCHEMAS[8]) is None


def test_unconstrained_output_unchanged_by_constrained_batch_mate(served: Any) -> None:
    prompt = served.tokenizer.encode(PROMPTS[1])
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = _engine(served).generate([prompt], [plain])[0].token_ids
    together = _engine(served).generate([prompt, prompt], [_params(SCHEMAS[0], 1.0), plain])
    assert together[1].token_ids == alone and len(alone) == 20


def test_compiled_grammars_are_cached_per_schema(served: Any) -> None:
    engine = _engine(served)
    engine.generate([[5, 6]], [_params(SCHEMAS[3], 0.0)])
    compiler = engine._grammars
    first = compiler.compile(ResponseFormat.json_schema(dict(SCHEMAS[3])))
    assert compiler.compile(ResponseFormat.json_schema(json.loads(json.dumps(SCHEMAS[3])))) is first
    assert compiler.compile(ResponseFormat.json_schema(SCHEMAS[4])) is not first


@pytest.mark.parametrize("schema, why", [
    ({"type": "object", "properties": {"a": {"type": "no-such-type"}}}, "no-such-type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ([1, 2], "must be a JSON object"),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a+$", "maxLength": 3}}},
     "properties.s: pattern combined with minLength/maxLength is not supported"),
])
def test_bad_schema_is_a_sampling_error_naming_response_format(served: Any, schema: Any, why: str) -> None:
    engine = _engine(served)
    with pytest.raises(GrammarError) as err:
        fmt = ResponseFormat.json_schema(schema)
        engine.add_request("bad", [5, 6], SamplingParams(response_format=fmt))
    assert isinstance(err.value, SamplingError) and err.value.param == "response_format"
    assert why in str(err.value) and not engine.has_unfinished()


UNSUPPORTED_CASES = [  # (schema, what the message names): xgrammar would accept each and not enforce it
    *[({"type": "object", "properties": {"a": {key: {} if key != "uniqueItems" else True}}}, key)
      for key in grammar.UNSUPPORTED],
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}, {"maximum": 3}]}}}, "allOf"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 0.5}}}, "multipleOf"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date", "maxLength": 3}}}, "format"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date", "pattern": "^2"}}}, "format"),
]


@pytest.mark.parametrize("schema, keyword", UNSUPPORTED_CASES)
def test_unsupported_keywords_are_refused_by_name(client: TestClient, schema: Any, keyword: str) -> None:
    with pytest.raises(GrammarError, match=f"json_schema.schema.properties.a: {keyword}"):
        ResponseFormat.json_schema(schema)
    r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer sk-test"}, json={
        "messages": USER_HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert keyword in r.json()["error"]["message"]


def test_keyword_names_inside_properties_are_not_keywords() -> None:
    schema = {"type": "object", "properties": {"not": {"type": "boolean"}, "contains": {"enum": [1]}}}
    assert json.loads(ResponseFormat.json_schema(schema).schema_json)["properties"] == schema["properties"]


def _random_walk(compiled: Any, rng: random.Random, vocab: list[bytes], steps: int = 120) -> bytes | None:
    """One random path through a grammar over a one-byte-per-token vocabulary (id 256: stop)."""
    constraint, mask = compiled.start(), xgrammar.allocate_token_bitmask(1, len(vocab))
    out = []
    for _ in range(steps):
        constraint.fill_mask(mask, 0)
        allowed = ((mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten()
        ids = allowed[:len(vocab)].nonzero().flatten().tolist()
        if 256 in ids and (len(ids) == 1 or rng.random() < 0.3):
            return b"".join(out)
        token = rng.choice([i for i in ids if i != 256])
        constraint.advance(token)
        out.append(vocab[token])
    return None


@pytest.mark.parametrize("schema", [
    *[{"type": "string", "format": f} for f in grammar.FORMAT_PATTERNS],
    {"type": "string", "pattern": "^a(x[0-9]{1,3})?b$"},  # xgrammar alone also accepts "a1b"
    {"type": "string", "pattern": "^(-[0-9]+)?(\\.[a-z]{1,2})?$"},
    {"type": "string", "maxLength": 4},  # xgrammar alone lets ED A0-BF (a surrogate) through: not UTF-8
    {"type": "string", "pattern": "^[^a]{1,3}$"},  # ... and E0 80-9F (overlong) in negated classes
])
def test_loose_formats_and_optional_groups_compile_exactly(schema: dict[str, Any]) -> None:
    """Random paths through the compiled grammar (formats rewritten as exact patterns, `(...)?` as
    `(...){0,1}`, the UTF-8 guard) always validate, formats checked (xgrammar's own let 2026-09-31,
    12:00:60 through) and strictly decoded (a U+FFFD per stray byte would break maxLength)."""
    vocab = [bytes([b]) for b in range(256)] + [b""]
    tok = SimpleNamespace(vocab_size=257, token_bytes=lambda i: vocab[i], stop_ids=frozenset([256]))
    compiled = grammar.GrammarCompiler(tok).compile_json_schema(schema)  # type: ignore[arg-type]
    rng = random.Random(0)
    texts = [t for _ in range(60) if (t := _random_walk(compiled, rng, vocab)) is not None]
    assert len(texts) >= 40
    assert [(t, why) for t in texts if (why := _invalid(t.decode(), schema))] == []


@pytest.mark.parametrize("vocab", [150, 160, 170])  # model rows fewer than, equal to, more than the bitmask's
def test_apply_bitmask_numpy_and_torch_paths_agree(vocab: int) -> None:
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(3, 160)
    logits = torch.randn(3, vocab)
    expected = logits.clone()
    expected[:, :min(vocab, 160)].masked_fill_(~bits[:, :vocab], float("-inf"))
    expected[:, 160:] = float("-inf")
    fast, general = logits.clone(), logits.clone().t().contiguous().t()  # contiguous fp32: numpy; else torch
    grammar.apply_bitmask(fast, bitmask)
    grammar.apply_bitmask(general, bitmask)
    assert torch.equal(fast, expected) and torch.equal(general, expected)


def test_ignore_eos_with_response_format_is_refused() -> None:
    with pytest.raises(SamplingError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, response_format=ResponseFormat.json_object())


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    with make_client(settings_for(app_checkpoint, api_keys=("sk-test",), max_tokens_limit=200, max_num_seqs=16,
                                  max_queued_requests=64)) as c:
        yield c


@pytest.fixture(scope="module")
def oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=client, max_retries=0)


class Order(BaseModel):
    intent: Literal["refund", "cancel", "track"]
    qty: int = Field(ge=1, le=5)
    gift: bool


def _schema_format(i: int) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}


def test_openai_parse_helper_returns_the_pydantic_model(oai: openai.OpenAI) -> None:
    for temperature in (0.0, 1.0):
        completion = oai.beta.chat.completions.parse(model="tiny", messages=USER_HI, response_format=Order,
                                                     temperature=temperature, seed=4, max_tokens=100)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Order) and completion.choices[0].finish_reason == "stop"


def _chat_text(oai: openai.OpenAI, i: int, stream: bool) -> str:
    kwargs: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": PROMPTS[i % 2]}],
                                  response_format=_schema_format(i), temperature=1.0, seed=i, max_tokens=200)
    if stream:
        return "".join(c.choices[0].delta.content or ""
                       for c in oai.chat.completions.create(stream=True, **kwargs) if c.choices)
    return oai.chat.completions.create(**kwargs).choices[0].message.content or ""


def test_chat_suite_streamed_and_not(oai: openai.OpenAI) -> None:
    """Every schema of the suite through /v1/chat/completions at T=1, streamed and not, 16 at a time."""
    jobs = [(i, stream) for i in range(len(SCHEMAS)) for stream in (False, True)]
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda job: _chat_text(oai, *job), jobs))
    bad = [(i, stream, why) for (i, stream), text in zip(jobs, texts, strict=True)
           if (why := _invalid(text, SCHEMAS[i]))]
    assert not bad, bad[:5]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_json_object(oai: openai.OpenAI, stream: bool) -> None:
    # greedy: an unbounded key at temperature 1.0 on the random model can outrun max_tokens (the engine
    # tests cover json_object at 1.0); this one checks the plumbing
    kwargs: dict[str, Any] = dict(model="tiny", prompt="JSON:", temperature=0.0, max_tokens=200,
                                  extra_body={"response_format": {"type": "json_object"}})
    if stream:
        text = "".join(c.choices[0].text for c in oai.completions.create(stream=True, **kwargs) if c.choices)
    else:
        text = oai.completions.create(**kwargs).choices[0].text
    assert _invalid(text, None) is None


@pytest.mark.parametrize("response_format, why", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "no-such-type"}}}}}, "no-such-type"),
    ({"type": "json_schema"}, "json_schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {
        "s": {"type": "string", "pattern": "^a$", "minLength": 1}}}}}, "not supported"),
    ({"type": "xml"}, ""),
])
def test_bad_response_format_is_a_400_naming_it(client: TestClient, response_format: Any, why: str) -> None:
    for path, body in (("/v1/chat/completions", {"messages": USER_HI}), ("/v1/completions", {"prompt": "a"})):
        r = client.post(path, json={**body, "response_format": response_format},
                        headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "response_format" in (error["param"] or "") + error["message"] and why in error["message"]
