"""Request and response models of the HTTP API (pydantic lives here and nowhere else).

Request models validate once at the edge and convert themselves to `SamplingParams`
(`.sampling_params(limits)`); handlers never read raw JSON. Two families:
- Seedling task endpoints (/chat, /summarize, /translate, /classify, /tokenize, /detokenize):
  unknown fields are rejected (a typo gets a 400 naming it), greedy by default.
- OpenAI-compatible (/v1/chat/completions, /v1/completions): unknown fields are ignored, OpenAI
  defaults (temperature 1), plus llama.cpp-style extras `ignore_eos`, `repeat_penalty`, `top_k`,
  `min_p` so load scripts written for llama-server work unchanged.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from model import grammar, tool_calls
from model.sampling import MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOPS, SamplingParams

from .errors import InvalidRequest

MAX_SEED = 2**63 - 1
MIN_PENALTY = 0.01  # smaller repetition penalties overflow fp32 logits (x / 1e-157 = inf)
_TOKEN_ID = re.compile(r"[0-9]{1,10}", re.ASCII)  # a logit_bias key
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (logits / 1e-300 is inf in fp32)


def _temperature(value: float) -> float:
    return 0.0 if value < GREEDY_BELOW else value
NonEmptyStr = Annotated[str, Field(min_length=1)]


@dataclass(frozen=True)
class Limits:
    """What the server allows; passed to `sampling_params` so models stay settings-free."""

    max_tokens_default: int
    max_tokens_limit: int
    max_batch_items: int
    vocab_size: int | None = None  # token ids (logit_bias keys) must be below it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ----------------------------------------------------------------------------
# shared pieces

class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: Usage) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                     completion_tokens=self.completion_tokens + other.completion_tokens,
                     total_tokens=self.total_tokens + other.total_tokens)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(_Strict):
    """Sampling overrides accepted by every task endpoint (greedy unless temperature > 0)."""

    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (server default if absent)")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=MIN_PENALTY, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[NonEmptyStr] | None = Field(None, description="stop strings, never emitted")
    model: NonEmptyStr | None = Field(None, description="a LoRA adapter (GET /v1/models) or the base model "
                                      "(the default)")

    def sampling_params(self, limits: Limits) -> SamplingParams:
        max_tokens = _max_tokens(self.max_tokens, limits, "max_tokens")
        return SamplingParams(
            max_tokens=max_tokens, temperature=_temperature(self.temperature), top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, stop=_stops(self.stop))

    @property
    def explicit_max_tokens(self) -> bool:
        return self.max_tokens is not None


def _max_tokens(value: int | None, limits: Limits, param: str) -> int:
    if value is None:
        return limits.max_tokens_default
    if value > limits.max_tokens_limit:
        raise InvalidRequest(f"{param} is {value}, but this server allows at most {limits.max_tokens_limit}",
                             param=param, code="invalid_value")
    return value


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not s for s in stops):
        raise InvalidRequest("stop strings must be non-empty", param="stop", code="invalid_value")
    if len(stops) > MAX_STOPS:
        raise InvalidRequest(f"at most {MAX_STOPS} stop strings", param="stop", code="invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidRequest(f"stop strings must be at most {MAX_STOP_CHARS} characters", param="stop",
                             code="invalid_value")
    return stops


def _logit_bias(bias: dict[str, float] | None, limits: Limits) -> dict[int, float]:
    ids = {int(k): float(v) for k, v in (bias or {}).items()}
    if limits.vocab_size is not None:
        outside = [i for i in ids if i >= limits.vocab_size]
        if outside:
            raise InvalidRequest(f"logit_bias token id {outside[0]} is outside the vocabulary "
                                 f"[0, {limits.vocab_size})", param="logit_bias", code="invalid_value")
    return ids


def check_batch(items: Sequence[object], limits: Limits, param: str) -> None:
    if len(items) > limits.max_batch_items:
        raise InvalidRequest(f"{param} has {len(items)} items; at most {limits.max_batch_items} per request",
                             param=param, code="too_many_items")


# ----------------------------------------------------------------------------
# Seedling task endpoints

Conversation = Annotated[list[Message], Field(min_length=1)]
TextOrTexts = str | Annotated[list[str], Field(min_length=1)]


class ChatRequest(SamplingFields):
    messages: Conversation | Annotated[list[Conversation], Field(min_length=1)] = Field(
        ..., description="one conversation, or a list of conversations (decoded in the same batches)")
    stream: bool = Field(False, description="SSE deltas, then a final event with usage, then [DONE]")

    def conversations(self) -> tuple[list[list[Message]], bool]:
        """([conversation, ...], is_batch)."""
        if self.messages and isinstance(self.messages[0], list):
            return list(self.messages), True  # type: ignore[arg-type]
        return [self.messages], False  # type: ignore[list-item]


class SummarizeRequest(SamplingFields):
    text: TextOrTexts
    max_words: int | None = Field(None, ge=1, le=10_000, description="ask for a summary of at most N words")


class ExtractRequest(SamplingFields):
    text: TextOrTexts
    schema_: dict[str, JsonValue] = Field(..., alias="schema", description="JSON schema every result validates against")

    def sampling_params(self, limits: Limits) -> SamplingParams:
        """Decoded under the schema's grammar; a 400 naming `schema` (and where in it) when it is not one."""
        try:
            fmt = grammar.ResponseFormat.json_schema(self.schema_, param="schema", where="schema")
        except grammar.GrammarError as e:
            raise InvalidRequest(str(e), param="schema", code="invalid_value") from None
        return dataclasses.replace(super().sampling_params(limits), response_format=fmt)


