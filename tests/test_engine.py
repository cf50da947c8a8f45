"""The batching engine against the oracle: same tokens whatever the batch, cache or arrival order."""

from __future__ import annotations

import random

import pytest
import torch

from model.config import preset
from model.device import intra_op_threads
from model.engine import EngineConfig, FinishReason, LLMEngine, PromptTooLong, RequestRejected
from model.generate import generate
from model.inference import prepare_for_serving
from model.kv_cache import KVCache
from model.sampling import SamplingParams
from model.transformer import Transformer

VOCAB = 256


class LetterTokenizer:
    """Token i is two ASCII letters: enough for the engine's text handling (deltas, stop strings)."""

    stop_ids = frozenset()
    vocab_size = VOCAB

    def token_bytes(self, token_id: int) -> bytes:
        letters = "abcdefghijklmnopqrstuvwxyz"
        return (letters[token_id % 26] + letters[token_id // 26 % 26]).encode()


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("test", vocab_size=VOCAB, max_seq_len=1024)).init_weights(seed=1).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    lengths = [5, 500, 17, 64, 230, 9, 120, 33, 301, 6, 77, 150, 12, 420, 45, 88]
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def oracle(model, prompts) -> list[list[int]]:
    greedy = SamplingParams(max_tokens=12, temperature=0)
    return [generate(model, p, greedy) for p in prompts]


def make_engine(model: Transformer, **kw) -> LLMEngine:
    """An engine serving `model` (through the torch serving path: fused projections) — the oracle runs the
    Transformer itself."""
    cfg = dict(max_num_seqs=6, max_model_len=640, max_num_batched_tokens=96, prefill_chunk=64)
    return LLMEngine(prepare_for_serving(model), LetterTokenizer(), EngineConfig(**{**cfg, **kw}))


def run_staggered(engine: LLMEngine, prompts, params, arrivals: list[int]) -> dict[str, list[int]]:
    """Add prompt i at step arrivals[i]; run to completion; return every request's tokens."""
    results: dict[str, list[int]] = {}
    step = 0
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], params[i] if isinstance(params, list) else params)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    return results


# ------------------------------------------------------------------------- greedy correctness
def test_continuous_batching_matches_oracle(model, prompts, oracle):
    engine = make_engine(model)
    arrivals = [0, 0, 1, 3, 3, 4, 8, 9, 9, 15, 20, 21, 30, 31, 40, 41]
    results = run_staggered(engine, prompts, SamplingParams(max_tokens=12, temperature=0), arrivals)
    for i, expected in enumerate(oracle):
        assert results[str(i)] == expected, f"prompt {i} (len {len(prompts[i])}) diverged"
    assert engine.cache_manager.num_used == 0


def test_padded_graph_decode_steps_match_the_oracle(model, prompts, oracle):
    """The CUDA-graph decode path — steps padded to batch and key-length buckets, padding rows writing
    into a spare cache row, inputs read from fixed buffers — run eagerly here (CPU), through the same
    staggered arrivals: every request still gets the oracle's tokens, and some steps were padded."""
    from model.engine.cuda_graphs import DecodeGraphs

    engine = make_engine(model)
    runner, n = engine.runner, engine.config.max_num_seqs
    runner.cache = KVCache(model.config, n + 1, engine.config.max_model_len)
    runner.decode_graphs = graphs = DecodeGraphs(engine.model, runner.cache, n, scratch_slot=n, capture=False)
    assert graphs.batch_sizes == [1, 2, 4, 6] and graphs.key_lengths == [64, 128, 256, 512, 640]
    calls: list[int] = []
    run = graphs.run
    graphs.run = lambda tokens, slots, positions: calls.append(len(tokens)) or run(tokens, slots, positions)
    arrivals = [0, 0, 1, 3, 3, 4, 8, 9, 9, 15, 20, 21, 30, 31, 40, 41]
    results = run_staggered(engine, prompts, SamplingParams(max_tokens=12, temperature=0), arrivals)
    for i, expected in enumerate(oracle):
        assert results[str(i)] == expected, f"prompt {i} (len {len(prompts[i])}) diverged"
    assert any(c in (3, 5) for c in calls) and max(calls) == n  # padded steps and full ones both ran


