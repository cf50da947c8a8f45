"""The GPU checks of the speed issue, in one short run: the CUDA path, bf16, CUDA graphs, throughput
against transformers' static batch, and the batch-64 decode step against the memory-bandwidth bound.

    python -m bench.gpu_check                       # SmolLM2-135M's shape, random weights (no download)
    python -m bench.gpu_check --checkpoint DIR      # real weights
    python -m bench.gpu_check --out report.json

Random weights give the same speed as real ones (the shapes are the work), so the check runs on a
machine that holds no checkpoint. Baselines are measured in the same run: a device-to-device copy
for the memory bandwidth, and transformers' `LlamaForCausalLM.generate` on the same weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from model.checkpoint import load_checkpoint, to_hf_state_dict
from model.config import ModelConfig, preset
from model.engine import EngineConfig, LLMEngine
from model.inference import InferenceModel, prepare_for_serving
from model.sampling import SamplingParams
from model.transformer import Transformer

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def memory_bandwidth(device: str, gib: float = 2.0) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t0 = sync_time()
    for _ in range(10):
        dst.copy_(src)
    return 2 * src.numel() * 10 / (sync_time() - t0)


def weight_bytes(model: InferenceModel) -> int:
    """Bytes a decode step must read: every parameter once (a tied head is the embedding matrix)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_engine(model: InferenceModel, prompts: list[list[int]], concurrency: int, new_tokens: int, graphs: bool,
               max_len: int) -> dict[str, float]:
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=concurrency, max_model_len=max_len,
                                                 max_num_batched_tokens=max(512, concurrency),
                                                 cuda_graphs=graphs, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:concurrency], params)  # warm-up: the same run records every graph it needs
    t0 = sync_time()
    outs = engine.generate(prompts[:concurrency], params)
    wall = sync_time() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"agg_tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "ids": [o.token_ids for o in outs]}


def decode_step_ms(model: InferenceModel, prompts: list[list[int]], batch: int, steps: int, graphs: bool,
                   max_len: int) -> float:
    """Time of one pure decode step with `batch` sequences (the engine's whole step: schedule, forward, sample)."""
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=batch, max_model_len=max_len,
                                                 max_num_batched_tokens=4096, cuda_graphs=graphs,
                                                 enable_prefix_caching=False))
    params = SamplingParams(max_tokens=steps + 40, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", prompts[i % len(prompts)], params)
    for _ in range(30):  # prefill, then decode past the first key-length bucket (records its graphs)
        engine.step()
    t0 = sync_time()
    for _ in range(steps):
        engine.step()
    return (sync_time() - t0) / steps * 1e3


def run_hf(hf, prompts: list[list[int]], batch: int, new_tokens: int) -> dict[str, float]:
    """transformers' static batch on the same weights: prompts left-padded to one length."""
    rows = prompts[:batch]
    width = max(len(p) for p in rows)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in rows], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=hf.device)
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
        t0 = sync_time()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          **kw)
        wall = sync_time() - t0
    return {"agg_tok_s": batch * new_tokens / wall, "wall_s": wall,
            "ids": [row[width:].tolist() for row in out]}


