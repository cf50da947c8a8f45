"""Tool calls (model.tool_calls, app/routes/tool_output.py): the format the model reads and writes, the
grammar that constrains it, and the OpenAI shapes the official client reads, streamed and not.

Acceptance (issue 16): tests/tool_suite.py's 20 prompts with 2-3 tools each, tool_choice="required", on the
random tiny model (the grammar does all the work): every response is a call to a declared tool whose
arguments validate against its schema, read by the `openai` client streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from model import tool_calls
from model.grammar import GrammarCompiler
from model.tokenizer import render_chat
from model.tool_calls import CallParser, ChatTurn, ToolSpec, parse
from tests.schema_suite import invalid
from tests.test_app_support import make_client, settings_for
from tests.tool_suite import CASES, ORDERS, SUPPORT

CALL = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "AB-1234"}}\n</tool_call>'
SPECS = [ToolSpec.build(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
         for t in ORDERS]


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)  # the tiny model: see tests/test_structured_output.py


# ------------------------------------------------------------------------------------------ the format
def _streamed(text: str, step: int) -> tuple[list[tool_calls.Event], list[tool_calls.Call]]:
    parser = CallParser()
    events = [e for i in range(0, len(text), step) for e in parser.feed(text[i:i + step])] + parser.finish()
    return events, parser.calls


@pytest.mark.parametrize("text, content, calls", [
    (CALL, None, [("lookup_order", '{"order_id": "AB-1234"}')]),
    ("Let me check.\n" + CALL + "\n" + CALL.replace("AB", "CD"), "Let me check.",
     [("lookup_order", '{"order_id": "AB-1234"}'), ("lookup_order", '{"order_id": "CD-1234"}')]),
    ("plain answer, no call\n", "plain answer, no call\n", []),
    ("a <tool_call> that is not one", "a <tool_call> that is not one", []),
    ('<tool_call>\n{"name": "f", "arguments": {"s": "a}b\\"c", "n": [1, {"x": []}]}}\n</tool_call>', None,
     [("f", '{"s": "a}b\\"c", "n": [1, {"x": []}]}')]),
])
def test_parser_reads_content_and_calls_whole_or_streamed(text: str, content: str | None,
                                                          calls: list[tuple[str, str]]) -> None:
    parsed = parse(text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls and all(c.complete for c in parsed.calls)
    for step in (1, 3, 7):  # any chunking gives the same content and calls
        events, streamed = _streamed(text, step)
        assert "".join(e.text for e in events if e.kind == "content") == (content or "")
        assert [(c.name, c.arguments) for c in streamed] == calls
        assert [e.text for e in events if e.kind == "call"] == [name for name, _ in calls]


def test_parser_escapes_control_characters_and_keeps_a_cut_off_call() -> None:
    parsed = parse('<tool_call>\n{"name": "f", "arguments": {"s": "a\nb\x01"}}\n</tool_call>')
    assert json.loads(parsed.calls[0].arguments) == {"s": "a\nb\x01"}
    cut = parse('<tool_call>\n{"name": "f", "arguments": {"s": "ab')
    assert cut.content is None and cut.calls[0].arguments == '{"s": "ab' and not cut.calls[0].complete


def test_render_messages_writes_tools_calls_and_results(tiny_sp_tokenizer: Any) -> None:
    turns = [ChatTurn("user", "Where is AB-1234?"),
             ChatTurn("assistant", "", [tool_calls.CallIn("lookup_order", '{"order_id":"AB-1234"}')]),
             ChatTurn("tool", '{"status": "shipped"}')]
    messages = tool_calls.render_messages(turns, SPECS, "Be kind.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[0]["content"].startswith("Be kind.\n\n# Tools") and '"name": "cancel_order"' in messages[0]["content"]
    assert messages[2]["content"] == CALL  # the arguments re-serialized as the model writes them
    assert messages[3]["content"] == '<tool_response>\n{"status": "shipped"}\n</tool_response>'
    own = tool_calls.render_messages([ChatTurn("system", "Own."), turns[0]], SPECS, "Be kind.")
    assert own[0]["content"].startswith("Own.\n\n# Tools") and len(own) == 2
    text = tiny_sp_tokenizer.decode(render_chat(tiny_sp_tokenizer, messages).ids, skip_special=False)
    assert "<|im_start|>tool\n<tool_response>" in text


def _accepts(compiled: Any, tok: Any, text: str) -> bool:
    constraint = compiled.start()
    return all(constraint.matcher.accept_token(t) for t in tok.encode(text))


def test_grammar_auto_allows_text_then_only_well_formed_calls(tiny_sp_tokenizer: Any) -> None:
    compiler = GrammarCompiler(tiny_sp_tokenizer)
    auto = compiler.compile(tool_calls.ToolCallFormat.build(SPECS, required=False))
    required = compiler.compile(tool_calls.ToolCallFormat.build(SPECS, required=True))
    assert _accepts(auto, tiny_sp_tokenizer, "Sure. " + CALL) and _accepts(required, tiny_sp_tokenizer, CALL)
    assert not _accepts(required, tiny_sp_tokenizer, "Sure. " + CALL)  # required: calls only
    for bad in (CALL.replace("lookup_order", "drop_tables"), CALL.replace("AB-1234", "nope"),
                CALL.replace('"order_id"', ' "order_id"')):  # undeclared tool, invalid argument, free whitespace
        assert not _accepts(auto, tiny_sp_tokenizer, "Sure. " + bad)
    again = compiler.compile(tool_calls.ToolCallFormat.build(list(SPECS), required=False))
    assert again is auto  # cached per tool set


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_sp_tokenizer: Any) -> Path:
    """The tiny random model with room for a tools block (up to ~1,300 tokens of the tiny tokenizer)."""
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.transformer import Transformer

    config = preset("test", vocab_size=tiny_sp_tokenizer.vocab_size, max_seq_len=4096)
    path = tmp_path_factory.mktemp("tools_ckpt") / "tiny-tools"
    return Path(save_checkpoint(path, Transformer(config).init_weights(11).eval(), tiny_sp_tokenizer, {}))


@pytest.fixture(scope="module")
def client(long_checkpoint: Path) -> Iterator[TestClient]:
    with make_client(settings_for(long_checkpoint, max_model_len=4096, max_tokens_limit=800, max_num_seqs=16,
                                  max_queued_requests=64, max_batch_items=64)) as c:
        yield c


@pytest.fixture(scope="module")
def oai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)


def _declared(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"]["parameters"] for t in tools}


def _bad_calls(calls: list[tuple[str, str]], tools: list[dict[str, Any]]) -> list[str]:
    schemas = _declared(tools)
    return [f"{name}: {args}" for name, args in calls
            if name not in schemas or invalid(args, schemas[name]) is not None]


def _call(oai: openai.OpenAI, i: int, stream: bool, **extra: Any) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(finish_reason, [(name, arguments)], call ids) of CASES[i], read by the openai client."""
    question, tools = CASES[i]
    kwargs: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": question}], "tools": tools,
                              "temperature": 1.0, "seed": i, "max_tokens": 800, **extra}
    if not stream:
        choice = oai.chat.completions.create(**kwargs).choices[0]
        calls = choice.message.tool_calls or []
        return choice.finish_reason, [(c.function.name, c.function.arguments) for c in calls], [c.id for c in calls]
    parts: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in oai.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:  # OpenAI's recipe: accumulate by index
            part = parts.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            part["id"] += d.id or ""
            part["name"] += d.function.name or "" if d.function else ""
            part["arguments"] += d.function.arguments or "" if d.function else ""
    ordered = [parts[k] for k in sorted(parts)]
    return finish, [(p["name"], p["arguments"]) for p in ordered], [p["id"] for p in ordered]


