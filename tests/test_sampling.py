"""SamplingParams checks and logit processing against a plain-Python reference."""

from __future__ import annotations

import random

import pytest
import torch

from model.config import preset
from model.engine import EngineConfig, LLMEngine
from model.inference import prepare_for_serving
from model.sampling import MAX_LOGIT_BIAS, SamplingError, SamplingParams, process_logits
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