class TranslateRequest(SamplingFields):
    text: TextOrTexts
    target_lang: NonEmptyStr = Field(..., description="code (de, fr, zh, ...) or language name")
    source_lang: NonEmptyStr | None = None


class ClassifyRequest(_Strict):
    text: TextOrTexts
    labels: Annotated[list[NonEmptyStr], Field(min_length=1, max_length=256)] | None = Field(
        None, description="candidate labels; absent = the checkpoint's fine-tuned label set")
    label_set: NonEmptyStr | None = Field(None, description="without labels: which of the checkpoint's "
                                          "label sets (default: 'classify', or its only set)")
    multi_label: bool = Field(False, description="score each label independently (see docs)")
    threshold: float = Field(0.5, ge=0, le=1, description="multi_label: labels scoring at least this")
    model: NonEmptyStr | None = Field(None, description="an adapter with a classification head (its labels), "
                                      "a LoRA adapter or the base model (zero-shot); absent = a head whose "
                                      "label set equals labels, else zero-shot on the base model")
    descriptions: Annotated[dict[NonEmptyStr, Annotated[str, Field(min_length=1, max_length=500)]],
                            Field(max_length=256)] | None = Field(
        None, description="label -> what it means, shown next to the label in the prompt")
    examples: Annotated[dict[NonEmptyStr, Annotated[list[Annotated[str, Field(min_length=1, max_length=2000)]],
                                                    Field(min_length=1)]], Field(max_length=256)] | None = Field(
        None, description="label -> example texts (few-shot); at most 64 in all")


def as_list(value: str | list[str]) -> tuple[list[str], bool]:
    return ([value], False) if isinstance(value, str) else (list(value), True)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatItem(BaseModel):
    message: AssistantMessage
    finish_reason: str | None
    usage: Usage


class ChatResponse(ChatItem):
    id: str
    model: str


class ChatBatchResponse(BaseModel):
    id: str
    model: str
    results: list[ChatItem]
    usage: Usage


class TextItem(BaseModel):
    """One summary or translation."""

    text: str
    finish_reason: str | None
    usage: Usage


class TextResponse(TextItem):
    id: str
    model: str


class TextBatchResponse(BaseModel):
    id: str
    model: str
    results: list[TextItem]
    usage: Usage


