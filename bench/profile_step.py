"""Where a decode step's time goes, at 1 and 16 (or any) concurrent sequences, on the default model.

    python -m bench.profile_step                          # fp32, C = 1,16
    python -m bench.profile_step --dtype bfloat16 --quantize int8 --concurrency 1,16,64

For each C: C sequences are prefilled, then `--steps` pure decode steps are timed. The torch profiler
attributes each step's op time to matmuls, attention, KV-cache writes, element-wise ops (norms,
rotary, SiLU, residuals), the output head and sampling; the rest of the wall time is Python
(scheduling, batch building, bookkeeping, detokenization). HTTP is measured by bench/compare.py.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.workload import LOAD_PROMPTS
from model.checkpoint import resolve_checkpoint
from model.config import QUANTIZATIONS
from model.engine import EngineConfig, LLMEngine
from model.inference import load_for_serving
from model.sampling import SamplingParams
from model.tokenizer import render_chat

# seedling:: names are the phases of the native forward (q4), recorded inside model/csrc/seedling_cpu.cpp
CATEGORIES = [
    ("matmul (projections + output head)", ("mm", "addmm", "linear", "matmul", "_weight_int8pack_mm", "bmm",
                                            "linear_dynamic")),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_scaled_dot", "attention")),
    ("activation quantization (native int8 blocks)", ("quantize_activations",)),
    ("KV-cache write / gather", ("index_put", "index_select", "index")),
    ("native forward: residual adds, rotary tables, K/V writes", ("forward",)),
    ("element-wise (norm, rotary, SiLU, residual)", ("rms_norm", "mul", "add", "cat", "neg", "silu", "pow",
                                                     "mean", "rsqrt", "cos", "sin", "to", "copy_", "split", "rotary")),
    ("sampling (argmax, softmax)", ("argmax", "softmax", "log_softmax", "topk", "multinomial", "sort")),
]


def category(name: str) -> str:
    op = name.removeprefix("aten::").removeprefix("quantized::").removeprefix("seedling::")
    for label, keys in CATEGORIES:
        if any(op == k or op.startswith(k) for k in keys):
            return label
    return "other torch ops"


def decoding_engine(model, tok, c: int) -> LLMEngine:
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=c, max_model_len=1024,
                                                max_num_batched_tokens=max(512, c), enable_prefix_caching=False))
    params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    for i in range(c):
        prompt = render_chat(tok, [{"role": "user", "content": LOAD_PROMPTS[i % len(LOAD_PROMPTS)]}]).ids
        engine.add_request(f"r{i}", prompt, params)
    while any(s.is_prefill or not s.output_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default=None, choices=QUANTIZATIONS)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    served = load_for_serving(resolve_checkpoint(a.checkpoint), dtype=getattr(torch, a.dtype),
                              quantize=a.quantize)
    model = served.model
    print(f"# decode-step profile: {a.dtype}{', ' + a.quantize if a.quantize else ''}, "
          f"{torch.get_num_threads()} threads, {a.steps} steps")
    for c in [int(x) for x in a.concurrency.split(",")]:
        engine = decoding_engine(model, served.tokenizer, c)
        for _ in range(3):
            engine.step()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            engine.step()
        plain = (time.perf_counter() - t0) / a.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                engine.step()
        buckets: dict[str, float] = defaultdict(float)
        n_ops = 0
        for evt in prof.key_averages():
            if evt.key.startswith(("aten::", "quantized::", "seedling::")):
                buckets[category(evt.key)] += evt.self_cpu_time_total / 1e6 / a.steps
                n_ops += evt.count
        torch_total = sum(buckets.values())
        print(f"\nC={c}: {plain * 1e3:.1f} ms/step -> {c / plain:.1f} tok/s; {n_ops / a.steps:.0f} profiled ops/step")
        print("| where | ms/step | share |")
        print("|---|---|---|")
        for label, secs in sorted(buckets.items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {secs * 1e3:.2f} | {100 * secs / plain:.0f}% |")
        python = max(plain - torch_total, 0.0)
        print(f"| Python (scheduler, batch building, bookkeeping, detokenizer, op dispatch) | {python * 1e3:.2f} "
              f"| {100 * python / plain:.0f}% |")


if __name__ == "__main__":
    main()
