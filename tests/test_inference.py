"""The inference seam (model/inference.py): every serving variant is built from the oracle Transformer
without touching it, computes what it computes, and says what it is."""

from __future__ import annotations

import copy

import pytest
import torch

from model import native
from model.checkpoint import load_checkpoint
from model.device import intra_op_threads
from model.inference import Capabilities, load_for_serving, prepare_for_serving
from model.kv_cache import KVCache

TOKENS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64, 3]])


@torch.inference_mode()
@pytest.mark.parametrize(("quantize", "path", "cache_dtype", "tolerance"), [
    ("none", "torch-fp32", torch.float32, 1e-5),
    ("int8", "torch-int8-fp32", torch.float32, 0.05),
    ("w8a8", "fbgemm-w8a8", torch.float32, 0.05),
    ("q4", "native-q4-{isa}", torch.float16, 0.05),  # the kernel variant this CPU runs
])
def test_every_variant_tracks_the_oracle_and_says_what_it_is(tiny_checkpoint, quantize, path, cache_dtype, tolerance):
    oracle = load_checkpoint(tiny_checkpoint).model
    served = load_for_serving(tiny_checkpoint, quantize=quantize)
    model = served.model
    path = path.format(isa=native.isa()) if quantize == "q4" else path
    assert model.capabilities == Capabilities(path=path, quantization=quantize, supports_cuda_graphs=False,
                                              thread_invariant=quantize == "q4")
    assert model.cache_dtype == cache_dtype and model.dtype == torch.float32 and model.device.type == "cpu"
    assert served.tokenizer.vocab_size == 400 and served.path == tiny_checkpoint
    ref = oracle(TOKENS)  # (1, 9, V)
    out = model(TOKENS)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < tolerance
    # the packed, cached call the engine makes gives the same logits rows (w8a8's activation zero point
    # spans the rows of a call, so its rows are near, not equal)
    cache = KVCache(model.config, n_slots=2, max_seq_len=16, dtype=model.cache_dtype)
    rows = model(TOKENS, torch.arange(9)[None], kv_cache=cache.batch([1], [0], [9]), logits_index=torch.tensor([3, 8]))
    assert float((rows - out[0, [3, 8]]).norm() / rows.norm()) < (0.02 if quantize == "w8a8" else 1e-5)


@torch.inference_mode()
def test_the_q4_forward_is_bit_identical_on_one_thread_and_on_two(tiny_checkpoint):
    """What Capabilities.thread_invariant promises, and what lets the engine run small steps on fewer
    threads (EngineConfig.small_step_tokens) without touching batch invariance."""
    model = load_for_serving(tiny_checkpoint, quantize="q4").model
    tokens = torch.randint(0, 400, (1, 40), generator=torch.Generator().manual_seed(0))
    with intra_op_threads(1):
        one = model(tokens)
    with intra_op_threads(2):
        two = model(tokens)
    assert torch.equal(one, two)


@torch.inference_mode()
def test_bf16_serves_on_the_torch_path(tiny_checkpoint):
    oracle = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16).model
    model = prepare_for_serving(oracle)
    assert model.capabilities.path == "torch-bf16" and model.cache_dtype == torch.bfloat16
    assert torch.allclose(model(TOKENS).float(), oracle(TOKENS).float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("quantize", ["none", "int8", "w8a8", "q4"])
def test_building_leaves_the_transformer_as_it_was(tiny_checkpoint, quantize):
    """The Transformer stays trainable and the oracle: same weights, same modules, no new attributes."""
    ckpt = load_checkpoint(tiny_checkpoint)
    model = ckpt.model
    weights = copy.deepcopy(model.state_dict())
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    model.requires_grad_(True)  # as a training job has it
    prepare_for_serving(model, quantize, ckpt.tokenizer)
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes
    after = model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert all(p.requires_grad for p in model.parameters())  # the serving copy froze its own parameters only
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied


def test_the_seam_refuses_what_it_cannot_build(tiny_checkpoint):
    with pytest.raises(NotImplementedError, match="several LoRA adapters"):
        load_for_serving(tiny_checkpoint, adapters=["support-bot", "translate-de"])
    with pytest.raises(ValueError, match="unknown quantization"):
        load_for_serving(tiny_checkpoint, quantize="int3")
    with pytest.raises(ValueError, match="w8a8 runs on CPU with float32"):
        load_for_serving(tiny_checkpoint, dtype=torch.bfloat16, quantize="w8a8")
