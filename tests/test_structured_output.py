"""Structured output (model.grammar): every constrained output parses and validates against its schema,
on the random tiny model (whose unconstrained output is noise, so the grammar does all the work)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema_rs
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from model.engine import EngineConfig, LLMEngine
from model.grammar import GrammarError, ResponseFormat
from model.inference import load_for_serving
from model.sampling import SamplingError, SamplingParams
from model.tokenizer import render_chat
from tests.test_app_support import USER_HI, app_checkpoint, make_client, settings_for  # noqa: F401 - fixtures

OBJ = "object"
SCHEMAS: list[dict[str, Any]] = [
    {"type": OBJ, "properties": {"intent": {"enum": ["refund", "cancel", "track"]}}, "required": ["intent"]},
    {"type": OBJ, "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": OBJ, "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]},
    {"type": OBJ, "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}}, "required": ["x"]},
    {"type": OBJ, "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"}}, "required": ["id"]},
    {"type": OBJ, "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]},
    {"type": OBJ, "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                          "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": OBJ, "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "minItems": 2, "maxItems": 4}}, "required": ["xs"]},
    {"type": OBJ, "properties": {"user": {"type": OBJ, "properties": {
        "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"]}}, "required": ["user"]},
    {"type": OBJ, "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                 {"type": "null"}]}}, "required": ["v"]},
    {"type": OBJ, "properties": {"v": {"anyOf": [{"enum": ["yes", "no"]}, {"type": "boolean"}]}}, "required": ["v"]},
    {"type": OBJ, "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3},
                                 "b": {"type": "string", "maxLength": 4}}, "required": ["a"]},  # b optional
    {"type": OBJ, "properties": {"date": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"]},
    {"type": OBJ, "properties": {"level": {"enum": [1, 2, 3]}, "flag": {"const": "on"}},
     "required": ["level", "flag"]},
    {"type": OBJ, "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": OBJ, "properties": {"sku": {"type": "string", "pattern": "^[a-z]{3}$"},
                                    "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"type": OBJ, "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
     "required": ["p"]},
    {"type": OBJ, "properties": {"code": {"type": "string", "pattern": "^(ok|err)[0-9]$"}}, "required": ["code"]},
    {"type": OBJ, "properties": {"pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": ["l", "r"]}],
                                          "items": False, "minItems": 2}}, "required": ["pair"]},
    {"type": OBJ, "properties": {"kind": {"enum": ["order", "ticket"]}, "ref": {"anyOf": [
        {"type": "string", "pattern": "^O[0-9]{3}$"}, {"type": "integer", "minimum": 100, "maximum": 999}]}},
     "required": ["kind", "ref"]},
    {"type": OBJ, "properties": {"m": {"type": OBJ, "properties": {"k": {"type": OBJ, "properties": {
        "z": {"type": "boolean"}}, "required": ["z"]}}, "required": ["k"]}}, "required": ["m"]},
    {"type": OBJ, "properties": {"score": {"type": "integer", "minimum": -10, "maximum": 10},
                                 "note": {"type": "string", "maxLength": 6}}, "required": ["score", "note"]},
    {"type": OBJ, "properties": {"e": {"type": "array", "items": {"type": "boolean"}, "maxItems": 0}},
     "required": ["e"]},
    {"type": OBJ, "properties": {"lang": {"enum": ["en", "de", "fr", "zh"]},
                                 "conf": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["lang", "conf"]},
    {"type": OBJ, "properties": {"opt1": {"type": "boolean"}, "opt2": {"type": "integer", "minimum": 0,
                                                                       "maximum": 1}}},  # nothing required
    {"type": OBJ, "$defs": {"pt": {"type": OBJ, "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                                   "required": ["x"]}},
     "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"]},
    {"type": OBJ, "properties": {"s": {"type": "string", "pattern": "^[0-9]{2,3}$"}}, "required": ["s"]},
]
PROMPTS = ["Extract the fields as JSON:", "你好, order 42 is late."]


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> Any:
    return load_for_serving(tiny_checkpoint)


def _engine(served: Any, quantize: str | None = None, max_num_seqs: int = 16) -> LLMEngine:
    model = served.model if quantize is None else load_for_serving(served.path, quantize=quantize).model
    return LLMEngine(model, served.tokenizer, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=256))


def _params(schema: dict[str, Any] | None, temperature: float, seed: int = 0, max_tokens: int = 200
            ) -> SamplingParams:
    fmt = ResponseFormat.json_object() if schema is None else ResponseFormat.json_schema(schema)
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, response_format=fmt)


def _invalid(text: str, schema: dict[str, Any] | None) -> str | None:
    """None when text parses (and validates against schema), else why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"does not parse ({e}): {text[:80]!r}"
    if schema is None:
        return None if isinstance(value, dict) else f"not an object: {text[:80]!r}"
    errors = [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(value)]
    return f"{errors[0]}: {text[:80]!r}" if errors else None


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


def test_json_object_always_parses_greedy(served: Any) -> None:
    """Greedy only on the random model: sampled at 1.0 its unbounded keys can outrun max_tokens
    (finish_reason "length"); the slow test below samples the real model at 1.0."""
    engine = _engine(served)
    outs = engine.generate([served.tokenizer.encode(p) for p in PROMPTS * 2],
                           [_params(None, 0.0, seed=i) for i in range(4)])
    assert [_invalid(o.text, None) for o in outs] == [None] * 4


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
    assert [_invalid(o.text, None) for o in outs[:4]] == [None] * 4
    assert [_invalid(o.text, schema) for o in outs[4:]] == [None] * 4


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


def test_ignore_eos_with_response_format_is_refused() -> None:
    with pytest.raises(SamplingError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, response_format=ResponseFormat.json_object())


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def client(app_checkpoint: Path) -> Iterator[TestClient]:  # noqa: F811
    with make_client(settings_for(app_checkpoint, api_keys=("sk-test",), max_tokens_limit=200)) as c:
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


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("i", [4, 8, 14, 18])
def test_chat_response_format_streamed_and_not(oai: openai.OpenAI, stream: bool, i: int) -> None:
    kwargs: dict[str, Any] = dict(model="tiny", messages=USER_HI, response_format=_schema_format(i),
                                  temperature=1.0, seed=i, max_tokens=200)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    else:
        text = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert _invalid(text, SCHEMAS[i]) is None


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
