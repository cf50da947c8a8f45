"""Task endpoints: /chat, /summarize, /translate, /classify, /extract — single input or a list.

Prompts come from `model.tasks` (shared with fine-tuning); sampling is greedy unless overridden.
A list input is generated in the same engine batches; the response then has `results` and a
summed `usage`. /chat with `stream: true` (one conversation) sends SSE deltas
`{"id", "index", "delta"}`, then `{"id", "finish_reason", "usage"}`, then `[DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import JsonValue

from model import tasks

from ..errors import InvalidRequest
from ..protocol import (
    AssistantMessage,
    ChatBatchResponse,
    ChatItem,
    ChatRequest,
    ChatResponse,
    ClassifyBatchResponse,
    ClassifyItem,
    ClassifyRequest,
    ClassifyResponse,
    ExtractBatchResponse,
    ExtractItem,
    ExtractRequest,
    ExtractResponse,
    LabelScore,
    SummarizeRequest,
    TextBatchResponse,
    TextItem,
    TextResponse,
    TranslateRequest,
    Usage,
    as_list,
    check_batch,
)
from ..service import Generated, Service, finish_reason
from .common import ERROR_RESPONSES, SSE_RESPONSE, event_stream, get_service, prompt_items, request_id, sse

router = APIRouter(tags=["tasks"])


def _usage(g: Generated) -> Usage:
    return Usage.of(g.prompt_tokens, g.completion_tokens)


def _total(items: list[ChatItem] | list[TextItem] | list[ClassifyItem] | list[ExtractItem]) -> Usage:
    total = Usage()
    for item in items:
        total = total.add(item.usage)
    return total


@router.post("/chat", response_model=ChatResponse | ChatBatchResponse,
             responses={**ERROR_RESPONSES, **SSE_RESPONSE})
async def chat(body: ChatRequest, request: Request, svc: Service = Depends(get_service)
               ) -> ChatResponse | ChatBatchResponse | StreamingResponse:
    conversations, is_batch = body.conversations()
    check_batch(conversations, svc.limits, "messages")
    adapter = svc.adapter_for(body.model)
    served = adapter or svc.model_name
    items = await prompt_items(svc, [[m.model_dump() for m in conv] for conv in conversations],
                             body.sampling_params(svc.limits), body.explicit_max_tokens)
    rid = request_id(request)
    if body.stream:
        if is_batch:
            raise InvalidRequest("stream supports one conversation; send a list without stream",
                                 param="stream")
        ids, item_params = items[0]

        async def events() -> AsyncIterator[str]:
            deadline = svc.deadline(_loop_time())
            async for out in svc.stream(rid, ids, item_params, "chat", deadline, adapter):
                if out.text_delta:
                    yield sse({"id": rid, "index": 0, "delta": out.text_delta})
                if out.finished:
                    yield sse({"id": rid, "index": 0, "finish_reason": finish_reason(out.finish_reason),
                               "usage": Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()})

        return event_stream(svc, events)
    results = await svc.complete_many(request, rid, items, "chat", adapter)
    chat_items = [ChatItem(message=AssistantMessage(content=g.text), finish_reason=g.finish_reason,
                           usage=_usage(g)) for g in results]
    if is_batch:
        return ChatBatchResponse(id=rid, model=served, results=chat_items, usage=_total(chat_items))
    return ChatResponse(id=rid, model=served, **chat_items[0].model_dump())


async def _text_task(request: Request, svc: Service, body: SummarizeRequest | TranslateRequest, texts: list[str],
                     is_batch: bool, messages: list[list[dict[str, str]]], endpoint: str
                     ) -> TextResponse | TextBatchResponse:
    adapter = svc.adapter_for(body.model)
    served = adapter or svc.model_name
    items = await prompt_items(svc, messages, body.sampling_params(svc.limits), body.explicit_max_tokens, param="text")
    rid = request_id(request)
    results = await svc.complete_many(request, rid, items, endpoint, adapter)
    text_items = [TextItem(text=g.text.strip(), finish_reason=g.finish_reason, usage=_usage(g)) for g in results]
    if is_batch:
        return TextBatchResponse(id=rid, model=served, results=text_items, usage=_total(text_items))
    return TextResponse(id=rid, model=served, **text_items[0].model_dump())


def _task_messages(build: Callable[..., list[dict[str, str]]], texts: list[str], *args: object
                   ) -> list[list[dict[str, str]]]:
    try:
        return [build(text, *args) for text in texts]
    except tasks.TaskError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None


@router.post("/summarize", response_model=TextResponse | TextBatchResponse, responses=ERROR_RESPONSES)
async def summarize(body: SummarizeRequest, request: Request, svc: Service = Depends(get_service)
                    ) -> TextResponse | TextBatchResponse:
    texts, is_batch = as_list(body.text)
    check_batch(texts, svc.limits, "text")
    messages = _task_messages(tasks.summarize_messages, texts, body.max_words)
    return await _text_task(request, svc, body, texts, is_batch, messages, "summarize")


@router.post("/translate", response_model=TextResponse | TextBatchResponse, responses=ERROR_RESPONSES)
async def translate(body: TranslateRequest, request: Request, svc: Service = Depends(get_service)
                    ) -> TextResponse | TextBatchResponse:
    texts, is_batch = as_list(body.text)
    check_batch(texts, svc.limits, "text")
    messages = _task_messages(tasks.translate_messages, texts, body.target_lang, body.source_lang)
    return await _text_task(request, svc, body, texts, is_batch, messages, "translate")


@router.post("/extract", response_model=ExtractResponse | ExtractBatchResponse, responses=ERROR_RESPONSES)
async def extract(body: ExtractRequest, request: Request, svc: Service = Depends(get_service)
                  ) -> ExtractResponse | ExtractBatchResponse:
    """Text(s) + a JSON schema -> one object per text, decoded under the schema's grammar (model.grammar),
    so `data` always validates; null only when `max_tokens` cut the object short (`finish_reason`
    "length"). The prompt is `model.tasks.extract_messages`."""
    texts, is_batch = as_list(body.text)
    check_batch(texts, svc.limits, "text")
    params = body.sampling_params(svc.limits)  # a bad schema is refused before anything is rendered
    messages = _task_messages(tasks.extract_messages, texts, body.schema_)
    adapter = svc.adapter_for(body.model)
    items = await prompt_items(svc, messages, params, body.explicit_max_tokens, param="text")
    rid = request_id(request)
    results = await svc.complete_many(request, rid, items, "extract", adapter)
    extracted = [ExtractItem(data=_json_or_none(g.text), finish_reason=g.finish_reason, usage=_usage(g))
                 for g in results]
    if is_batch:
        return ExtractBatchResponse(id=rid, model=adapter or svc.model_name, results=extracted,
                                    usage=_total(extracted))
    return ExtractResponse(id=rid, model=adapter or svc.model_name, **extracted[0].model_dump())


def _json_or_none(text: str) -> JsonValue:
    """The grammar guarantees whole JSON when generation ended on a stop token; max_tokens or a
    caller's stop string can end it early."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


