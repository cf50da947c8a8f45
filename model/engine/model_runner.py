"""ModelRunner: the only engine part that touches tensors — owns the models and the KV cache, packs a
scheduled step into one forward per model, and samples the next token of every sequence that needs one.

Several models share the cache (model/engine/adapter_set.py: the base and one merged-weights model per
LoRA adapter, same shapes): a step's chunks are grouped by the model their sequence runs on, and each
group is one forward over its own cache rows, so requests for different adapters share a step."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from model.device import intra_op_threads
from model.engine.adapter_set import BASE, AdapterSet
from model.engine.cuda_graphs import DecodeGraphs
from model.engine.scheduler import ScheduledChunk
from model.engine.sequence import Sequence, TokenLogprob
from model.grammar import fill_masks, mask_logits
from model.inference import InferenceModel
from model.kv_cache import KVCache
from model.sampling import sample_next, top_logprobs

PROMPT_BANKS = 2  # prompt sets whose K/V score_after keeps (LRU): one per label set in use
PROMPT_BANK_BYTES = 256 << 20  # a larger prompt set is recomputed per call instead of kept


@dataclass
class PromptBank:
    """K/V of several prompts (one cache row each, right-padded to the longest) and the log-probs of
    the token after each: what score_after reuses for every continuation scored after them."""
    cache: KVCache  # (layers, n, kv_heads, longest prompt, head_dim)
    lengths: list[int]
    first: torch.Tensor  # (n, vocab) log p(next token | prompt)


class ModelRunner:
    def __init__(self, model: InferenceModel, n_slots: int, max_seq_len: int, valid_vocab: int | None = None,
                 cuda_graphs: bool = False, small_step_tokens: int = 0) -> None:
        self.model = model
        self.adapters = AdapterSet(model)
        self.device = model.device
        # a model may have more output rows than its tokenizer has tokens (padding): never sample those
        self.valid_vocab = valid_vocab if valid_vocab and valid_vocab < model.config.vocab_size else None
        graphs = cuda_graphs and model.capabilities.supports_cuda_graphs
        # with CUDA graphs one more cache row takes the padding rows' K/V (never a sequence's slot)
        self.cache = KVCache(model.config, n_slots + graphs, max_seq_len, dtype=model.cache_dtype, device=self.device)
        self.decode_graphs = DecodeGraphs(model, self.cache, n_slots, scratch_slot=n_slots) if graphs else None
        self._banks: OrderedDict[tuple[int, tuple[tuple[int, ...], ...]], PromptBank] = OrderedDict()
        # constrained sequences' token masks are filled on this thread while the forward runs (a mask needs
        # only the tokens already accepted); False: filled inline after the forward (bench.structured)
        self.overlap_masks = True
        self._mask_thread: ThreadPoolExecutor | None = None  # started by the first constrained step
        # fewer threads for small steps only where that cannot change a result (batch invariance)
        self.small_step_tokens = small_step_tokens if model.capabilities.thread_invariant else 0

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> list[int]:
        """Run one forward per model over its chunks; return the sampled token for each chunk with
        `samples=True`, in order."""
        groups: dict[int, list[int]] = {}  # model key -> indexes of its chunks
        for i, c in enumerate(chunks):
            groups.setdefault(c.seq.adapter, []).append(i)
        with intra_op_threads(self._threads_for(sum(c.length for c in chunks))):
            if len(groups) == 1:
                [key] = groups
                return self._execute(key, chunks)
            sampled: dict[int, int] = {}
            for key, indexes in groups.items():
                tokens = iter(self._execute(key, [chunks[i] for i in indexes]))
                sampled.update((i, next(tokens)) for i in indexes if chunks[i].samples)
            return [sampled[i] for i, c in enumerate(chunks) if c.samples]

    def _threads_for(self, n_tokens: int) -> int:
        """Intra-op threads for a step of `n_tokens`: one fewer than torch has for a small CPU step
        (EngineConfig.small_step_tokens), else all."""
        threads = torch.get_num_threads()
        return max(1, threads - 1) if n_tokens <= self.small_step_tokens else threads

    def _execute(self, key: int, chunks: list[ScheduledChunk]) -> list[int]:
        """One forward of model `key` over `chunks` (all its sequences)."""
        model = self.adapters.model(key)
        # 1. pack tokens and positions: (1, N)
        tokens: list[int] = []
        positions: list[int] = []
        logits_index: list[int] = []
        for c in chunks:
            tokens += c.seq.tokens(c.start, c.start + c.length)
            positions += range(c.start, c.start + c.length)
            if c.samples:
                logits_index.append(len(tokens) - 1)
        sampling = [c.seq for c in chunks if c.samples]
        masks = self._start_masks(sampling)
        if self.decode_graphs is not None and key == BASE and len(tokens) == len(logits_index) == len(chunks):  # pure decode
            logits = self.decode_graphs.run(tokens, [c.seq.slot for c in chunks], positions).float()
            return self.sample(self._mask_vocab(logits), sampling, masks)
        batch = self.cache.batch([c.seq.slot for c in chunks], [c.start for c in chunks],
                                 [c.length for c in chunks])
        t = torch.tensor([tokens], device=self.device)
        p = torch.tensor([positions], device=self.device)
        if not logits_index:
            model(t, p, kv_cache=batch, logits_index=torch.tensor([0], device=self.device))
            return []
        # 2. forward; logits only where a token is sampled: (K, V)
        logits = self._mask_vocab(model(t, p, kv_cache=batch,
                                             logits_index=torch.tensor(logits_index, device=self.device)).float())
        # 3. sample
        return self.sample(logits, sampling, masks)

    def _mask_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.valid_vocab is not None:
            logits[:, self.valid_vocab:] = float("-inf")
        return logits

    def _start_masks(self, seqs: list[Sequence]) -> Future[torch.Tensor] | None:
        """Fill the constrained sequences' masks on the mask thread (None: no constrained sequence, or
        overlap off). The engine thread touches these matchers again only after `.result()`."""
        constraints = [s.constraint for s in seqs if s.constraint is not None]
        if not constraints or not self.overlap_masks:
            return None
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="seedling-masks")
        return self._mask_thread.submit(fill_masks, constraints)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], masks: Future[torch.Tensor] | None = None
               ) -> list[int]:
        """logits (K, V) fp32, one row per sequence -> next token ids. Constrained rows are masked first
        (any device, after the forward; `masks` from `_start_masks`, else filled now) and their grammar
        advances with the token drawn."""
        constrained = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if constrained:
            bitmask = masks.result() if masks is not None else fill_masks([seqs[i].constraint for i in constrained])
            mask_logits(logits, constrained, bitmask)
        plain = [i for i, s in enumerate(seqs) if s.params.is_plain_greedy
                 and len(s.output_ids) >= s.params.min_tokens]
        out = [0] * len(seqs)
        if plain:
            ids = logits[plain].argmax(dim=-1).tolist() if len(plain) < len(seqs) else logits.argmax(-1).tolist()
            for i, token in zip(plain, ids, strict=True):
                out[i] = token
        plain_set = set(plain)
        for i, seq in enumerate(seqs):
            if i not in plain_set:
                banned = sorted(seq.stop_ids) if len(seq.output_ids) < seq.params.min_tokens else ()
                out[i] = sample_next(logits[i], seq.params, seq.generator, seq.prompt_ids, seq.output_ids,
                                     banned)
            if seq.params.logprobs is not None:
                chosen, top = top_logprobs(logits[i], out[i], seq.params.logprobs)
                seq.logprobs.append(TokenLogprob(out[i], chosen, top))
        for i in constrained:
            seqs[i].constraint.advance(out[i])
        return out

    def score(self, prompt_ids: list[int], continuations: list[list[int]], group: int = 16, key: int = BASE
              ) -> list[float]:
        """Sum of log p(continuation | prompt) for each continuation under model `key` (`score_steps`
        run to the end)."""
        return run_to_end(self.score_steps(prompt_ids, continuations, group, key))

    @torch.inference_mode()  # torch enters the mode around each piece of the generator
    def score_steps(self, prompt_ids: list[int], continuations: list[list[int]], group: int = 16,
                    key: int = BASE, chunk: int = 256) -> Generator[None, None, list[float]]:
        """`score` one forward at a time: the prompt in pieces of at most `chunk` tokens, then one packed
        forward per `group` continuations, yielding after each. The engine thread runs decode steps
        between pieces, so scoring delays other users as much as a prefill chunk does.

        The prompt's K/V are copied into one scratch-cache row per continuation (a scratch cache, so
        scoring never takes a serving slot); the generator's return value is the scores."""
        model = self.adapters.model(key)
        P = len(prompt_ids)
        rows = min(group, len(continuations))
        cache = KVCache(self.model.config, rows, P + max(len(c) for c in continuations),
                        dtype=self.model.cache_dtype, device=self.device)
        prompt = torch.tensor([prompt_ids], device=self.device)
        for start in range(0, P, chunk):
            n = min(chunk, P - start)
            logits = model(prompt[:, start:start + n], torch.arange(start, start + n, device=self.device)[None],
                           kv_cache=cache.batch([0], [start], [n]), logits_index=torch.tensor([n - 1], device=self.device))
            if start + n < P:
                yield
        first = logits.float().log_softmax(-1)[0]  # (V,): the distribution after the whole prompt
        cache.copy_prefix(0, slice(1, None), P)
        scores = [float(first[c[0]]) for c in continuations]
        for g in range(0, len(continuations), rows):
            rest = [(i, c) for i, c in enumerate(continuations[g:g + rows]) if len(c) > 1]
            if not rest:
                continue
            yield
            feed = [t for _, c in rest for t in c[:-1]]
            positions = [P + j for _, c in rest for j in range(len(c) - 1)]
            batch = cache.batch([i for i, _ in rest], [P] * len(rest), [len(c) - 1 for _, c in rest])
            logp = model(torch.tensor([feed], device=self.device), torch.tensor([positions], device=self.device),
                         kv_cache=batch).float().log_softmax(-1)[0]  # (N, V)
            targets = torch.tensor([t for _, c in rest for t in c[1:]], device=self.device)
            picked = logp.gather(1, targets[:, None])[:, 0].tolist()
            k = 0
            for i, c in rest:
                scores[g + i] += sum(picked[k:k + len(c) - 1])
                k += len(c) - 1
        return scores

    # ------------------------------------------------------------------ one continuation, many prompts
    def score_after(self, prompts: list[list[int]], continuation: list[int], group: int = 16, key: int = BASE
                    ) -> list[float]:
        """Sum of log p(continuation | prompt) for each prompt under model `key` (`score_after_steps` run
        to the end)."""
        return run_to_end(self.score_after_steps(prompts, continuation, group, key))

    @torch.inference_mode()
    def score_after_steps(self, prompts: list[list[int]], continuation: list[int], group: int = 16,
                          key: int = BASE, chunk: int = 256) -> Generator[None, None, list[float]]:
        """`score_after` one forward at a time (yielding between them): /classify's channel direction, a
        text's likelihood after each label's prompt. The prompts run once and their K/V are kept
        (PromptBank, LRU of PROMPT_BANKS sets), so the next continuation after the same prompts costs
        only its own tokens: len(prompts) rows of len(continuation) - 1 tokens, in forwards of at most
        `chunk` tokens in a scratch cache (never a serving slot)."""
        bank = yield from self._bank(prompts, key, group)
        scores: list[float] = []
        for g in range(0, len(prompts), group):
            n = min(group, len(prompts) - g)
            if bank is None:  # too large to keep: this group's prompts now, dropped after
                part = yield from self._build_bank(prompts[g:g + n], key, group)
                scores += yield from self._continue(part, 0, n, continuation, key, chunk)
            else:
                scores += yield from self._continue(bank, g, n, continuation, key, chunk)
            if g + n < len(prompts):
                yield
        return scores

    def _continue(self, bank: PromptBank, lo: int, n: int, continuation: list[int], key: int, chunk: int
                  ) -> Generator[None, None, list[float]]:
        """log p(continuation | prompt) for the bank's rows lo..lo+n-1, n * (C-1) tokens in forwards of at
        most `chunk`: several rows packed when the continuation is short, one row's continuation in
        pieces when it is long (a long text would otherwise be one forward of up to n * max_model_len
        tokens, and as many rows of logits, while every other request waits)."""
        scores = bank.first[lo:lo + n, continuation[0]].tolist()
        C = len(continuation)
        if C == 1:
            return scores
        model = self.adapters.model(key)
        lengths = bank.lengths[lo:lo + n]
        P = max(lengths)
        piece = min(C - 1, chunk)
        rows = max(1, chunk // piece)
        for r0 in range(0, n, rows):
            m = min(rows, n - r0)
            scratch = KVCache(self.model.config, m, P + C - 1, dtype=self.model.cache_dtype, device=self.device)
            # a shorter prompt's padding positions are written by its continuation before anything reads them
            scratch.k[:, :, :, :P] = bank.cache.k[:, lo + r0:lo + r0 + m, :, :P]
            scratch.v[:, :, :, :P] = bank.cache.v[:, lo + r0:lo + r0 + m, :, :P]
            starts = lengths[r0:r0 + m]
            for s in range(0, C - 1, piece):
                if r0 or s:
                    yield
                e = min(C - 1, s + piece)
                positions = [start + j for start in starts for j in range(s, e)]
                logp = model(torch.tensor([continuation[s:e] * m], device=self.device),
                             torch.tensor([positions], device=self.device),
                             kv_cache=scratch.batch(list(range(m)), [start + s for start in starts], [e - s] * m)
                             ).float().log_softmax(-1)[0]  # (m * (e-s), V)
                targets = torch.tensor(continuation[s + 1:e + 1] * m, device=self.device)
                picked = logp.gather(1, targets[:, None])[:, 0].view(m, e - s).sum(1).tolist()
                for i in range(m):
                    scores[r0 + i] += picked[i]
        return scores

    def _bank(self, prompts: list[list[int]], key: int, group: int) -> Generator[None, None, PromptBank | None]:
        """The kept PromptBank of these prompts (built on first use), or None when it would exceed
        PROMPT_BANK_BYTES (score_after then builds one per group and drops it)."""
        ident = (key, tuple(tuple(p) for p in prompts))
        if ident in self._banks:
            self._banks.move_to_end(ident)
            return self._banks[ident]
        longest = max(len(p) for p in prompts)
        if KVCache.bytes_needed(self.model.config, len(prompts), longest, self.model.cache_dtype) > PROMPT_BANK_BYTES:
            return None
        bank = yield from self._build_bank(prompts, key, group)
        self._banks[ident] = bank
        while len(self._banks) > PROMPT_BANKS:
            self._banks.popitem(last=False)
        return bank

    def _build_bank(self, prompts: list[list[int]], key: int, group: int) -> Generator[None, None, PromptBank]:
        """Run `prompts` (packed, `group` per forward, yielding between forwards) into a cache of their
        own: one row each."""
        model = self.adapters.model(key)
        lengths = [len(p) for p in prompts]
        cache = KVCache(self.model.config, len(prompts), max(lengths), dtype=self.model.cache_dtype,
                        device=self.device)
        first = []
        for g in range(0, len(prompts), group):
            part = prompts[g:g + group]
            tokens = [t for p in part for t in p]
            positions = [i for p in part for i in range(len(p))]
            ends = torch.tensor(lengths[g:g + group], device=self.device).cumsum(0) - 1
            batch = cache.batch(list(range(g, g + len(part))), [0] * len(part), lengths[g:g + group])
            first.append(model(torch.tensor([tokens], device=self.device), torch.tensor([positions], device=self.device),
                               kv_cache=batch, logits_index=ends).float().log_softmax(-1))  # (len(part), V)
            yield
        return PromptBank(cache, lengths, torch.cat(first))


T = TypeVar("T")


def run_to_end(steps: Generator[None, None, T]) -> T:
    """Drive a piecewise job (`ModelRunner.score_steps`) to its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
