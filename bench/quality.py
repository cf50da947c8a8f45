"""Quality cost of the serving options (q4 blocks, int8 weights, int8 weights + activations, bf16) against fp32 on the
same checkpoint:
perplexity on fixed text (target: within 2 % of fp32) and greedy agreement on the 5 reference prompts.

    python -m bench.quality                                     # fp32 vs auto, q4, int8, w8a8, bf16, bf16+int8
    python -m bench.quality --checkpoint runs/sft --variants fp32,auto   # any checkpoint (q4 packs it on load)

`auto` is what `make serve` runs (SEEDLING_QUANTIZE's default: q4 where the native kernels run).
    python -m bench.quality --text ../shared/data/en_public_domain_text/test.jsonl --max-tokens 8192

Perplexity is computed over non-overlapping 512-token windows of the text (one JSON object with a
"text" field per line, or plain text).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from model.checkpoint import resolve_checkpoint
from model.config import QUANTIZATIONS
from model.engine import EngineConfig, LLMEngine
from model.inference import load_for_serving
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent / "tests" / "fixtures" / "reference_outputs.json"
DEFAULT_TEXT = HERE.parent.parent / "shared" / "data" / "en_public_domain_text" / "test.jsonl"


def read_text(path: Path) -> str:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
    return raw


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int = 512) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = model(torch.tensor([chunk[:-1]])).float()[0]
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


def greedy_outputs(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=len(prompts), max_model_len=512))
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0))]


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix (greedy text is identical up to there)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="text or JSONL file for perplexity")
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens of text to score")
    ap.add_argument("--variants", default="fp32,auto,q4,int8,w8a8,bf16,bf16+int8")
    a = ap.parse_args()
    path = resolve_checkpoint(a.checkpoint)
    tok = Tokenizer.load(Path(path))
    ids = tok.encode(read_text(Path(a.text)))[:a.max_tokens]
    refs = json.loads(REFERENCE.read_text())["prompts"]
    prompts = [r["prompt_ids"] for r in refs]
    print(f"# quality: {path}; perplexity over {len(ids)} tokens of {a.text}; greedy on {len(prompts)} prompts")
    results = {}
    for variant in a.variants.split(","):
        mode = variant.split("+")[-1]
        model = load_for_serving(path, dtype=torch.bfloat16 if variant.startswith("bf16") else torch.float32,
                                 quantize=mode if mode in (*QUANTIZATIONS, "auto") else "none").model
        results[variant] = (perplexity(model, ids), greedy_outputs(model, tok, prompts))
        print(f"{variant} ({model.capabilities.path}): perplexity {results[variant][0]:.3f}", flush=True)
    ppl0, out0 = results["fp32"] if "fp32" in results else next(iter(results.values()))
    print("\n| variant | perplexity | vs fp32 | greedy outputs identical to fp32 | mean common prefix (tokens) |")
    print("|---|---|---|---|---|")
    for variant, (ppl, outs) in results.items():
        same = sum(o == r for o, r in zip(outs, out0, strict=True))
        prefix = sum(agreement(o, r) for o, r in zip(outs, out0, strict=True)) / len(outs)
        print(f"| {variant} | {ppl:.3f} | {100 * (ppl / ppl0 - 1):+.2f}% | {same}/{len(outs)} | {prefix:.1f} |")


if __name__ == "__main__":
    main()