@pytest.mark.parametrize("parallel", [False, None])
def test_required_always_calls_a_declared_tool_with_valid_arguments(oai: openai.OpenAI, parallel: bool | None
                                                                      ) -> None:
    """The 20 prompts x streamed and not, tool_choice="required", 16 requests at a time. parallel_tool_calls
    false: exactly one call, complete and valid. The default (true): the random model may keep calling until
    max_tokens; then only the last call is cut short, every call before it is complete and valid."""
    extra: dict[str, Any] = {"tool_choice": "required"}
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    jobs = [(i, stream) for i in range(len(CASES)) for stream in (False, True)]
    assert len({i for i, _ in jobs}) >= 20 and all(2 <= len(CASES[i][1]) <= 3 for i, _ in jobs)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: _call(oai, job[0], job[1], **extra), jobs))
    for (i, stream), (finish, calls, ids) in zip(jobs, results, strict=True):
        assert len(set(ids)) == len(ids) and all(x.startswith("call_") for x in ids)
        if parallel is False:
            assert finish == "tool_calls" and len(calls) == 1, (i, stream, finish)
        complete = calls if finish == "tool_calls" else calls[:-1]
        assert finish in ("tool_calls", "length") and complete, (i, stream, finish)
        assert _bad_calls(complete, CASES[i][1]) == [], (i, stream)


