"""SamplingParams and the functions that turn one row of logits into the next token.

Both the oracle (`model.generate`) and the batching engine call `sample_next`, so a request samples
the same way whichever path runs it. Every request that samples owns a `torch.Generator` seeded
from its `seed`: its tokens then do not depend on what else shares the batch.
"""

from __future__ import annotations

import math
import reprlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.grammar import OutputFormat

MAX_LOGIT_BIAS = 300  # logit_bias entries per request (OpenAI's limit)
MAX_BIAS = 100.0  # |bias| per entry (OpenAI's range)
MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string (the engine's matcher holds this many back at most)


class SamplingError(ValueError):
    """Invalid sampling parameters (a client error: the HTTP layer maps it to 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens to generate at most
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p * p(most likely)
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # subtract once from every token already generated
    frequency_penalty: float = 0.0  # subtract per occurrence in the generated tokens
    seed: int | None = None  # per-request generator seed; None draws a fresh seed
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end generation (EOS is added by the engine)
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized text, never emitted
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    min_tokens: int = 0  # EOS/stop ids are masked until this many tokens exist
    logprobs: int | None = None  # return log-probabilities of the chosen and top-n tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit each step
    # output must match this JSON schema or tool-call format (model.grammar): the engine masks every
    # step's logits with it
    response_format: OutputFormat | None = None
    # logit_bias as (ids, values) tensors, built once here so each step applies it in one add
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop = tuple(self.stop)
        self._check()
        if self.logit_bias:
            self._bias = (torch.tensor(list(self.logit_bias), dtype=torch.long),
                          torch.tensor(list(self.logit_bias.values()), dtype=torch.float32))

    def _check(self) -> None:
        bias = self.logit_bias
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
            (len(self.stop) <= MAX_STOPS, "stop", f"must have at most {MAX_STOPS} strings"),
            (all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
             f"strings must be at most {MAX_STOP_CHARS} characters"),
            (len(bias) <= MAX_LOGIT_BIAS, "logit_bias", f"must have at most {MAX_LOGIT_BIAS} entries"),
            (all(isinstance(k, int) and k >= 0 for k in bias), "logit_bias", "keys must be token ids >= 0"),
            (all(math.isfinite(v) and abs(v) <= MAX_BIAS for v in bias.values()), "logit_bias",
             f"values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}]"),
            # a grammar ends on a stop token; past it there is nothing left to allow
            (not (self.ignore_eos and self.response_format), "ignore_eos", "cannot be combined with response_format"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise SamplingError(f"{name} {why}, got {reprlib.repr(getattr(self, name))}", param=name)

    @property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """logit_bias as CPU (ids (n,) long, values (n,) fp32), or None when there is none."""
        return self._bias

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def is_plain_greedy(self) -> bool:
        """Argmax of the raw logits: the batched fast path can take these rows together."""
        return self.greedy and not self.needs_history and not self.logit_bias and self.min_tokens == 0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                   output_ids: Sequence[int], banned_ids: Sequence[int] = ()) -> torch.Tensor:
    """Penalties, bias and banned ids on one row of fp32 logits (V,) -> adjusted logits (V,)."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty,
                                       vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = Counter(output_ids)
        ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= params.frequency_penalty * freq + params.presence_penalty
    if params.bias_tensors is not None:  # ids were checked against the vocabulary when the request was added
        ids, values = params.bias_tensors
        logits.index_add_(0, ids.to(logits.device), values.to(logits.device))
    if banned_ids:
        logits[torch.tensor(list(banned_ids), dtype=torch.long, device=logits.device)] = float("-inf")
    return logits


def filter_and_sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Temperature, top-k, top-p, min-p, then draw one token from processed logits (V,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs >= params.top_p  # keep the token that crosses top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return draw_token(probs, generator, fallback=logits)


def draw_token(probs: torch.Tensor, generator: torch.Generator | None, fallback: torch.Tensor) -> int:
    """One token from unnormalised probabilities (V,) by inverting their CDF with one uniform draw.

    Why not torch.multinomial: over a 49k vocabulary it took ~1.2 ms a row on this CPU (the engine
    samples each row apart, for per-request seeds), a cumsum + searchsorted ~0.07 ms. A zero-probability
    token is never chosen: its CDF step is empty. A degenerate row (NaN, or nothing left) falls back to
    the argmax of `fallback`.
    """
    cdf = torch.cumsum(probs, 0, dtype=torch.float64)
    total = float(cdf[-1])
    if not math.isfinite(total) or total <= 0:
        return int(torch.argmax(fallback))  # extreme parameters: greedy
    uniform = float(torch.rand((), generator=generator, dtype=torch.float64, device=probs.device))
    point = min(uniform * total, math.nextafter(total, 0.0))  # < cdf[-1], so an index < V is found
    return int(torch.searchsorted(cdf, torch.tensor(point, dtype=torch.float64, device=probs.device), right=True))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                prompt_ids: Sequence[int], output_ids: Sequence[int], banned_ids: Sequence[int] = ()) -> int:
    """One row of raw logits (V,) -> the next token id."""
    if params.is_plain_greedy and not banned_ids:
        return int(torch.argmax(logits))
    processed = process_logits(logits, params, prompt_ids, output_ids, banned_ids)
    return filter_and_sample(processed, params, generator)


def top_logprobs(logits: torch.Tensor, token_id: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token_id` under raw logits (V,), and the n most likely (id, logprob)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = float(logp[token_id])
    if n <= 0:
        return chosen, []
    values, ids = torch.topk(logp, n)
    return chosen, list(zip(ids.tolist(), values.tolist(), strict=True))