def test_batch_invariance_alone_vs_crowd(model, prompts, oracle):
    greedy = SamplingParams(max_tokens=12, temperature=0)
    crowd = make_engine(model, max_num_seqs=16, max_num_batched_tokens=1024, prefill_chunk=512)
    together = {o.request_id: o.token_ids for o in [*crowd.generate(prompts, greedy)]}
    for i in (0, 1, 13):  # alone, in a fresh engine each
        alone = make_engine(model, max_num_seqs=1, max_num_batched_tokens=64).generate([prompts[i]], greedy)
        assert alone[0].token_ids == oracle[i]
    assert [together[k] for k in sorted(together, key=lambda k: int(k.rsplit("-", 1)[1]))] == oracle


def test_small_steps_run_on_fewer_threads_only_where_results_cannot_change(model):
    """EngineConfig.small_step_tokens: the q4 forward (thread-invariant) runs steps of <= 8 tokens on one
    thread fewer; the torch path, whose matmuls may round differently per thread count, never does."""
    q4 = LLMEngine(prepare_for_serving(model, "q4"), LetterTokenizer(), EngineConfig(max_num_seqs=4))
    fp32 = make_engine(model)
    with intra_op_threads(2):
        assert [q4.runner._threads_for(n) for n in (1, 8, 9, 64)] == [1, 1, 2, 2]
        assert [fp32.runner._threads_for(n) for n in (1, 64)] == [2, 2]
    with intra_op_threads(1):
        assert q4.runner._threads_for(1) == 1


def test_seeded_sampling_is_batch_invariant(model, prompts):
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = make_engine(model).generate([prompts[2]], sampled)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=s) for s in range(5)]
    engine = make_engine(model)
    outs = engine.generate([prompts[2]] + prompts[3:8], [sampled] + others)
    assert outs[0].token_ids == alone
    # the oracle draws from the same per-request generator
    assert generate(model, prompts[2], sampled) == alone
    # and a different seed gives a different stream
    assert make_engine(model).generate([prompts[2]], SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99))[0].token_ids != alone


def test_prefix_cache_reuse_gives_identical_tokens(model, prompts):
    shared = prompts[1][:300]  # a long "system prompt"
    rng = random.Random(3)
    requests = [shared + [rng.randrange(VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(6)]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    expected = [generate(model, r, greedy) for r in requests]
    engine = make_engine(model, max_num_seqs=3)
    # sequentially (free-slot reuse) and concurrently (copy from a busy slot)
    seq_outs = [engine.generate([r], greedy)[0].token_ids for r in requests[:3]]
    conc_outs = [o.token_ids for o in engine.generate(requests[3:], greedy)]
    assert seq_outs + conc_outs == expected
    assert engine.cache_manager.prefix_hits >= 4
    assert engine.cache_manager.prefix_tokens_reused >= 4 * 300


# ----------------------------------------------------------------------------- the KV cache
def test_cached_decoding_equals_full_recompute(model, prompts):
    prompt = prompts[3]
    cache = KVCache(model.config, n_slots=2, max_seq_len=256)
    ids = list(prompt)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), kv_cache=cache.batch([1], [0], [len(ids)]))[0, -1]
        for _ in range(24):
            full = model(torch.tensor([ids]))[0, -1]
            assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()
            ids.append(int(full.argmax()))
            pos = torch.tensor([[len(ids) - 1]])
            logits = model(torch.tensor([ids[-1:]]), pos, kv_cache=cache.batch([1], [len(ids) - 1], [1]))[0, -1]


