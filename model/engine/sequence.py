"""Sequence: one request's state inside the engine, and RequestOutput: what a step reports for it.

Owns no tensors and no policy; the scheduler moves sequences between queues, the cache manager
gives them a slot, the runner reads their tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from model.engine.detokenizer import IncrementalDetokenizer
from model.grammar import Constraint
from model.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the caller


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely (token_id, logprob), n = params.logprobs


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]  # tokenizer stop ids + params.stop_token_ids (empty when ignore_eos)
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    adapter: int = 0  # the model it runs on: a model.engine.adapter_set key (0: the base model)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # output text emitted so far (the sum of the text deltas)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt: int = 0  # prompt tokens reused from the prefix cache
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    constraint: Constraint | None = None  # grammar state when params.response_format is set

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefill(self) -> bool:
        """True until every prompt token has its K/V in the cache."""
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:  # decoding: only output tokens, no copy of the prompt
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str  # new text, always whole UTF-8 characters, stop strings held back
    token_ids: list[int]  # every output id so far
    text: str  # every output text delta so far, joined
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # for new_token_ids, when requested
    stop_reason: str | int | None = None  # the stop string or token that ended it
    queue_time_s: float | None = None  # arrival -> first scheduled (time spent waiting for a slot)
