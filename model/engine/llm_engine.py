"""LLMEngine: continuous batching over a KV cache — token ids in, token ids (and text deltas) out.

    served = load_for_serving(path)                      # model.inference: the InferenceModel + tokenizer
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=16))
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step(): ...

Not thread-safe: one thread owns an engine (the server's engine client runs it on its own thread).
The tokenizer is used only to turn output tokens into text deltas and to match stop strings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.engine.cache_manager import CacheManager
from model.engine.detokenizer import IncrementalDetokenizer
from model.engine.model_runner import ModelRunner, run_to_end
from model.engine.scheduler import Scheduler
from model.engine.sequence import FinishReason, RequestOutput, Sequence, SequenceStatus
from model.grammar import Constraint, GrammarCompiler
from model.inference import InferenceModel
from model.kv_cache import KVCache
from model.sampling import SamplingError, SamplingParams, make_generator

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request the engine cannot take; the message is safe to show to the caller."""


class PromptTooLong(EngineError):
    def __init__(self, prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(f"prompt has {prompt_tokens} tokens but the model accepts at most "
                         f"{max_model_len - 1} prompt tokens (max_model_len {max_model_len}, "
                         "which also bounds prompt + generated tokens)")
        self.prompt_tokens, self.max_model_len = prompt_tokens, max_model_len


class RequestRejected(EngineError):
    pass


@dataclass
class EngineConfig:
    max_num_seqs: int = 16  # sequences decoded together (= KV-cache slots)
    max_model_len: int = 2048  # prompt + output tokens per sequence (= KV-cache slot length)
    max_num_batched_tokens: int = 512  # tokens per forward: decodes + prefill chunks
    prefill_chunk: int = 256  # longest prefill piece per sequence per step
    enable_prefix_caching: bool = True
    max_kv_cache_bytes: int | None = None  # refuse to start if the cache would need more
    # on a GPU, replay pure decode steps as CUDA graphs (model/engine/cuda_graphs.py). Opt-in: the padded
    # steps are tested on CPU, the recording itself has not run on a GPU yet (bench/gpu_check.py does)
    cuda_graphs: bool = False
    # a step of at most this many tokens runs on one thread fewer than torch has (0 = off), on models whose
    # outputs do not depend on the thread count (Capabilities.thread_invariant: the native q4 path). A
    # small step gains little from the last core, and the server's HTTP side and its clients need it
    # (HTTP, 2-core EPYC: C=1 78 -> 155 tok/s, C=4 295 -> 368, C=8 329 -> 384; at C=16 all threads win)
    small_step_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode token per sequence)")


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_slots_used: int
    kv_slots_total: int
    kv_tokens_used: int
    kv_tokens_total: int
    kv_cache_bytes: int
    prefix_cache_hits: int
    prefix_cache_misses: int
    prefix_cache_tokens: int

    @property
    def kv_usage(self) -> float:
        return self.kv_tokens_used / self.kv_tokens_total if self.kv_tokens_total else 0.0