# -------------------------------------------------------------------- finishing and freeing
def test_finish_reasons_and_eos(model, prompts, oracle):
    greedy = SamplingParams(max_tokens=12, temperature=0)
    out = make_engine(model).generate([prompts[0]], greedy)[0]
    assert out.finish_reason is FinishReason.LENGTH and out.completion_tokens == 12
    eos = oracle[0][4]  # pretend the 5th generated token is EOS
    tok = LetterTokenizer()
    tok.stop_ids = frozenset([eos])
    engine = LLMEngine(prepare_for_serving(model), tok, EngineConfig(max_num_seqs=2, max_model_len=640,
                                                                     max_num_batched_tokens=64))
    out = engine.generate([prompts[0]], greedy)[0]
    first = oracle[0].index(eos)
    assert out.finish_reason is FinishReason.STOP and out.token_ids == oracle[0][:first + 1]
    assert out.stop_reason == eos
    ignored = engine.generate([prompts[0]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == oracle[0] and ignored.finish_reason is FinishReason.LENGTH


def test_stop_string_across_tokens_never_leaks(model, prompts, oracle):
    tok = LetterTokenizer()
    full_text = b"".join(tok.token_bytes(t) for t in oracle[1]).decode()
    stop = full_text[3:6]  # the second letter of output token 1 and both letters of token 2
    engine = make_engine(model)
    engine.add_request("s", prompts[1], SamplingParams(max_tokens=12, temperature=0, stop=[stop, "zzzzzz"]))
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.text_delta)
            final = out
    text = "".join(deltas)
    assert final.finish_reason is FinishReason.STOP and final.stop_reason == stop
    assert text == full_text[:full_text.index(stop)]
    assert stop not in text


def test_abort_frees_slot_immediately(model, prompts):
    engine = make_engine(model, max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.cache_manager.num_used == 2 and engine.stats().waiting == 1
    final = engine.abort("r0")
    assert final.finished and final.finish_reason is FinishReason.ABORT
    assert engine.cache_manager.num_used == 1
    engine.abort("r2")  # waiting requests can be aborted too
    assert engine.stats().waiting == 0
    engine.step()
    engine.abort("r1")
    assert engine.cache_manager.num_used == 0 and not engine.has_unfinished()
    assert engine.abort("unknown") is None


def test_rejects_bad_requests_with_reasons(model):
    engine = make_engine(model, max_model_len=64)
    with pytest.raises(PromptTooLong, match="70 tokens"):
        engine.add_request("a", [1] * 70, SamplingParams())
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("b", [], SamplingParams())
    with pytest.raises(RequestRejected, match="outside"):
        engine.add_request("c", [VOCAB + 5], SamplingParams())
    engine.add_request("d", [1, 2], SamplingParams(max_tokens=100, temperature=0))
    with pytest.raises(RequestRejected, match="already in use"):
        engine.add_request("d", [1, 2], SamplingParams())
    out = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=100, temperature=0))[0]
    assert out.finish_reason is FinishReason.LENGTH and out.prompt_tokens + out.completion_tokens == 64


def test_kv_cache_size_is_checked_up_front(model):
    need = KVCache.bytes_needed(model.config, 8, 512, torch.float32)
    assert need == 2 * 2 * 8 * 2 * 512 * 16 * 4  # 2 (K,V) x layers x slots x kv_heads x len x head_dim x 4 B
    with pytest.raises(ValueError, match="KV cache needs"):
        LLMEngine(prepare_for_serving(model), None, EngineConfig(max_num_seqs=8, max_model_len=512,
                                                                 max_kv_cache_bytes=need - 1))


# -------------------------------------------------------------------------------- scoring
def test_score_matches_oracle_log_likelihood(model, prompts):
    engine = make_engine(model)
    prompt = prompts[4][:40]
    conts = [[1, 2, 3], [7], prompts[5]] + [[i, i + 1] for i in range(18)]  # 21: two packed groups
    scores = engine.score(prompt, conts)
    with torch.inference_mode():
        for cont, got in zip(conts, scores, strict=True):
            logp = torch.log_softmax(model(torch.tensor([prompt + cont]))[0].double(), -1)
            want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
            assert abs(got - want) < 1e-3


