"""Service: what every route needs between validated requests and the engine client.

Owns turning requests into prompt ids and length checks (both through `model.tasks`, the one home of
task prompts, the length rule and the label math — never a prompt written here), per-request
deadlines, abort on client disconnect, metrics per generated item, and /classify's engine calls.
Routes stay thin: parse -> service call -> response model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from pydantic import JsonValue

from model import tasks
from model.engine import FinishReason, RequestOutput, TokenLogprob
from model.head import LoadedHead
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer

from .engine_client import EngineClient
from .errors import ApiError, DeadlineExceeded, InvalidRequest, NotFound, prompt_too_long, to_api_error
from .heads import HeadService
from .metrics import Metrics, RequestTimer
from .prompt_guard import PromptGuard
from .protocol import Limits
from .settings import ServerSettings

log = logging.getLogger("seedling.service")
T = TypeVar("T")
ScoreJob = tuple[list[int], list[list[int]]]  # (prompt ids, one continuation per label)
# a head's texts up to this many characters in all are tokenized on the event loop (tens of
# microseconds); longer ones in a worker thread. The thread hop cost more than the tokenizing it
# saved for one-sentence requests (a profile of /classify at 16 concurrent requests)
INLINE_TOKENIZE_CHARS = 2048


@dataclass
class ZeroShotWork:
    """The engine work of one zero-shot /classify request, built off the event loop."""
    conts: list[list[int]]  # the direct answers scored per label
    channel_prompts: list[list[int]]  # per label: the prompt the channel direction scores a text after
    prompts: list[list[int]] = field(default_factory=list)  # per text: its classify prompt
    jobs: list[ScoreJob] = field(default_factory=list)  # direct scoring, per text (none when not needed)
    channel: list[list[int]] = field(default_factory=list)  # per text: its channel continuation (or none)
    free: list[ScoreJob] = field(default_factory=list)  # the content-free prompts when the prior is due


class ClientGone(Exception):
    """The client disconnected before the response was ready; its requests were aborted."""


@dataclass
class Generated:
    """One finished item."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, when asked


@dataclass
class Scored:
    label: str
    labels: list[str]
    scores: list[tuple[str, float]]  # best first
    prompt_tokens: int
    model: str | None = None  # the adapter that answered (its head, or zero-shot through its LoRA); None = base


