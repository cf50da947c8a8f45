"""Continuous batching over a KV cache: token ids in, token ids (and text deltas) out.

Sequence (state) -> Scheduler + CacheManager (plain-Python bookkeeping) -> ModelRunner (tensors)
-> LLMEngine (the API: add_request, step, abort, has_unfinished, generate, score, stats).
"""

from model.engine.adapter_set import UnknownAdapter
from model.engine.llm_engine import (
    EngineConfig,
    EngineError,
    EngineStats,
    LLMEngine,
    PromptTooLong,
    RequestRejected,
)
from model.engine.sequence import FinishReason, RequestOutput, SequenceStatus, TokenLogprob

__all__ = [
    "EngineConfig", "EngineError", "EngineStats", "FinishReason", "LLMEngine", "PromptTooLong",
    "RequestOutput", "RequestRejected", "SequenceStatus", "TokenLogprob", "UnknownAdapter",
]