@router.post("/classify", response_model=ClassifyResponse | ClassifyBatchResponse, responses=ERROR_RESPONSES)
async def classify(body: ClassifyRequest, request: Request, svc: Service = Depends(get_service)
                   ) -> ClassifyResponse | ClassifyBatchResponse:
    """Zero-shot (given `labels`) or fine-tuned (checkpoint label set) classification.

    With a classification head in SEEDLING_ADAPTERS_DIR whose label set equals `labels` (any order),
    or the head's adapter named by `model`, the head answers (softmax over its labels; one shallow
    forward per text) and `model` in the response names it; `model` = the base model forces zero-shot,
    `model` = a LoRA adapter scores zero-shot through it.
    Otherwise labels are ranked by the log-likelihood of the model answering each label to the
    `model.tasks` classify prompt, calibrated against each label's content-free prior; the order
    of `labels` never matters. Single-label: softmax over labels, scores sum to 1.
    `multi_label`: each label scored on its own, in (0, 1) (0.5: the text makes the label no
    likelier than an empty text does); `labels` lists those >= `threshold`. Optional
    `descriptions` and few-shot `examples` per label go into the prompt."""
    texts, is_batch = as_list(body.text)
    for text in texts:  # refused by its characters before the service tokenizes it
        svc.prompts.check([text, *(body.labels or []), *(body.descriptions or {}).values(),
                           *(t for shots in (body.examples or {}).values() for t in shots)], "text")
    check_batch(texts, svc.limits, "text")
    scored = await svc.classify(request, texts, body.labels, body.multi_label, body.threshold,
                                body.label_set, model=body.model, descriptions=body.descriptions,
                                examples=body.examples)
    served = scored[0].model or svc.model_name
    items = [ClassifyItem(label=s.label, labels=s.labels,
                          scores=[LabelScore(label=lab, score=p) for lab, p in s.scores],
                          usage=Usage.of(s.prompt_tokens, 0)) for s in scored]
    rid = request_id(request)
    if is_batch:
        return ClassifyBatchResponse(id=rid, model=served, multi_label=body.multi_label,
                                     results=items, usage=_total(items))
    item = items[0]  # its fields as they are: model_dump would rebuild every LabelScore twice
    return ClassifyResponse(id=rid, model=served, multi_label=body.multi_label, label=item.label, labels=item.labels,
                            scores=item.scores, usage=item.usage)


def _loop_time() -> float:
    import asyncio

    return asyncio.get_running_loop().time()