def hf_model(model: Transformer):
    """transformers' LlamaForCausalLM holding the same weights as an unfused model of ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_hf())).to(device=model.device, dtype=model.dtype).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight) or not model.config.tie_embeddings
    return hf


def same_tokens(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    ap.add_argument("--device", default="cuda", help="cpu with --shape test: a dry run of the script itself")
    ap.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "test"])
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (or --device cpu --shape test for a dry run)")
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    report: dict[str, object] = {"torch": torch.__version__, "device": name}
    print(f"# gpu_check: torch {torch.__version__}, {name}")
    if a.checkpoint:
        model = load_checkpoint(a.checkpoint, device=a.device).model
    else:
        shape = SMOLLM2_135M if a.shape == "smollm2-135m" else preset("test").to_hf()
        model = Transformer(ModelConfig.from_hf(shape)).init_weights(seed=0).to(a.device)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randrange(37, 47))] for _ in range(64)]
    levels = [int(c) for c in a.concurrency.split(",")]
    max_len = 64 + a.new_tokens + 16

    # 1. correctness on the device: fp32 logits against transformers on the same weights
    hf32 = hf_model(model.float())
    tokens = torch.tensor([prompts[0]], device=a.device)
    with torch.inference_mode():
        diff = (model(tokens) - hf32(tokens).logits).abs().max().item()
    report["fp32_max_logit_diff_vs_transformers"] = diff
    print(f"fp32 logits vs transformers: max |diff| {diff:.2e}")
    del hf32
    # the served model: bf16, fused projections; transformers gets the same bf16 weights
    hf = hf_model(model.to(torch.bfloat16))
    model = prepare_for_serving(model)

    # 2. the memory-bandwidth bound of a batch-64 decode step
    bandwidth = memory_bandwidth(a.device)
    nbytes = weight_bytes(model)
    bound_ms = nbytes / bandwidth * 1e3
    report.update(bandwidth_gb_s=bandwidth / 1e9, weight_mb=nbytes / 1e6, bound_ms=bound_ms)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; weights {nbytes / 1e6:.0f} MB bf16 -> bound {bound_ms:.3f} ms/step")
    for graphs in (True, False):
        try:
            ms = decode_step_ms(model, prompts, 64, 50, graphs, max_len)
        except Exception as e:  # report and go on: one run should measure all it can
            report[f"decode_step_error_graphs_{graphs}"] = repr(e)
            print(f"batch-64 decode step, CUDA graphs {graphs}: FAILED {e!r}")
            continue
        report[f"decode_step_ms_b64_graphs_{graphs}"] = ms
        print(f"batch-64 decode step, CUDA graphs {'on ' if graphs else 'off'}: {ms:.3f} ms "
              f"({ms / bound_ms:.1f}x the bound; {64 / ms * 1e3:.0f} tok/s)")

    # 3. throughput: ours (graphs on / off) against transformers' static batch, bf16, same prompts
    rows = []
    for c in levels:
        eager = run_engine(model, prompts, c, a.new_tokens, False, max_len)
        try:
            ours = run_engine(model, prompts, c, a.new_tokens, True, max_len)
        except Exception as e:
            print(f"C={c}: CUDA graphs FAILED {e!r}")
            report[f"c{c}_graphs_error"] = repr(e)
            ours = eager
        hf_run = run_hf(hf, prompts, c, a.new_tokens)
        agree = same_tokens(ours["ids"], eager["ids"])
        agree_hf = same_tokens(ours["ids"], hf_run["ids"])
        rows.append((c, ours["agg_tok_s"], eager["agg_tok_s"], hf_run["agg_tok_s"], agree, agree_hf))
        report[f"c{c}"] = {"ours_graphs": ours["agg_tok_s"], "ours_eager": eager["agg_tok_s"],
                           "hf_static": hf_run["agg_tok_s"], "tokens_same_graphs_vs_eager": agree,
                           "tokens_same_vs_hf": agree_hf}
        print(f"C={c}: graphs {ours['agg_tok_s']:.0f}, eager {eager['agg_tok_s']:.0f}, "
              f"transformers {hf_run['agg_tok_s']:.0f} tok/s", flush=True)
    print("\n| C | ours, CUDA graphs tok/s | ours, eager tok/s | transformers static batch tok/s | ours / transformers | "
          "greedy tokens equal: graphs vs eager / vs transformers |")
    print("|---|---|---|---|---|---|")
    for c, g, e, h, agree, agree_hf in rows:
        print(f"| {c} | {g:.0f} | {e:.0f} | {h:.0f} | {g / h:.1f}x | {agree:.1%} / {agree_hf:.1%} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
