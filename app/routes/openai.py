"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

The official `openai` client works against these unchanged (tests/test_app_openai.py). Streams
follow OpenAI's chunk shapes: a first chunk with the assistant role, content deltas, a chunk with
`finish_reason`, an optional usage chunk (`stream_options.include_usage`), then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import JsonValue

from model import tool_calls
from model.engine import RequestOutput
from model.engine import TokenLogprob as EngineLogprob
from model.sampling import SamplingParams

from ..errors import InvalidRequest
from ..protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
    check_batch,
)
from ..service import Service, finish_reason
from . import tool_output
from .common import (
    ERROR_RESPONSES,
    SSE_RESPONSE,
    event_stream,
    get_service,
    prompt_items,
    request_id,
    sse,
    token_text,
)

router = APIRouter(tags=["openai"])
STARTED = int(time.time())


def _chat_logprobs(svc: Service, logprobs: list[EngineLogprob]) -> ChoiceLogprobs:
    content = []
    for lp in logprobs:
        text, raw = token_text(svc, lp.token_id)
        tops = []
        for tid, value in lp.top:
            ttext, traw = token_text(svc, tid)
            tops.append(TopLogprob(token=ttext, logprob=value, bytes=traw))
        content.append(TokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=tops))
    return ChoiceLogprobs(content=content)


def _completion_logprobs(svc: Service, logprobs: list[EngineLogprob], offset: int) -> CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text, _ = token_text(svc, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({token_text(svc, tid)[0]: value for tid, value in lp.top})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _completion_items(svc: Service, prompts: list[str | list[int]], params: SamplingParams, explicit: bool
                      ) -> list[tuple[list[int], SamplingParams]]:
    """(prompt ids, fitted params) per prompt; runs off the event loop (tokenizing)."""
    items = []
    for p in prompts:
        ids = svc.text_prompt(p)
        items.append((ids, svc.fit(ids, params, explicit, param="prompt")))
    return items


@router.get("/v1/models", response_model=ModelList)
async def models(svc: Service = Depends(get_service)) -> ModelList:
    """The base model, then every adapter served now — a LoRA adapter, a classification head or both
    (its `parent` is the base model)."""
    base = ModelCard(id=svc.model_name, created=STARTED, max_model_len=svc.max_model_len,
                     serving_path=svc.serving_path)
    root = Path(svc.settings.adapters_dir or ".")
    heads = svc.heads.registry.heads if svc.heads is not None else {}
    names = sorted({*svc.adapters(), *heads})
    adapters = [ModelCard(id=name, created=STARTED, max_model_len=svc.max_model_len, root=str(root / name),
                          serving_path=svc.serving_path,
                          parent=svc.model_name) for name in names]
    return ModelList(data=[base, *adapters])


def _chat_messages(svc: Service, body: ChatCompletionRequest, specs: list[tool_calls.ToolSpec]
                   ) -> list[dict[str, str]]:
    """The conversation as ChatML messages (model.tool_calls: calls and tool results written out; the
    block of `specs` in the system message: the tools the model may call)."""
    system = svc.settings.default_system_prompt or svc.tokenizer.default_system_prompt
    return tool_calls.render_messages([m.turn() for m in body.messages], specs, system)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERROR_RESPONSES, **SSE_RESPONSE})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           svc: Service = Depends(get_service)) -> ChatCompletion | StreamingResponse:
    """Chat; with `tools`, calls come back as `message.tool_calls` (docs/structured-output.md: the format,
    and how "auto", "required" and a named tool_choice constrain decoding)."""
    adapter = svc.adapter_for(body.model)
    served = adapter or svc.model_name
    specs = body.tool_specs()
    tools = body.tool_format(specs)  # None: plain text ("none", or no tools)
    messages = _chat_messages(svc, body, specs if tools is not None else [])
    [(ids, params)] = await prompt_items(svc, [messages], body.sampling_params(svc.limits, tools),
                                         body.explicit_max_tokens)
    rid = "chatcmpl-" + request_id(request)
    if body.stream:
        return _chat_stream(svc, body, rid, served, ids, params, adapter, tools is not None)
    [g] = await svc.complete_many(request, rid, [(ids, params)], "chat_completions", adapter)
    logprobs = _chat_logprobs(svc, g.logprobs) if params.logprobs is not None else None
    message, finish = tool_output.message(g.text, g.finish_reason, tools is not None)
    choice = ChatChoice(index=0, message=message, logprobs=logprobs, finish_reason=finish)
    return ChatCompletion(id=rid, model=served, choices=[choice],
                          usage=Usage.of(g.prompt_tokens, g.completion_tokens))