class ExtractItem(BaseModel):
    """One text's object."""

    data: JsonValue = Field(..., description="the object, valid for the schema; null when max_tokens cut it short")
    finish_reason: str | None
    usage: Usage


class ExtractResponse(ExtractItem):
    id: str
    model: str


class ExtractBatchResponse(BaseModel):
    id: str
    model: str
    results: list[ExtractItem]
    usage: Usage


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyItem(BaseModel):
    label: str = Field(..., description="the best label")
    labels: list[str] = Field(..., description="single-label: [label]; multi_label: all >= threshold")
    scores: list[LabelScore] = Field(..., description="every label, best first")
    usage: Usage


class ClassifyResponse(ClassifyItem):
    id: str
    model: str
    multi_label: bool


class ClassifyBatchResponse(BaseModel):
    id: str
    model: str
    multi_label: bool
    results: list[ClassifyItem]
    usage: Usage


class TokenizeRequest(_Strict):
    text: str | None = Field(None, description="plain text (literal: special tokens are not parsed)")
    messages: Conversation | None = Field(None, description="or a conversation, rendered with the chat template")
    add_special_tokens: bool = Field(False, description="text: prepend BOS when the tokenizer has one")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant header")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Strict):
    tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]]
    skip_special_tokens: bool = True


class DetokenizeResponse(BaseModel):
    text: str


# ----------------------------------------------------------------------------
# OpenAI-compatible

class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Lenient):
    name: str
    arguments: str = Field(..., description="JSON text, as a previous response returned it")


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class OpenAIMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(None, description="tool: the call this message answers")

    def turn(self) -> tool_calls.ChatTurn:
        """The message as model.tool_calls renders it (developer reads as system)."""
        role = "system" if self.role == "developer" else self.role
        content = "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""
        calls = [tool_calls.CallIn(c.function.name, c.function.arguments) for c in self.tool_calls or []]
        return tool_calls.ChatTurn(role, content, calls)


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, JsonValue] | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = None  # calls are always decoded against the schema


class ToolDef(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, JsonValue] | None = Field(None, alias="schema")
    strict: bool | None = None  # constrained decoding is always strict (no properties beyond the schema)


class ResponseFormat(_Lenient):
    """OpenAI's response_format: text, any JSON object, or JSON valid for a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    def to_model(self) -> grammar.ResponseFormat | None:
        """The engine's format (None for text); GrammarError (400, param response_format) for a bad one."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return grammar.ResponseFormat.json_object()
        if self.json_schema is None:
            raise InvalidRequest("response_format.json_schema is required when type is json_schema",
                                 param="response_format", code="invalid_value")
        try:
            return grammar.ResponseFormat.json_schema(self.json_schema.schema_ or {})
        except grammar.GrammarError as e:
            raise InvalidRequest(str(e), param="response_format", code="invalid_value") from None