def test_score_steps_run_in_prefill_sized_pieces_with_the_same_scores(model, prompts):
    """A 230-token prompt scored in 64-token pieces (the engine's prefill chunk), then 21 continuations in
    two packed groups: 4 prompt pieces + 2 groups = 5 yields between 6 forwards, same scores as one call."""
    engine = make_engine(model)
    prompt = prompts[4]
    conts = [[1, 2, 3], [7], prompts[5]] + [[i, i + 1] for i in range(18)]
    steps = engine.score_steps(prompt, conts)
    pieces = 0
    while True:
        try:
            next(steps)
            pieces += 1
        except StopIteration as done:
            scores = done.value
            break
    assert pieces == 5
    whole = make_engine(model, prefill_chunk=512, max_num_batched_tokens=512).score(prompt, conts)
    assert scores == pytest.approx(whole, abs=1e-4)
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt + conts[0]]))[0].double(), -1)
    assert scores[0] == pytest.approx(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(conts[0])),
                                      abs=1e-3)


def test_score_steps_reject_bad_input_before_any_forward(model):
    engine = make_engine(model)
    for prompt, conts in (([], [[1]]), ([1, 2], []), ([1, 2], [[1], []]), ([1] * 640, [[1]])):
        with pytest.raises((RequestRejected, PromptTooLong)):
            engine.score_steps(prompt, conts)


def test_score_after_matches_oracle_log_likelihood(model, prompts, monkeypatch):
    """One continuation after each of many prompts (/classify's channel scoring): the full-recompute
    oracle's log-likelihood, whether the prompts' K/V are kept (the second call reuses them) or too
    large to keep (rebuilt per group)."""
    from model.engine import model_runner

    engine = make_engine(model)
    prompt_set = [p[:n] for p, n in zip(prompts, [5, 30, 17, 12, 40, 9, 25, 33, 3, 6, 21, 28, 12, 7, 45, 19,
                                                   8, 11], strict=False)]
    prompt_set += [prompts[0][:4], prompts[2][:13]]  # 18 prompts: two packed groups of 16
    with torch.inference_mode():
        def oracle(cont: list[int]) -> list[float]:
            out = []
            for p in prompt_set:
                logp = torch.log_softmax(model(torch.tensor([p + cont]))[0].double(), -1)
                out.append(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(cont)))
            return out

        for cont in ([3, 9, 27, 4], [11], prompts[5]):
            want = oracle(cont)
            for got in (engine.score_after(prompt_set, cont), engine.score_after(prompt_set, cont)):
                assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 1e-3
        assert len(engine.runner._banks) == 1  # one prompt set, kept
        # piecewise, as the server runs it between engine steps: 2 prompt groups, then 2 continuation groups
        steps, pieces = make_engine(model).score_after_steps(prompt_set, [3, 9, 27, 4]), 0
        while True:
            try:
                next(steps)
                pieces += 1
            except StopIteration as done:
                assert done.value == pytest.approx(oracle([3, 9, 27, 4]), abs=1e-3)
                break
        assert pieces == 3
        monkeypatch.setattr(model_runner, "PROMPT_BANK_BYTES", 0)
        fresh = make_engine(model)
        got = fresh.score_after(prompt_set, [3, 9, 27, 4])
        assert max(abs(g - w) for g, w in zip(got, oracle([3, 9, 27, 4]), strict=True)) < 1e-3
        assert not fresh.runner._banks
    with pytest.raises(PromptTooLong):
        engine.score_after([prompts[1]], prompts[8])


