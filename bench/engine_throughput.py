"""Offline engine throughput (no HTTP) on the default SmolLM2 checkpoint, with its baselines measured
in the same run: the oracle `model.generate` (one request at a time) and Hugging Face transformers'
`generate` with a static, left-padded batch of the same size (same dtype unless `--hf-dtype`).

    python -m bench.engine_throughput                       # fp32, C = 1,4,16,64
    python -m bench.engine_throughput --dtype bfloat16 --quantize int8 --concurrency 1,16
    python -m bench.engine_throughput --quantize w8a8 --hf-dtype bfloat16 --concurrency 16 --no-oracle

Workload: the 16 load prompts (bench/workload.py) through the chat template, 128 greedy new tokens
each (EOS ignored, so every request decodes exactly 128). Closed loop: C requests in flight, each
finished one replaced until C x R requests have run.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.workload import LOAD_PROMPTS, median, percentile
from model.checkpoint import load_checkpoint, resolve_checkpoint
from model.config import QUANTIZATIONS
from model.engine import EngineConfig, LLMEngine
from model.generate import generate
from model.inference import load_for_serving
from model.sampling import SamplingParams
from model.tokenizer import render_chat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_engine(engine: LLMEngine, prompts: list[list[int]], concurrency: int, total: int, new_tokens: int
               ) -> dict[str, float]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    sent = 0
    start: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    generated = 0
    t0 = time.perf_counter()
    while sent < total or engine.has_unfinished():
        while sent < total and len(start) - len(done) < concurrency:
            rid = f"r{sent}"
            engine.add_request(rid, prompts[sent % len(prompts)], params)
            start[rid] = time.perf_counter()
            sent += 1
        for out in engine.step():
            now = time.perf_counter()
            generated += len(out.new_token_ids)
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
    wall = time.perf_counter() - t0
    decode = [(new_tokens - 1) / (done[r] - first[r]) for r in done if done[r] > first[r]]
    ttft = [first[r] - start[r] for r in done]
    return {"agg": generated / wall, "decode": median(decode), "ttft_p50": median(ttft),
            "ttft_p99": percentile(ttft, 0.99), "wall": wall, "tokens": generated}


def run_oracle(model, prompt: list[int], new_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    out = generate(model, prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    wall = time.perf_counter() - t0
    return {"agg": len(out) / wall, "wall": wall, "tokens": len(out)}


def run_hf(path, dtype: torch.dtype, texts: list[str], batch: int, new_tokens: int) -> dict[str, float]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    rows = [texts[i % len(texts)] for i in range(batch)]
    enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       temperature=None, top_p=None, top_k=None)
        wall = time.perf_counter() - t0
    return {"agg": batch * new_tokens / wall, "wall": wall, "tokens": batch * new_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the SmolLM2 default model)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--quantize", default=None, choices=QUANTIZATIONS, help="ours only; see model/quant/")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests-per-slot", type=int, default=2, help="R: C x R requests per level")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-dtype", default=None, choices=sorted(DTYPES),
                    help="transformers' dtype (default: --dtype); bf16 is its faster one on CPU")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle baseline")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve_checkpoint(a.checkpoint)
    dtype = DTYPES[a.dtype]
    served = load_for_serving(path, dtype=dtype, quantize=a.quantize)
    tok = served.tokenizer
    messages = [[{"role": "user", "content": p}] for p in LOAD_PROMPTS]
    prompts = [render_chat(tok, m).ids for m in messages]
    texts = [tok.decode(p, skip_special=False) for p in prompts]
    levels = [int(c) for c in a.concurrency.split(",")]
    print(f"# engine throughput: {path}, {a.dtype}{', ' + a.quantize if a.quantize else ''} "
          f"[{served.model.capabilities.path}] (transformers {a.hf_dtype or a.dtype}), "
          f"{torch.get_num_threads()} threads, {a.new_tokens} new tokens, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens")

    oracle = None
    if not a.no_oracle:
        oracle = run_oracle(load_checkpoint(path, dtype=dtype).model, prompts[0], a.new_tokens)
        print(f"oracle generate (1 request, no cache): {oracle['agg']:.1f} tok/s")

    model = served.model
    rows = []
    for c in levels:
        engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=c, max_model_len=512,
                                                    max_num_batched_tokens=max(256, c),
                                                    enable_prefix_caching=False))
        run_engine(engine, prompts, c, c, 4)  # warm-up
        ours = run_engine(engine, prompts, c, c * a.requests_per_slot, a.new_tokens)
        hf = None if a.no_hf else run_hf(path, DTYPES[a.hf_dtype or a.dtype], texts, c, a.new_tokens)
        rows.append((c, ours, hf))
        print(f"C={c}: ours {ours['agg']:.1f} tok/s" + (f", transformers {hf['agg']:.1f} tok/s" if hf else ""),
              flush=True)

    print("\n| C | ours agg tok/s | ours decode tok/s/req | ours TTFT p50 ms | transformers static batch tok/s "
          "| ours / transformers |")
    print("|---|---|---|---|---|---|")
    for c, ours, hf in rows:
        ratio = f"{ours['agg'] / hf['agg']:.2f}x" if hf else "-"
        hf_s = f"{hf['agg']:.1f}" if hf else "-"
        print(f"| {c} | {ours['agg']:.1f} | {ours['decode']:.1f} | {ours['ttft_p50'] * 1e3:.0f} | {hf_s} | {ratio} |")
    if oracle:
        single = next((o for c, o, _ in rows if c == 1), None)
        if single:
            print(f"\nours single-stream / oracle: {single['agg'] / oracle['agg']:.2f}x "
                  f"({single['agg']:.1f} vs {oracle['agg']:.1f} tok/s)")


if __name__ == "__main__":
    main()