class OpenAISampling(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI defaults)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="default 1.0")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[NonEmptyStr] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    # llama.cpp / vLLM extras
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="extra; 0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="extra")
    repeat_penalty: float | None = Field(None, ge=MIN_PENALTY, le=10, description="extra (llama.cpp name)")
    repetition_penalty: float | None = Field(None, ge=MIN_PENALTY, le=10, description="extra (vLLM name)")
    ignore_eos: bool | None = Field(False, description="extra: keep generating past EOS")
    min_tokens: int | None = Field(None, ge=0, description="extra")
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are plain ASCII token ids: `str.isdigit` also accepts "²" or "٣", which `int` refuses."""
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        for key in value or {}:
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"keys must be token ids (ASCII digits), got {key[:20]!r}")
        return value

    def base_params(self, limits: Limits, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if (self.n or 1) != 1:
            raise InvalidRequest("only n=1 is supported", param="n", code="unsupported_value")
        penalty = self.repetition_penalty if self.repetition_penalty is not None else self.repeat_penalty
        return SamplingParams(
            max_tokens=_max_tokens(max_tokens, limits, "max_tokens"),
            temperature=1.0 if self.temperature is None else _temperature(self.temperature),
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if penalty is None else penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=_stops(self.stop), ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0, logprobs=logprobs,
            logit_bias=_logit_bias(self.logit_bias, limits),
            response_format=self.response_format.to_model() if self.response_format else None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(OpenAISampling):
    messages: Annotated[list[OpenAIMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="more than one call per response (default true)")

    def tool_specs(self) -> list[tool_calls.ToolSpec]:
        """The declared tools, checked (names, duplicates); a 400 naming the field at fault."""
        try:
            specs = [tool_calls.ToolSpec.build(t.function.name, t.function.description, t.function.parameters,
                                               where=f"tools[{i}]") for i, t in enumerate(self.tools or [])]
            tool_calls.check_unique(specs)
            for i, spec in enumerate(specs):  # what the grammar cannot enforce is refused here, not mid-stream
                grammar.compilable_schema(spec.parameters, f"tools[{i}].function.parameters", "tools")
        except (tool_calls.ToolError, grammar.GrammarError) as e:
            raise InvalidRequest(str(e), param=e.param, code="invalid_value") from None
        return specs

    def tool_format(self, specs: list[tool_calls.ToolSpec]) -> tool_calls.ToolCallFormat | None:
        """How tool calls constrain decoding (model.tool_calls); None: plain text (no tools, or "none")."""
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if specs else "none")
        if choice == "none":
            return None
        if not specs:
            raise InvalidRequest("tool_choice needs tools", param="tool_choice", code="invalid_value")
        if isinstance(choice, NamedToolChoice):
            named = [t for t in specs if t.name == choice.function.name]
            if not named:
                raise InvalidRequest(f"tool_choice names {choice.function.name!r}, which is not in tools",
                                     param="tool_choice", code="invalid_value")
            return tool_calls.ToolCallFormat.build(named, required=True, parallel=False)
        parallel = self.parallel_tool_calls is not False
        return tool_calls.ToolCallFormat.build(specs, required=choice == "required", parallel=parallel)

    def sampling_params(self, limits: Limits, tools: tool_calls.ToolCallFormat | None = None) -> SamplingParams:
        """`tools`: this request's `tool_format`, decoded in place of a response_format."""
        if tools is not None and self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest("response_format cannot be combined with tools unless tool_choice is 'none'",
                                 param="response_format", code="unsupported_value")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self.base_params(limits, max_tokens, logprobs)
        return dataclasses.replace(params, response_format=tools) if tools is not None else params

    @property
    def explicit_max_tokens(self) -> bool:
        return self.max_tokens is not None or self.max_completion_tokens is not None


class CompletionRequest(OpenAISampling):
    prompt: (NonEmptyStr | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]
             | Annotated[list[Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]],
                         Field(min_length=1)])
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    suffix: str | None = Field(None, description="not supported: must be absent")

    def sampling_params(self, limits: Limits) -> SamplingParams:
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix", code="unsupported_value")
        return self.base_params(limits, self.max_tokens, self.logprobs)

    @property
    def explicit_max_tokens(self) -> bool:
        return self.max_tokens is not None

    def prompts(self) -> list[str | list[int]]:
        """Normalize the four OpenAI prompt shapes to a list of (text | token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="JSON text of the arguments")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


class _OpenAIResponse(BaseModel, Generic[ChoiceT]):
    """The envelope both OpenAI completion responses share; subclasses fix `object` and the choice type."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChoiceT]
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletion(_OpenAIResponse[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_OpenAIResponse[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seedling"
    max_model_len: int
    serving_path: str  # which forward serves: "torch-fp32", "torch-bf16", "torch-int8-bf16", "fbgemm-w8a8", "native-q4"
    root: str | None = None  # where it was loaded from (an adapter's directory)
    parent: str | None = None  # an adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
    serving_path: str | None = None  # /ready: which forward serves, as in /v1/models