def test_score_after_runs_a_long_text_in_forwards_no_longer_than_a_prefill_chunk(model, prompts):
    """A long continuation after 16 prompts: every forward holds at most prefill_chunk tokens (rows packed
    while they fit, one row's text in pieces beyond), and the scores still equal one unbounded call's."""
    prompt_set = [p[:n] for p, n in zip(prompts, [5, 30, 17, 12, 40, 9, 25, 33, 3, 6, 21, 28, 12, 7, 45, 19],
                                        strict=True)]
    text = prompts[6][:100]  # 99 tokens to feed per prompt: 1,584 in all
    want = make_engine(model, prefill_chunk=4096, max_num_batched_tokens=4096).score_after(prompt_set, text)
    for chunk in (40, 256):  # pieces of one row's text; several rows per forward
        engine = make_engine(model, prefill_chunk=chunk)
        engine.score_after(prompt_set, [3])  # the prompts' K/V, kept: below, only the text's forwards run
        sizes: list[int] = []
        hook = engine.runner.model.register_forward_pre_hook(lambda _, args, sizes=sizes: sizes.append(args[0].shape[1]))
        got = engine.score_after(prompt_set, text)
        hook.remove()
        assert got == pytest.approx(want, abs=1e-3)
        assert max(sizes) <= chunk and sum(sizes) == 16 * 99


def test_logprobs_are_reported(model, prompts):
    out = make_engine(model).generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    assert out.logprobs is not None
    engine = make_engine(model)
    engine.add_request("x", prompts[0], SamplingParams(max_tokens=3, temperature=0, logprobs=2))
    records = []
    while engine.has_unfinished():
        for o in engine.step():
            records += o.logprobs
    assert len(records) == 3
    for r in records:
        assert len(r.top) == 2 and r.top[0][0] == r.token_id and r.logprob <= 0


# ------------------------------------------------------------------------ the real weights
@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8", "w8a8", "q4"])
def test_engine_on_smollm2_matches_transformers_greedy(smollm2_checkpoint, quantize):
    """All 5 reference prompts batched together through the fused (and optionally quantized) serving
    model: fp32 must equal transformers' greedy ids exactly; int8, w8a8 and q4 must agree on the 3 prompts
    with no near-tie (greeting, classify, factual)."""
    import json
    from pathlib import Path

    from model.inference import load_for_serving

    ref = json.loads((Path(__file__).parent / "fixtures" / "reference_outputs.json").read_text())
    served = load_for_serving(smollm2_checkpoint, quantize=quantize)
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=5, max_model_len=512,
                                                                    max_num_batched_tokens=128, prefill_chunk=64))
    outs = engine.generate([p["prompt_ids"] for p in ref["prompts"]],
                           SamplingParams(max_tokens=ref["new_tokens"], temperature=0))
    for case, out in zip(ref["prompts"], outs, strict=True):
        if quantize is None or case["id"] in ("greeting", "classify", "factual"):
            assert out.token_ids == case["hf_fp32_ids"], case["id"]
            assert out.text == case["hf_fp32_text"]


def test_never_samples_ids_the_tokenizer_lacks(tiny_checkpoint):
    """The tiny checkpoint's model has 512 output rows but its tokenizer 400 tokens."""
    from model.inference import load_for_serving

    served = load_for_serving(tiny_checkpoint)
    assert served.tokenizer.vocab_size < served.model.config.vocab_size
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=4, max_model_len=128))
    outs = engine.generate([[5, 6, 7]] * 4, [SamplingParams(max_tokens=40, temperature=5.0, seed=s, ignore_eos=True)
                                             for s in range(4)])
    assert all(t < served.tokenizer.vocab_size for o in outs for t in o.token_ids)
    assert all(o.queue_time_s is not None and o.queue_time_s >= 0 for o in outs)


def test_degenerate_sampling_parameters_do_not_crash(model, prompts):
    out = make_engine(model).generate([prompts[0]], SamplingParams(max_tokens=5, temperature=1e-30, seed=0))[0]
    assert out.completion_tokens == 5
