"""Several LoRA adapters on one engine (merged-weights mode, model/engine/adapter_set.py): what mixing costs
and what the q4 path loses.

    python -m bench.adapters --quantize q4 --concurrency 8 --requests 24 --new-tokens 48

1. Throughput, same engine, same run: aggregate generated tok/s when every request is for the base model
   (the baseline), when requests go round-robin to base + N adapters (each step runs one forward per
   model present), and when every request is for one adapter (an adapter model alone is as fast as
   the base: the gap to the mixed run is the grouping's cost).
2. Quality on the serving variant: perplexity of each adapter model served in `--quantize` against the
   same adapter merged in fp32, beside the base model's q4-vs-fp32 gap (merge then repack must not cost
   more than quantizing the base does).

Without --adapter, N random adapters are written (rank 16, every projection, each update scaled to
`--relative-update` of its weight's Frobenius norm, about what a task LoRA learns); `--adapter DIR`
(repeatable) serves real ones, e.g. from `python -m training.adapt`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.quality import DEFAULT_TEXT, perplexity, read_text
from model.adapters import CONFIG_FILE, PREFIX, PROJECTIONS, WEIGHTS_FILE
from model.config import QUANTIZATIONS
from model.convert import ensure_default_model
from model.engine import EngineConfig, LLMEngine
from model.inference import Served, adapt_for_serving, load_for_serving
from model.sampling import SamplingParams
from model.transformer import Transformer


def random_adapter(model: Transformer, out: Path, seed: int, rank: int, relative: float) -> Path:
    """A peft-format LoRA whose update on every projection has norm `relative` x the weight's."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.layers):
        for proj, sub in PROJECTIONS.items():
            weight = layer.get_submodule(f"{sub}.{proj}").weight.float()
            a = torch.randn(rank, weight.shape[1], generator=gen)
            b = torch.randn(weight.shape[0], rank, generator=gen)
            b *= relative * weight.norm() / (b @ a).norm()  # scale (alpha / r) is 1 below
            key = f"{PREFIX}layers.{i}.{sub}.{proj}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
    out.mkdir(parents=True)
    (out / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                               "target_modules": list(PROJECTIONS)}))
    save_file(tensors, out / WEIGHTS_FILE)
    return out


def throughput(engine: LLMEngine, prompts: list[list[int]], models: list[str | None], new_tokens: int) -> float:
    """Aggregate generated tok/s for prompts[i] on models[i % len(models)] (the engine batches them all)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params, adapter=models[i % len(models)])
    generated, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return generated / (time.perf_counter() - t0)


def quality(served: Served, fp32: Served, adapters: list[Path], ids: list[int]) -> None:
    base_fp32, base_q = perplexity(fp32.model, ids), perplexity(served.model, ids)
    print(f"\nperplexity on {len(ids)} tokens ({served.model.capabilities.path} vs fp32):")
    print(f"  base      fp32 {base_fp32:8.3f}  served {base_q:8.3f}  ({100 * (base_q / base_fp32 - 1):+.2f} %)")
    for path in adapters:
        merged_fp32 = perplexity(adapt_for_serving(fp32, path), ids)
        merged_q = perplexity(adapt_for_serving(served, path), ids)
        print(f"  {path.name:9} fp32 {merged_fp32:8.3f}  served {merged_q:8.3f}  "
              f"({100 * (merged_q / merged_fp32 - 1):+.2f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the SmolLM2 default model")
    ap.add_argument("--quantize", default="q4", choices=["none", *QUANTIZATIONS])
    ap.add_argument("--adapter", action="append", default=[], help="adapter dir (repeatable)")
    ap.add_argument("--random-adapters", type=int, default=2)
    ap.add_argument("--relative-update", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=8, help="engine slots (max_num_seqs)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="text or JSONL file for perplexity")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="0 = skip the quality part")
    args = ap.parse_args()

    path = Path(args.checkpoint) if args.checkpoint else ensure_default_model()
    served = load_for_serving(path, quantize=args.quantize)
    tmp = tempfile.TemporaryDirectory(prefix="bench-adapters-")
    adapters = [Path(p) for p in args.adapter] or [
        random_adapter(served.transformer, Path(tmp.name) / f"random{i}", i, 16, args.relative_update)
        for i in range(args.random_adapters)]
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=args.concurrency,
                                                                    max_model_len=512))
    for adapter in adapters:
        engine.add_adapter(adapter.name, adapt_for_serving(served, adapter))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (32,), generator=gen).tolist() for _ in range(args.requests)]
    names = [a.name for a in adapters]
    throughput(engine, prompts[:args.concurrency], [None, *names], 4)  # warm every model
    runs = [("base only", [None]), (f"{names[0]} only", [names[0]]),
            (f"base + {len(names)} adapters mixed", [None, *names]), ("base only, again (drift)", [None])]
    print(f"{served.model.capabilities.path}, {args.requests} requests x {args.new_tokens} tokens, "
          f"{args.concurrency} slots, torch threads {torch.get_num_threads()}")
    baseline = None
    for label, models in runs:
        tps = throughput(engine, prompts, models, args.new_tokens)
        baseline = baseline or tps
        print(f"  {label:28} {tps:8.1f} tok/s  {tps / baseline:5.2f}x base only")
    if args.ppl_tokens:
        fp32 = load_for_serving(path) if args.quantize != "none" else served
        ids = served.tokenizer.encode(read_text(Path(args.text)))[:args.ppl_tokens]
        quality(served, fp32, adapters, ids)
    tmp.cleanup()


if __name__ == "__main__":
    main()