def test_named_tool_choice_calls_that_tool(oai: openai.OpenAI) -> None:
    for stream in (False, True):
        finish, calls, _ = _call(oai, 5, stream, tool_choice={"type": "function", "function": {"name": "send_email"}})
        assert finish == "tool_calls" and [name for name, _ in calls] == ["send_email"]
        assert _bad_calls(calls, SUPPORT) == []


def test_auto_and_none(oai: openai.OpenAI) -> None:
    """auto: text or calls, any calls well formed; none: text, and the tools are not in the prompt."""
    for stream in (False, True):
        finish, calls, _ = _call(oai, 0, stream, tool_choice="auto", max_tokens=40)
        assert finish in ("stop", "length", "tool_calls") and _bad_calls(calls, ORDERS) == []
    messages = [{"role": "user", "content": CASES[0][0]}]
    with_tools = oai.chat.completions.create(model="tiny", messages=messages, tools=ORDERS, max_tokens=4)
    none = oai.chat.completions.create(model="tiny", messages=messages, tools=ORDERS, tool_choice="none", max_tokens=4)
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    assert none.usage.prompt_tokens + 300 < with_tools.usage.prompt_tokens


def test_tool_results_round_trip(oai: openai.OpenAI) -> None:
    """A call the server returned, and the tool's answer, go back into the next request's prompt."""
    first = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CASES[0][0]}],
                                        tools=ORDERS, tool_choice="required", parallel_tool_calls=False,
                                        max_tokens=300, seed=1)
    call = first.choices[0].message.tool_calls[0]
    history = [{"role": "user", "content": CASES[0][0]}, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'}]
    second = oai.chat.completions.create(model="tiny", messages=history, tools=ORDERS, max_tokens=8)
    grown = second.usage.prompt_tokens - first.usage.prompt_tokens
    assert grown >= first.usage.completion_tokens  # the call and the result are in the prompt


@pytest.mark.parametrize("body, param, why", [
    ({"tools": ORDERS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [ORDERS[0], ORDERS[0]]}, "tools", "duplicate"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"oneOf": [{"type": "integer"}]}}}}}]}, "tools", "tools[0].function.parameters.properties.a: oneOf"),
    ({"tools": ORDERS, "response_format": {"type": "json_object"}}, "response_format", "tools"),
])
def test_bad_tools_are_a_400_naming_the_field(client: TestClient, body: dict[str, Any], param: str, why: str) -> None:
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "stream": stream, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and why in r.json()["error"]["message"]


@pytest.mark.slow
def test_default_model_calls_declared_tools_with_valid_arguments(smollm2_checkpoint: Path) -> None:
    """The real SmolLM2-135M-Instruct (q4), one prompt per tool set, tool_choice="required", one call each:
    the format it reads in its system prompt, the call it writes (bench/structured.py --tools runs all 20)."""
    from model.engine import EngineConfig, LLMEngine
    from model.inference import load_for_serving
    from model.sampling import SamplingParams

    served = load_for_serving(smollm2_checkpoint, quantize="q4")
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=4, max_model_len=1024))
    cases = CASES[::5]
    specs = [[ToolSpec.build(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
              for t in tools] for _, tools in cases]
    prompts = [render_chat(served.tokenizer, tool_calls.render_messages(
        [ChatTurn("user", q)], s, served.tokenizer.default_system_prompt)).ids for (q, _), s in zip(cases, specs, strict=True)]
    params = [SamplingParams(max_tokens=160, temperature=0.0, response_format=tool_calls.ToolCallFormat.build(
        s, required=True, parallel=False)) for s in specs]
    for out, (_, tools) in zip(engine.generate(prompts, params), cases, strict=True):
        parsed = parse(out.text)
        assert out.finish_reason.value == "stop" and len(parsed.calls) == 1, out.text
        assert _bad_calls([(c.name, c.arguments) for c in parsed.calls], tools) == [], out.text