class LLMEngine:
    def __init__(self, model: InferenceModel, tokenizer: Tokenizer | None, config: EngineConfig | None = None
                 ) -> None:
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        if config.max_model_len > model.config.max_seq_len:
            log.warning("max_model_len %d exceeds the model's trained length %d", config.max_model_len,
                        model.config.max_seq_len)
        need = KVCache.bytes_needed(model.config, config.max_num_seqs, config.max_model_len, model.cache_dtype)
        if config.max_kv_cache_bytes is not None and need > config.max_kv_cache_bytes:
            raise ValueError(f"KV cache needs {need / 2**20:.0f} MiB for {config.max_num_seqs} sequences x "
                             f"{config.max_model_len} tokens, over the {config.max_kv_cache_bytes / 2**20:.0f} "
                             "MiB allowed; lower max_num_seqs or max_model_len")
        self.runner = ModelRunner(model, config.max_num_seqs, config.max_model_len,
                                  valid_vocab=tokenizer.vocab_size if tokenizer else None,
                                  cuda_graphs=config.cuda_graphs, small_step_tokens=config.small_step_tokens)
        self.cache_manager = CacheManager(config.max_num_seqs, config.max_model_len,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.cache_manager, config.max_num_batched_tokens, config.prefill_chunk)
        self._seqs: dict[str, Sequence] = {}
        self._grammars: GrammarCompiler | None = None
        self._base_stop_ids = frozenset(tokenizer.stop_ids) if tokenizer else frozenset(
            [model.config.eos_token_id] if model.config.eos_token_id is not None else [])
        log.info("KV cache: %d slots x %d tokens, %.1f MiB (%s, %s on %s)", config.max_num_seqs,
                 config.max_model_len, need / 2**20, model.capabilities.path, model.cache_dtype, model.device)

    # ------------------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams,
                    adapter: str | None = None) -> None:
        """Queue a request; `adapter` names a served LoRA adapter (add_adapter), None the base model.
        Raises UnknownAdapter, RequestRejected, PromptTooLong or SamplingError (nothing is queued)."""
        prompt_ids = list(prompt_ids)
        if request_id in self._seqs:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise RequestRejected("prompt is empty")
        if len(prompt_ids) >= self.config.max_model_len:
            raise PromptTooLong(len(prompt_ids), self.config.max_model_len)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRejected(f"prompt contains token ids outside [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:  # an index_add_ past the row would kill the step
            raise SamplingError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._base_stop_ids)
        detok = IncrementalDetokenizer(self.tokenizer.token_bytes, params.stop) if self.tokenizer else None
        seq = Sequence(request_id, prompt_ids, params, stop_ids, make_generator(params, self.runner.device),
                       detok, constraint=self._constraint(params, stop_ids, self._tokens_left(params, 0, len(prompt_ids))),
                       adapter=self.runner.adapters.acquire(adapter))
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _constraint(self, params: SamplingParams, stop_ids: frozenset[int], budget: int) -> Constraint | None:
        """The grammar state for a response_format (compiled once per schema; raises GrammarError);
        `budget`: the most tokens the sequence can generate, whose last few close a JSON output."""
        if params.response_format is None:
            return None
        if self.tokenizer is None:
            raise RequestRejected("response_format needs the engine to have a tokenizer")
        if self._grammars is None:  # built on first use: it indexes the whole vocabulary
            self._grammars = GrammarCompiler(self.tokenizer)
        return self._grammars.compile(params.response_format).start(stop_ids, budget)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its cache slot now; returns its final output, if it existed."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self._finish(seq)
        seq.finish_reason = FinishReason.ABORT
        return self._output(seq, [], "", None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        for allocation in plan.admitted:
            if allocation.copy_from is not None:
                self.runner.cache.copy_prefix(allocation.copy_from, allocation.slot, allocation.cached_tokens)
        sampled = iter(self.runner.execute(plan.chunks))
        outputs = []
        for chunk in plan.chunks:
            seq = chunk.seq
            self.cache_manager.record(seq.slot, seq.tokens(chunk.start, chunk.start + chunk.length))
            seq.num_computed += chunk.length
            if chunk.samples:
                outputs.append(self._append_token(seq, next(sampled)))
        return outputs

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_ids.append(token)
        delta, stop_reason = "", None
        if token in seq.stop_ids:
            seq.finish_reason, stop_reason = FinishReason.STOP, token
        elif seq.detokenizer is not None:
            delta = seq.detokenizer.add(token)
            if seq.detokenizer.stopped_by is not None:
                seq.finish_reason, stop_reason = FinishReason.STOP, seq.detokenizer.stopped_by
        if seq.finish_reason is None and self._tokens_left(seq.params, len(seq.output_ids), seq.num_tokens) <= 0:
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            if seq.detokenizer is not None:
                delta += seq.detokenizer.flush()
            self._finish(seq)
            del self._seqs[seq.request_id]
        return self._output(seq, [token], delta, stop_reason)

    def _tokens_left(self, params: SamplingParams, generated: int, length: int) -> int:
        """Tokens a sequence of `length` tokens, `generated` of them its own, may still generate: its
        max_tokens and the context length both end it (FinishReason.LENGTH)."""
        return min(params.max_tokens - generated, self.config.max_model_len - length)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.runner.adapters.release(seq.adapter)

    def _output(self, seq: Sequence, new_ids: list[int], delta: str, stop_reason: str | int | None
                ) -> RequestOutput:
        logprobs = seq.logprobs[-len(new_ids):] if seq.params.logprobs is not None and new_ids else None
        seq.text += delta
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, text_delta=delta,
            token_ids=list(seq.output_ids), text=seq.text, finished=seq.status is SequenceStatus.FINISHED,
            finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids), cached_tokens=seq.num_cached_prompt,
            logprobs=logprobs, stop_reason=stop_reason,
            queue_time_s=None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time,
        )

    # ------------------------------------------------------------------------------ offline
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[RequestOutput]:
        """Run prompts to completion; returns each one's final output (`.text` is the whole text)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        ids_set = set(ids)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished and out.request_id in ids_set:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def score(self, prompt_ids: list[int], continuations: list[list[int]], adapter: str | None = None
              ) -> list[float]:
        """Sum of log p(continuation | prompt) for each continuation (ranks /classify labels), under
        `adapter` (None: the base model)."""
        return run_to_end(self.score_steps(prompt_ids, continuations, adapter))

    def score_steps(self, prompt_ids: list[int], continuations: list[list[int]], adapter: str | None = None
                    ) -> Generator[None, None, list[float]]:
        """`score` as a generator of forwards (`ModelRunner.score_steps`: pieces no longer than a prefill
        chunk), for a caller that interleaves them with `step()`. Bad input raises here, not at the
        first piece."""
        if not prompt_ids or not continuations or any(not c for c in continuations):
            raise RequestRejected("scoring needs a non-empty prompt and non-empty continuations")
        longest = len(prompt_ids) + max(len(c) for c in continuations)
        if longest > self.config.max_model_len:
            raise PromptTooLong(longest, self.config.max_model_len + 1)
        return self._under_adapter(adapter, lambda key: self.runner.score_steps(
            prompt_ids, continuations, key=key, chunk=self.config.prefill_chunk))

    def _under_adapter(self, adapter: str | None, steps: Callable[[int], Generator[None, None, list[float]]]
                       ) -> Generator[None, None, list[float]]:
        """Run the piecewise job `steps(model key)` holding `adapter` (released however the generator
        ends, closed included)."""
        key = self.runner.adapters.acquire(adapter)
        try:
            return (yield from steps(key))
        finally:
            self.runner.adapters.release(key)

    def score_after(self, prompts: list[list[int]], continuation: list[int], adapter: str | None = None
                    ) -> list[float]:
        """Sum of log p(continuation | prompt) for each prompt (/classify's channel scoring: a text after
        each label's prompt), under `adapter` (None: the base model). The prompts' K/V are kept between
        calls, so scoring many texts after the same prompts pays for the prompts once."""
        return run_to_end(self.score_after_steps(prompts, continuation, adapter))

    def score_after_steps(self, prompts: list[list[int]], continuation: list[int], adapter: str | None = None
                          ) -> Generator[None, None, list[float]]:
        """`score_after` as a generator of forwards (`ModelRunner.score_after_steps`), for a caller that
        interleaves them with `step()`. Bad input raises here, not at the first piece."""
        if not prompts or any(not p for p in prompts) or not continuation:
            raise RequestRejected("scoring needs non-empty prompts and a non-empty continuation")
        longest = max(len(p) for p in prompts) + len(continuation)
        if longest > self.config.max_model_len:
            raise PromptTooLong(longest, self.config.max_model_len + 1)
        return self._under_adapter(adapter, lambda key: self.runner.score_after_steps(
            prompts, continuation, key=key, chunk=self.config.prefill_chunk))

    # ----------------------------------------------------------------------------- adapters
    def add_adapter(self, name: str, model: InferenceModel) -> None:
        """Serve `model` (the base merged with a LoRA adapter, model.inference.adapt_for_serving) as
        `name`; a later request naming it runs on it, in the same steps as every other model's. An
        adapter already served under `name` is replaced for new requests; running ones finish on it."""
        self.runner.adapters.add(name, model)
        log.info("adapter %s: serving (%d adapters)", name, len(self.runner.adapters.names()))

    def remove_adapter(self, name: str) -> bool:
        """Stop serving `name` to new requests (running ones finish); False if it was not served."""
        removed = self.runner.adapters.remove(name)
        if removed:
            log.info("adapter %s: removed", name)
        return removed

    def adapter_names(self) -> list[str]:
        """The adapters new requests may name; safe to call from any thread (an immutable snapshot)."""
        return self.runner.adapters.names()

    def stats(self) -> EngineStats:
        running = self.scheduler.running
        return EngineStats(
            running=len(running), waiting=len(self.scheduler.waiting),
            kv_slots_used=self.cache_manager.num_used, kv_slots_total=self.config.max_num_seqs,
            kv_tokens_used=sum(s.num_computed for s in running),
            kv_tokens_total=self.config.max_num_seqs * self.config.max_model_len,
            kv_cache_bytes=self.runner.cache.nbytes,
            prefix_cache_hits=self.cache_manager.prefix_hits,
            prefix_cache_misses=self.cache_manager.prefix_misses,
            prefix_cache_tokens=self.cache_manager.prefix_tokens_reused,
        )

