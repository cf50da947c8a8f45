"""Serving-time quantization: the int8 kernels against fp32 references, and the SmoothQuant fold."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.checkpoint import load_checkpoint
from model.quantize import CALIBRATION_TEXT, W8A8Linear, optimize_for_inference, smooth_activations


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@torch.no_grad()
def test_w8a8_linear_is_close_to_fp32_and_each_row_keeps_its_own_scale():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=False)
    x = torch.randn(8, 256)
    ref = linear(x)
    q = W8A8Linear(linear.weight)
    assert q(x).shape == (8, 384)
    assert relative_error(q(x), ref) < 0.02
    assert relative_error(q(x[:1]), ref[:1]) < 0.02  # the one-row path
    # one row with a 1000x activation (a "massive activation" token) must not crush the others
    spiky = x.clone()
    spiky[0, 3] = 1000.0
    out = q(spiky)
    assert relative_error(out[1:], ref[1:]) < 0.02
    alone = q(spiky[1:2])
    assert relative_error(alone, out[1:2]) < 0.02


def test_w8a8_linear_handles_zero_rows_and_3d_inputs():
    torch.manual_seed(0)
    q = W8A8Linear(torch.randn(64, 32))
    x = torch.zeros(2, 3, 32)
    out = q(x)
    assert out.shape == (2, 3, 64) and torch.isfinite(out).all() and out.abs().max() < 1e-3


def test_smoothing_keeps_the_function(tiny_checkpoint):
    """The SmoothQuant fold moves scales between norms and weights: fp32 logits are unchanged."""
    ckpt = load_checkpoint(tiny_checkpoint)
    model = ckpt.model.fuse_for_inference()
    tokens = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])
    ref = model(tokens)
    smoothed = smooth_activations(copy.deepcopy(model), ckpt.tokenizer.encode(CALIBRATION_TEXT)[:64])
    assert torch.allclose(smoothed(tokens), ref, atol=1e-4, rtol=1e-4)
    # it really moved something, and left the embedding (tied to the output head) alone
    assert not torch.equal(smoothed.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight)
    assert torch.equal(smoothed.embed_tokens.weight, model.embed_tokens.weight)


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_quantized_model_tracks_fp32(tiny_checkpoint, mode):
    ckpt = load_checkpoint(tiny_checkpoint)
    ref_model = copy.deepcopy(ckpt.model).fuse_for_inference()
    model = optimize_for_inference(ckpt.model, quantize=mode, tokenizer=ckpt.tokenizer)
    tokens = torch.randint(0, ckpt.tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, out = ref_model(tokens), model(tokens)
    assert relative_error(out, ref) < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_w8a8_refuses_what_it_cannot_run(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="tokenizer"):
        optimize_for_inference(copy.deepcopy(ckpt.model), quantize="w8a8")
    with pytest.raises(ValueError, match="float32"):
        optimize_for_inference(copy.deepcopy(ckpt.model).to(torch.bfloat16), quantize="w8a8",
                               tokenizer=ckpt.tokenizer)
    with pytest.raises(ValueError, match="unknown quantization"):
        optimize_for_inference(ckpt.model, quantize="int3")
