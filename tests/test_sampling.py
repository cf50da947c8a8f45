"""SamplingParams checks and logit processing against a plain-Python reference."""

from __future__ import annotations

import random

import pytest
import torch

from model.config import preset
from model.engine import EngineConfig, LLMEngine
from model.inference import prepare_for_serving
from model.sampling import (
    MAX_LOGIT_BIAS,
    SamplingError,
    SamplingParams,
    draw_token,
    make_generator,
    process_logits,
    sample_next,
)
from model.transformer import Transformer


def test_logit_bias_equals_the_per_entry_reference() -> None:
    rng = random.Random(0)
    vocab = 1000
    bias = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(MAX_LOGIT_BIAS)}
    params = SamplingParams(logit_bias=bias, repetition_penalty=1.3, frequency_penalty=0.5)
    logits = torch.randn(vocab)
    expected = process_logits(logits, SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5), [1, 2], [3, 3])
    for token_id, value in bias.items():
        expected[token_id] += value
    got = process_logits(logits, params, [1, 2], [3, 3])
    torch.testing.assert_close(got, expected)
    # built once with the params (a replace() for the clamped max_tokens rebuilds it from the dict)
    ids, values = params.bias_tensors
    assert ids.tolist() == list(bias) and values.dtype == torch.float32


@pytest.mark.parametrize("bias, why", [
    ({i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}, "at most 300"),
    ({-1: 1.0}, "token ids"),
    ({5: float("nan")}, "values"),
    ({5: 101.0}, "values"),
])
def test_logit_bias_is_checked(bias: dict, why: str) -> None:
    with pytest.raises(SamplingError, match=why) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"
    assert len(str(info.value)) < 200  # the message quotes a short repr, not 301 entries


def test_engine_refuses_a_bias_outside_the_vocabulary_instead_of_failing_the_step() -> None:
    model = Transformer(preset("test", vocab_size=64)).init_weights(seed=1).eval()
    engine = LLMEngine(prepare_for_serving(model), None, EngineConfig(max_num_seqs=2, max_model_len=64,
                                                                      max_num_batched_tokens=64))
    with pytest.raises(SamplingError, match="logit_bias") as info:
        engine.add_request("a", [1, 2], SamplingParams(logit_bias={64: 1.0}))
    assert info.value.param == "logit_bias" and not engine.has_unfinished()
    out = engine.generate([[1, 2]], SamplingParams(max_tokens=3, temperature=0, logit_bias={63: 100.0}))[0]
    assert out.token_ids == [63, 63, 63]


def test_draws_follow_the_distribution_and_never_pick_an_excluded_token() -> None:
    """The CDF draw behind every sampled token: frequencies within 4 sigma of the probabilities."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.bincount(torch.tensor([draw_token(probs, generator, probs) for _ in range(n)]), minlength=5)
    assert counts[1] == 0 and counts[4] == 0
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 4 * sigma + 1e-9).all(), counts


def test_a_degenerate_row_falls_back_to_the_argmax() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0])
    assert draw_token(torch.zeros(3), None, logits) == 1
    assert draw_token(torch.tensor([float("nan"), 1.0, 0.0]), None, logits) == 1


def test_a_seed_fixes_the_sampled_tokens() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)

    def run() -> list[int]:
        generator = make_generator(params)
        return [sample_next(logits, params, generator, [], []) for _ in range(20)]

    first = run()
    assert first == run() and len(set(first)) > 5  # reproducible, and really sampled