def _chat_stream(svc: Service, body: ChatCompletionRequest, rid: str, served: str, ids: list[int],
                 params: SamplingParams, adapter: str | None, tools: bool) -> StreamingResponse:
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served}
    usage_field = {"usage": None} if body.include_usage else {}
    calls = tool_output.StreamedCalls() if tools else None

    def chunk(delta: dict[str, JsonValue], finish: str | None = None, logprobs: JsonValue = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **usage_field})

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        deadline = svc.deadline(asyncio.get_running_loop().time())
        async for out in svc.stream(rid, ids, params, "chat_completions", deadline, adapter):
            lp = _chat_logprobs(svc, out.logprobs).model_dump() if out.logprobs else None
            deltas: list[dict[str, JsonValue]]
            if calls is None:
                deltas = [{"content": out.text_delta}] if out.text_delta else []
            else:
                deltas = calls.feed(out.text_delta) + (calls.finish() if out.finished else [])
            for i, delta in enumerate(deltas or ([{}] if lp else [])):
                yield chunk(delta, logprobs=lp if i == 0 else None)
            if out.finished:
                reason = finish_reason(out.finish_reason)
                yield chunk({}, finish=tool_output.finish_reason(reason, calls is not None and calls.made_calls))
                if body.include_usage:
                    usage = Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()
                    yield sse({**base, "choices": [], "usage": usage})

    return event_stream(svc, events)


@router.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, **SSE_RESPONSE})
async def completions(body: CompletionRequest, request: Request, svc: Service = Depends(get_service)
                      ) -> Completion | StreamingResponse:
    adapter = svc.adapter_for(body.model)
    served = adapter or svc.model_name
    if body.echo and body.logprobs is not None:
        raise InvalidRequest("echo with logprobs is not supported", param="echo", code="unsupported_value")
    params = body.sampling_params(svc.limits)
    prompts = body.prompts()
    check_batch(prompts, svc.limits, "prompt")
    for p in prompts:
        if isinstance(p, str):
            svc.prompts.check([p], "prompt")
    items = await svc.prompts.run(_completion_items, svc, prompts, params, body.explicit_max_tokens)
    echoes = [(p if isinstance(p, str) else svc.tokenizer.decode(p)) if body.echo else "" for p in prompts]
    rid = "cmpl-" + request_id(request)
    if body.stream:
        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": served}
        usage_field = {"usage": None} if body.include_usage else {}

        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()
            deadline = svc.deadline(asyncio.get_running_loop().time())

            async def pump(i: int) -> None:
                try:
                    item_id = rid if len(items) == 1 else f"{rid}-{i}"
                    async for out in svc.stream(item_id, items[i][0], items[i][1], "completions", deadline,
                                                  adapter):
                        await queue.put((i, out))
                except Exception as exc:  # noqa: BLE001 - forwarded to the stream
                    await queue.put((i, exc))

            tasks = [asyncio.create_task(pump(i)) for i in range(len(items))]
            prompt_total = completion_total = 0
            try:
                for i, echo in enumerate(echoes):
                    if echo:
                        yield sse({**base, "choices": [{"index": i, "text": echo, "logprobs": None,
                                                        "finish_reason": None}], **usage_field})
                open_items = len(items)
                while open_items:
                    i, out = await queue.get()
                    if isinstance(out, Exception):
                        raise out
                    lp = (_completion_logprobs(svc, out.logprobs, 0).model_dump() if out.logprobs else None)
                    if out.text_delta or lp or out.finished:
                        choice = {"index": i, "text": out.text_delta, "logprobs": lp,
                                  "finish_reason": finish_reason(out.finish_reason) if out.finished else None}
                        yield sse({**base, "choices": [choice], **usage_field})
                    if out.finished:
                        open_items -= 1
                        prompt_total += out.prompt_tokens
                        completion_total += out.completion_tokens
                if body.include_usage:
                    yield sse({**base, "choices": [], "usage": Usage.of(prompt_total, completion_total).model_dump()})
            finally:  # an item failed or the client left: stop the others before the slots are released
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        return event_stream(svc, events, n_items=len(items))
    results = await svc.complete_many(request, rid, items, "completions", adapter)
    choices = []
    usage = Usage()
    for i, (g, echo) in enumerate(zip(results, echoes, strict=True)):
        logprobs = _completion_logprobs(svc, g.logprobs, 0) if params.logprobs is not None else None
        choices.append(CompletionChoice(index=i, text=echo + g.text, logprobs=logprobs,
                                        finish_reason=g.finish_reason))
        usage = usage.add(Usage.of(g.prompt_tokens, g.completion_tokens))
    return Completion(id=rid, model=served, choices=choices, usage=usage)