class PriorCache:
    """Content-free priors per label set (`model.tasks.ClassifySpec`), least recently used dropped first:
    a client reusing its label set pays for the prior once."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tasks.ClassifySpec, list[float]] = OrderedDict()

    def get(self, spec: tasks.ClassifySpec) -> list[float] | None:
        prior = self._items.get(spec)
        if prior is not None:
            self._items.move_to_end(spec)
        return prior

    def put(self, spec: tasks.ClassifySpec, prior: list[float]) -> list[float]:
        self._items[spec] = prior
        self._items.move_to_end(spec)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return prior


class Service:
    def __init__(self, settings: ServerSettings, tokenizer: Tokenizer, client: EngineClient,
                 model_name: str, meta: dict[str, JsonValue], metrics: Metrics | None, serving_path: str = "unknown",
                 heads: HeadService | None = None) -> None:
        self.settings = settings
        self.heads = heads  # classification heads from SEEDLING_ADAPTERS_DIR (None: not configured)
        self.tokenizer = tokenizer
        self.client = client
        self.model_name = model_name
        self.serving_path = serving_path  # "torch-fp32", "native-q4", ...: shown by /v1/models and /ready
        self.meta = meta
        self.metrics = metrics
        self.max_model_len = settings.max_model_len
        self.limits = Limits(settings.max_tokens_default, settings.max_tokens_limit, settings.max_batch_items,
                             vocab_size=tokenizer.vocab_size)
        self.prompts = PromptGuard(tokenizer, self.max_model_len)  # check chars, then tokenize off the loop
        self._priors = PriorCache()

    # ------------------------------------------------------------------ models
    def adapters(self) -> list[str]:
        """The LoRA adapters served now (SEEDLING_ADAPTERS_DIR; they come and go without a restart)."""
        return self.client.engine.adapter_names()

    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names: None for the base model (or no `model`), NotFound
        naming `model` for anything not served."""
        if model is None or model == self.model_name:
            return None
        if model in self.adapters():
            return model
        raise NotFound(f"model {model!r} does not exist; this server serves {self.model_name!r} and its "
                       "adapters (see GET /v1/models)", param="model", code="model_not_found")

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        try:
            return tasks.render_prompt(self.tokenizer, messages, self.settings.default_system_prompt)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from None

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_id is not None)
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab}), got {bad[0]}", param="prompt")
        return list(prompt)

    def fit(self, prompt_ids: list[int], params: SamplingParams, explicit_max_tokens: bool,
            param: str = "messages") -> SamplingParams:
        """Check the prompt fits; clamp a defaulted max_tokens to the room left, reject an explicit
        one that does not fit (both token counts in the message)."""
        n = len(prompt_ids)
        self.check_length(n, 1, param)
        if explicit_max_tokens:
            self.check_length(n, params.max_tokens, "max_tokens")
        return dataclasses.replace(params, max_tokens=min(params.max_tokens, self.max_model_len - n))

    def check_length(self, prompt_tokens: int, needed: int, param: str) -> None:
        """`model.tasks.check_length` as the API's 400 (context_length_exceeded, naming `param`)."""
        try:
            tasks.check_length(prompt_tokens, self.max_model_len, needed, param)
        except tasks.ContextTooLong:
            raise prompt_too_long(prompt_tokens, self.max_model_len, needed if param == "max_tokens" else None,
                                  param) from None
        except tasks.TaskError as exc:
            raise InvalidRequest(str(exc), param=param) from None

    # ------------------------------------------------------------------ generation
    def deadline(self, t_arrival_loop: float) -> float:
        return t_arrival_loop + self.settings.request_timeout_s

    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams, endpoint: str,
                     deadline: float, adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """RequestOutputs for one item (from the base model or `adapter`), with metrics and outcomes."""
        timer = RequestTimer(self.metrics)
        outcome = "error"
        if self.settings.log_prompts:
            log.info("request %s prompt: %r", request_id, self.tokenizer.decode(prompt_ids, skip_special=False))
        try:
            async for out in self.client.generate(request_id, prompt_ids, params, deadline, timer, adapter):
                if out.finished:
                    outcome = finish_reason(out.finish_reason) or "stop"
                yield out
        except BaseException as exc:
            outcome = _outcome_of(exc)
            raise
        finally:
            timer.finish()
            if self.metrics is not None:
                self.metrics.outcome(endpoint, outcome)

    async def complete(self, request_id: str, prompt_ids: list[int], params: SamplingParams, endpoint: str,
                       deadline: float, adapter: str | None = None) -> Generated:
        result = Generated(prompt_tokens=len(prompt_ids))
        parts: list[str] = []
        async for out in self.stream(request_id, prompt_ids, params, endpoint, deadline, adapter):
            parts.append(out.text_delta)
            if out.logprobs:
                result.logprobs.extend(out.logprobs)
            result.token_ids = out.token_ids
            result.finish_reason = finish_reason(out.finish_reason)
            result.prompt_tokens, result.completion_tokens = out.prompt_tokens, out.completion_tokens
        result.text = "".join(parts)
        if self.settings.log_prompts:
            log.info("request %s output: %r", request_id, result.text)
        return result

    async def complete_many(self, request: Request, request_id: str, items: list[tuple[list[int], SamplingParams]],
                            endpoint: str, adapter: str | None = None) -> list[Generated]:
        """Generate every item in the same engine batches; abort all if the client leaves."""
        deadline = self.deadline(asyncio.get_running_loop().time())
        with self.client.reserve(len(items)):
            coros = [self.complete(_item_id(request_id, i, len(items)), ids, params, endpoint, deadline, adapter)
                     for i, (ids, params) in enumerate(items)]
            return await until_disconnect(request, all_or_none(coros))

    # ------------------------------------------------------------------ classify
    def default_labels(self, label_set: str | None = None) -> list[str]:
        """The checkpoint's fine-tuned labels (meta `labels: {name: [...]}`): the set named
        `label_set`, else the "classify" set, else the only set there is."""
        sets = self.meta.get("labels")
        sets = sets if isinstance(sets, dict) else {}
        if label_set is not None:
            if label_set not in sets:
                raise InvalidRequest(f"label_set {label_set!r} is not in this checkpoint; it has "
                                     f"{sorted(sets)}", param="label_set", code="invalid_value")
            found = sets[label_set]
        elif tasks.CLASSIFY in sets:
            found = sets[tasks.CLASSIFY]
        elif len(sets) == 1:
            found = next(iter(sets.values()))
        else:
            why = f"it has several ({sorted(sets)}): pick one with label_set" if sets else "it has none"
            raise InvalidRequest(f"labels are required: this checkpoint carries no default label set ({why})",
                                 param="labels", code="missing_labels")
        if not isinstance(found, list) or not found:
            raise InvalidRequest("the checkpoint's label set is empty; pass labels", param="labels")
        return [str(label) for label in found]

    def classify_spec(self, labels: list[str] | None, label_set: str | None = None,
                      descriptions: dict[str, str] | None = None,
                      examples: dict[str, list[str]] | None = None) -> tasks.ClassifySpec:
        """The request's label set (or the checkpoint's), canonicalised: the order labels come in
        cannot change the prompt or the scores."""
        try:
            return tasks.ClassifySpec.build(labels or self.default_labels(label_set), descriptions, examples)
        except tasks.TaskError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None

    async def classify(self, request: Request, texts: list[str], labels: list[str] | None,
                       multi_label: bool, threshold: float, label_set: str | None = None,
                       endpoint: str = "classify", model: str | None = None,
                       descriptions: dict[str, str] | None = None,
                       examples: dict[str, list[str]] | None = None) -> list[Scored]:
        """A classification head whose label set equals `labels` (or the head `model` names) answers
        when there is one: one shallow forward per text (`classify_with_head`); otherwise zero-shot
        scoring of the request's label set (`classify_spec`, `classify_zero_shot`)."""
        head = self.head_for(labels, model)
        if head is not None:
            return await self.classify_with_head(request, texts, head, multi_label, threshold, endpoint)
        spec = self.classify_spec(labels, label_set, descriptions, examples)
        return await self.classify_zero_shot(request, texts, spec, multi_label, threshold, endpoint,
                                             self.adapter_for(model))

    async def classify_zero_shot(self, request: Request, texts: list[str], spec: tasks.ClassifySpec,
                                 multi_label: bool, threshold: float, endpoint: str, adapter: str | None = None
                                 ) -> list[Scored]:
        """Rank labels by `model.tasks.DEFAULT_CALIBRATION` of two scores (docs/classify.md): the direct
        log-likelihood of answering each label (one scoring forward per text, the prompt shared by
        every label), calibrated against the label set's content-free prior (scored once per label set,
        then cached), and the channel log-likelihood of the text after each label's prompt (the engine
        keeps the label prompts' K/V). multi_label uses the direct scores only. `adapter`: a LoRA
        adapter scores instead of the base model."""
        calibration = tasks.DEFAULT_CALIBRATION
        # an adapter can be replaced under its name at any time: its prior is scored with each request
        prior = self._priors.get(spec) if adapter is None else None
        needs_prior = prior is None and tasks.needs_prior(calibration, multi_label)
        work = await self.prompts.run(self._zero_shot_jobs, texts, spec, calibration, multi_label, needs_prior)

        async def score() -> tuple[list[list[float]], list[list[float]]]:
            direct = await self.client.score_each(work.jobs + work.free, adapter)
            return direct, [await self.client.score_after(work.channel_prompts, c, adapter) for c in work.channel]

        # the admission bound counts the caller's texts; the prior's few content-free prompts ride along
        all_ll, all_channel = await self._classify_work(request, score, len(texts), endpoint,
                                                        prompt_tokens=sum(len(p) for p in work.prompts))
        if needs_prior:
            prior = tasks.content_free_prior(all_ll[len(work.jobs):])
            if adapter is None:
                self._priors.put(spec, prior)
        lengths = [len(c) for c in work.conts]
        results = []
        for i, prompt in enumerate(work.prompts):
            probs = tasks.label_probabilities(all_ll[i] if work.jobs else None, lengths, prior, calibration,
                                              multi_label, all_channel[i] if work.channel else None)
            ranked = tasks.rank_labels(spec.labels, probs)
            chosen = [lab for lab, p in ranked if p >= threshold] if multi_label else [ranked[0][0]]
            results.append(Scored(ranked[0][0], chosen, ranked, len(prompt), model=adapter))
            self._count(endpoint, "scored")
        return results

    def _zero_shot_jobs(self, texts: list[str], spec: tasks.ClassifySpec, calibration: tasks.Calibration,
                        multi_label: bool, with_prior: bool) -> ZeroShotWork:
        """What scoring `texts` takes (tokenizing runs in a worker thread, not on the event loop); each
        prompt and continuation is checked against the context length."""
        tok, system = self.tokenizer, self.settings.default_system_prompt
        conts = tasks.label_continuations(tok, spec)
        direct, channel = tasks.needs_direct(calibration, multi_label), tasks.needs_channel(calibration, multi_label)
        work = ZeroShotWork(conts=conts, channel_prompts=tasks.channel_prompts(tok, spec, system) if channel else [])
        longest_channel_prompt = max((len(p) for p in work.channel_prompts), default=0)
        for text in texts:
            try:
                prompt = tasks.render_prompt(tok, spec.messages(text), system)
                cont = tasks.channel_continuation(tok, text) if channel else []
            except tasks.TaskError as exc:
                raise InvalidRequest(str(exc), param=exc.param) from None
            self.check_length(len(prompt), max(len(c) for c in conts), "text")
            work.prompts.append(prompt)
            if direct:
                work.jobs.append((prompt, conts))
            if channel:
                self.check_length(longest_channel_prompt, len(cont), "text")
                work.channel.append(cont)
        work.free = [(p, conts) for p in tasks.content_free_prompts(tok, spec, system)] if with_prior else []
        return work

    async def _classify_work(self, request: Request, start: Callable[[], Awaitable[T]], slots: int,
                             endpoint: str, prompt_tokens: int) -> T:
        """Engine work for `slots` texts (zero-shot scoring or a head's forward): admission, the deadline,
        abort on disconnect, outcome and latency metrics. `start` is called only once admitted."""
        t0 = time.perf_counter()
        with self.client.reserve(slots):
            try:
                result = await until_disconnect(request, asyncio.wait_for(
                    start(), self.settings.request_timeout_s))
            except TimeoutError:
                self._count(endpoint, "timeout")
                raise DeadlineExceeded("classification deadline exceeded", code="timeout") from None
            except BaseException as exc:
                self._count(endpoint, _outcome_of(exc))
                raise
        if self.metrics is not None:
            self.metrics.e2e.observe(time.perf_counter() - t0)
            self.metrics.prompt_tokens.inc(prompt_tokens)
        return result

    # ------------------------------------------------------------------ classify with a head
    def head_for(self, labels: list[str] | None, model: str | None) -> tuple[str, LoadedHead] | None:
        """The head that answers, None for zero-shot scoring (no heads, `model` = the base model, or no
        head has this label set); `model` naming nothing served is a 404, a head with other labels a 400."""
        found = self.heads.match(labels, model) if self.heads is not None else None
        if found is not None or model is None or model == self.model_name:
            return found
        heads = self.heads.registry.heads if self.heads is not None else {}
        if model in self.adapters():
            return None  # a LoRA adapter: zero-shot scoring through it
        if model in heads:
            raise InvalidRequest(f"adapter {model!r} classifies into its own {len(heads[model].info.labels)} labels; "
                                 "omit labels or pass exactly that set", param="labels", code="invalid_value")
        refused = self.heads.registry.errors.get(model) if self.heads is not None else None
        served = [self.model_name, *sorted(heads)]
        raise NotFound(f"model {model!r} is not served ({refused})" if refused else
                       f"model {model!r} does not exist; this server serves {served} (see GET /v1/models)",
                       param="model", code="model_not_found")

    def _head_ids(self, texts: list[str], loaded: LoadedHead) -> list[list[int]]:
        """Each text in the head's template, refused (never cut) when too long (a worker thread for
        long inputs: INLINE_TOKENIZE_CHARS)."""
        from model.features import encode_texts

        if any(not t.strip() for t in texts):
            raise InvalidRequest("text must be a non-empty string", param="text")
        ids = encode_texts(self.tokenizer, texts, loaded.info.template, max_tokens=self.max_model_len + 1)
        longest = max(len(x) for x in ids)
        if longest > self.max_model_len:
            err = prompt_too_long(longest, self.max_model_len)
            err.param = "text"
            raise err
        return ids

    async def classify_with_head(self, request: Request, texts: list[str], head: tuple[str, LoadedHead],
                                 multi_label: bool, threshold: float, endpoint: str) -> list[Scored]:
        """The head's softmax over its labels; texts of concurrent requests share engine forwards.
        multi_label keeps every label whose probability reaches `threshold`."""
        assert self.heads is not None
        name, loaded = head  # the route has refused over-long texts by their characters
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            ids = self._head_ids(texts, loaded)
        else:
            ids = await self.prompts.run(self._head_ids, texts, loaded)
        heads = self.heads
        all_probs = await self._classify_work(request, lambda: heads.probabilities(name, loaded, ids), len(texts),
                                              endpoint, prompt_tokens=sum(len(x) for x in ids))
        results = []
        for x, probs in zip(ids, all_probs, strict=True):
            ranked = sorted(zip(loaded.info.labels, probs, strict=True), key=lambda lp: -lp[1])
            chosen = [lab for lab, p in ranked if p >= threshold] if multi_label else [ranked[0][0]]
            results.append(Scored(ranked[0][0], chosen, ranked, len(x), model=name))
            self._count(endpoint, "scored")
        return results

    def _count(self, endpoint: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.outcome(endpoint, outcome)


def _item_id(request_id: str, i: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{i}"


def finish_reason(reason: FinishReason | None) -> str | None:
    """The wire name of an output's finish reason ("stop", "length", ...); None while it runs."""
    return None if reason is None else reason.value


def _outcome_of(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | ClientGone):
        return "client_disconnected"
    if isinstance(exc, ApiError):
        return exc.kind
    return to_api_error(exc).kind


async def all_or_none(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await every item of a batch; the first failure cancels the others and waits until they have
    stopped (aborted in the engine) before it is raised, so the batch's admission slots are released
    only when none of its items still decodes."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (aborting its engine requests) and raise ClientGone if the client
    disconnects first. After the body is read, `receive()` returns only on disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):  # the client is gone; nothing to report
            await task
        raise ClientGone()
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
