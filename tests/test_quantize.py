"""Serving-time quantization (model/quant, model/native_q4.py): the kernels against fp32 and integer
references, the SmoothQuant fold, and each quantized serving model against the fp32 oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.checkpoint import load_checkpoint
from model.eager import EagerModel, frozen_linear
from model.inference import prepare_for_serving
from model.native_q4 import NativeQ4Model
from model.quant.q4 import BlockQuantLinear, block_linear, dequantize_block
from model.quant.w8a8 import CALIBRATION_TEXT, W8A8Linear, smooth_activations


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
    model = ckpt.model
    tokens = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])
    ref = model(tokens)
    own_weights = EagerModel.from_transformer(model, lambda weight, name: frozen_linear(weight.clone()))
    smoothed = smooth_activations(own_weights, ckpt.tokenizer.encode(CALIBRATION_TEXT)[:64])
    assert torch.allclose(smoothed(tokens), ref, atol=1e-4, rtol=1e-4)
    # it really moved something, and left the embedding (tied to the output head) alone
    assert not torch.equal(smoothed.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight)
    assert torch.equal(smoothed.embed_tokens.weight, model.embed_tokens.weight)
    assert torch.equal(model(tokens), ref)  # the oracle's weights were not touched


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["int8", "w8a8", "q4"])
def test_quantized_model_tracks_fp32(tiny_checkpoint, mode):
    ckpt = load_checkpoint(tiny_checkpoint)
    ref_model = ckpt.model  # the oracle
    model = prepare_for_serving(ckpt.model, quantize=mode, tokenizer=ckpt.tokenizer)
    assert model.capabilities.quantization == mode
    tokens = torch.randint(0, ckpt.tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, out = ref_model(tokens), model(tokens)
    assert relative_error(out, ref) < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_w8a8_refuses_what_it_cannot_run(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="tokenizer"):
        prepare_for_serving(ckpt.model, quantize="w8a8")
    with pytest.raises(ValueError, match="float32"):
        prepare_for_serving(copy.deepcopy(ckpt.model).to(torch.bfloat16), quantize="w8a8", tokenizer=ckpt.tokenizer)
    with pytest.raises(ValueError, match="unknown quantization"):
        prepare_for_serving(ckpt.model, quantize="int3")


# ---------------------------------------------------------------- q4: block formats and native kernels
def reference_block_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the native kernel computes, in float64: x quantized to int8 per block of 32 (scale
    max|x| / 127, round half to even), times the dequantized weight."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, 0.0))
    xq = (q * (amax / 127.0)).view(m, k)
    return (xq.double() @ weight.double().T).float()


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_block_formats_round_trip(fmt):
    """Weights already on a Q4_1 / Q8_0 grid (as a GGUF's are) come back exactly; others within half a step."""
    g = torch.Generator().manual_seed(0)
    n, k = 16, 64
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.1 + 0.01).half().float()
    if fmt == "q4_1":
        codes = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
        codes[..., 0], codes[..., 1] = 0, 15  # every block spans the grid, as the quantizer makes it
        on_grid = codes * d + (torch.randn(n, k // 32, 1, generator=g) * 0.1).half().float()
    else:
        codes = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
        codes[..., 0] = 127
        on_grid = codes * d
    on_grid = on_grid.view(n, k)
    layer = BlockQuantLinear(on_grid, fmt)
    assert torch.equal(dequantize_block(layer.q, layer.d, layer.m), on_grid)
    w = torch.randn(n, k, generator=g)
    layer = BlockQuantLinear(w, fmt)
    step = layer.d.view(n // 8, -1, 8).transpose(1, 2).reshape(n, -1, 1).float()  # d per row and block
    err = (dequantize_block(layer.q, layer.d, layer.m) - w).view(n, -1, 32).abs()
    assert (err <= step * 0.5 + 1e-3).all()
    with pytest.raises(ValueError, match="divisible"):
        BlockQuantLinear(torch.randn(12, 64), fmt)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_block_linear_matches_the_integer_reference(fmt, m, isa):
    torch.manual_seed(m)
    w, x = torch.randn(48, 96), torch.randn(m, 96) * 3
    x[0, 5] = 40.0  # an outlier only costs its own block's precision
    layer = BlockQuantLinear(w, fmt)
    assert layer.isa == isa
    ref = reference_block_matmul(x, dequantize_block(layer.q, layer.d, layer.m))
    out = layer(x)
    assert out.shape == (m, 48)
    assert relative_error(out, ref) < 1e-5
    assert relative_error(layer(x.view(1, m, 96)).view(m, 48), ref) < 1e-5  # any leading shape
    assert torch.equal(layer(torch.zeros(2, 96)), torch.zeros(2, 48))  # an all-zero block has scale 0


def q4_model(tiny_checkpoint, cache_dtype: torch.dtype = torch.float16) -> NativeQ4Model:
    return NativeQ4Model(EagerModel.from_transformer(load_checkpoint(tiny_checkpoint).model, block_linear),
                         cache_dtype)


def cpu_isas() -> list[str]:
    from model import native

    native.load()
    return list(torch.ops.seedling.cpu_isas())


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request, monkeypatch) -> str:
    """Each kernel variant this CPU can run, selected as a user would (SEEDLING_CPU_ISA)."""
    if request.param not in cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    monkeypatch.setenv("SEEDLING_CPU_ISA", request.param)
    return request.param


@torch.inference_mode()
def test_native_forward_matches_the_eager_model_on_the_same_weights(tiny_checkpoint, isa):
    eager = EagerModel.from_transformer(load_checkpoint(tiny_checkpoint).model, block_linear)
    assert NativeQ4Model(eager).isa == isa
    tokens = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    native_out = NativeQ4Model(eager)(tokens)
    eager_out = eager(tokens)  # the PyTorch layers composing the same seedling::linear projections
    assert native_out.shape == eager_out.shape == (2, 40, 512)
    assert relative_error(native_out, eager_out) < 0.01
    assert (native_out.argmax(-1) == eager_out.argmax(-1)).float().mean() > 0.95


@torch.inference_mode()
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
def test_native_forward_is_batch_invariant_over_the_kv_cache(tiny_checkpoint, kv_dtype, isa):
    """Chunked prefill, decode, and packing with another sequence give bit-identical logits to one
    full forward: every token is computed on its own (its own activation scales, its own attention).
    q4 keeps K/V in fp16; the native attention also reads an fp32 cache."""
    from model.kv_cache import KVCache

    ckpt = load_checkpoint(tiny_checkpoint)
    assert prepare_for_serving(ckpt.model, quantize="q4").cache_dtype == torch.float16
    model = q4_model(tiny_checkpoint, kv_dtype)
    a = torch.randint(0, 400, (1, 30), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(2))
    full_a, full_b = model(a)[0], model(b)[0]
    if kv_dtype == torch.float32:  # fp16 K/V round, they do not change the result much
        fp16_a = q4_model(tiny_checkpoint)(a)[0]
        assert relative_error(fp16_a, full_a) < 0.01 and not torch.equal(fp16_a, full_a)
    cache = KVCache(model.config, n_slots=3, max_seq_len=64, dtype=kv_dtype)
    # a: prefill 0..19 in slot 2, then a mixed step packing a's 20..28 with all of b (slot 0)
    model(a[:, :20], kv_cache=cache.batch([2], [0], [20]), logits_index=torch.tensor([19]))
    packed = torch.cat([a[:, 20:29], b], dim=1)
    out = model(packed, kv_cache=cache.batch([2, 0], [20, 0], [9, 12]), logits_index=torch.tensor([8, 20]))
    assert torch.equal(out[0], full_a[28]) and torch.equal(out[1], full_b[11])
    # then one decode step for both
    step = torch.cat([a[:, 29:30], torch.tensor([[7]])], dim=1)
    out = model(step, kv_cache=cache.batch([2, 0], [29, 12], [1, 1]), logits_index=torch.tensor([0, 1]))
    assert torch.equal(out[0], full_a[29])
    assert torch.equal(out[1], model(torch.cat([b, torch.tensor([[7]])], dim=1))[0, 12])


def test_native_forward_rejects_bad_cache_positions(tiny_checkpoint):
    from model.kv_cache import KVCache

    model = q4_model(tiny_checkpoint)
    cache = KVCache(model.config, n_slots=1, max_seq_len=8)
    batch = cache.batch([0], [0], [4])
    batch.write_positions[-1] = 8  # past the cache: must be a clear error, not a write out of bounds
    with pytest.raises(RuntimeError, match="outside the cache"):
        model(torch.tensor([[1, 2, 3, 4]]), kv_cache=batch)
    with pytest.raises(ValueError, match="positions 0..T-1"):
        model(torch.tensor([[1, 2]]), positions=torch.tensor([[3, 4]]))


@torch.inference_mode()
def test_kernel_variants_agree_with_each_other(tiny_checkpoint, monkeypatch):
    """The variants compute the same integer dot products; only fp32 summation order may differ."""
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name in cpu_isas():
        monkeypatch.setenv("SEEDLING_CPU_ISA", name)
        logits[name] = q4_model(tiny_checkpoint)(tokens)
    reference = logits.pop("generic")
    for name, out in logits.items():
        assert relative_error(out, reference) < 1e-4, name
        assert torch.equal(out.argmax(-1), reference.argmax(-1)), name


def test_native_kernels_say_why_they_cannot_run(monkeypatch, tiny_checkpoint):
    from model import native

    monkeypatch.setenv("SEEDLING_CPU_ISA", "sse9")
    with pytest.raises(native.NativeUnavailable, match="SEEDLING_CPU_ISA='sse9' is not a kernel variant"):
        native.isa()
    monkeypatch.setattr(native.sys, "platform", "darwin")
    assert "Linux" in native.unavailable_reason()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unknown kernel variant 'sse9'"):  # the op checks too
        torch.ops.seedling.linear(torch.zeros(1, 32), torch.zeros(1, 128, dtype=torch.uint8),
                                  torch.zeros(8, dtype=torch.half), torch.zeros(8, dtype=torch.half), "sse9")
    ckpt = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="float32"):
        prepare_for_serving(ckpt.model.to(torch.bfloat16), quantize="q4")


def test_native_build_failures_are_clear(monkeypatch, tmp_path):
    from model import native

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeUnavailable, match="cannot run the C\\+\\+ compiler"):
        native.build(tmp_path / "lib.so")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(native, "SOURCES", [broken])
    with pytest.raises(native.NativeUnavailable, match="building broken.cpp failed"):
        native.build(tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()  # nothing half-written is left to load


def test_auto_picks_q4_where_the_fast_kernels_run(tiny_checkpoint, monkeypatch, caplog):
    best = cpu_isas()[0]
    with caplog.at_level("INFO", logger="seedling.inference"):
        model = prepare_for_serving(load_checkpoint(tiny_checkpoint).model, "auto")
    if best == "generic":
        assert model.capabilities.path == "torch-fp32" and "no AVX2" in caplog.text
    else:
        assert model.capabilities.path == f"native-q4-{best}" and f"q4 (native {best} kernels)" in caplog.text
    caplog.clear()
    monkeypatch.setenv("SEEDLING_CPU_ISA", "generic")  # what a CPU without AVX2 sees
    with caplog.at_level("INFO", logger="seedling.inference"):
        model = prepare_for_serving(load_checkpoint(tiny_checkpoint).model, "auto")
    assert model.capabilities.path == "torch-fp32" and model.capabilities.quantization == "none"
    assert "the torch path serves (this CPU has no AVX2" in caplog.text
    model = prepare_for_serving(load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16).model, "auto")
    assert model.capabilities.path == "torch-bf16"
