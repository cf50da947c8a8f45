"""xgrammar against llguidance on one JSON schema and our tokenizer, in one run (why: issue 16 asks to
pick the grammar library by measurement; docs/structured-output.md records the numbers).

    python -m bench.grammar_libs                       # default model's tokenizer, batch 16
    python -m bench.grammar_libs --engine              # + engine tok/s, 16 constrained vs 16 plain (q4)

For each library: first compile of the schema (ms), cached compile (ms: a second compile of the same
schema through the library's own cache, or a dict hit when it has none), and the mask for a batch of
16 sequences per decode step (us per token per sequence), walking every matcher along one valid JSON
document. xgrammar runs through model.grammar (what the engine uses); llguidance is optional here (not
a Seedling dependency: `pip install llguidance==1.9.1`), its row is skipped without it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{6}$"},
        "intent": {"enum": ["refund", "cancel", "track", "complaint", "other"]},
        "date": {"type": "string", "format": "date"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "email": {"type": "string"},
            "vip": {"type": "boolean"}}, "required": ["name"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
            "type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                "price": {"type": "number", "minimum": 0}}, "required": ["sku", "qty"]}},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["order_id", "intent", "items"],
}
DEFAULT_CHECKPOINT = Path.home() / ".cache/seedling/checkpoints/smollm2-135m-instruct"
DOCUMENT = {"order_id": "AB-123456", "intent": "refund", "date": "2026-11-30",
            "customer": {"name": "Ada Lovelace", "vip": True},
            "items": [{"sku": "kettle-2", "qty": 1, "price": 39.5}, {"sku": "mug", "qty": 4}], "note": None}


class _LLGTokens:
    """What llguidance.TokenizerWrapper reads: token bytes (special tokens marked by a leading 0xff)."""

    def __init__(self, tok: Tokenizer) -> None:
        names = {i: n for n, i in tok.special_tokens.items()}
        self.tokens = [b"\xff" + names[i].encode() if i in names else tok.token_bytes(i) or b"\xff?%d" % i
                       for i in range(tok.vocab_size)]
        self.special_token_ids, self.eos_token_id, self.bos_token_id = sorted(names), tok.eos_id, tok.bos_id
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text)


def _walk(start: Callable[[], Any], fill: Callable[[list[Any], torch.Tensor], None],
          advance: Callable[[Any, int], None], doc_ids: list[int], mask: torch.Tensor, batch: int) -> float:
    """Seconds to walk `batch` fresh matchers along the document: one mask fill for all, then one token
    each. The first walk warms lazily built state; the second is timed."""
    for _ in range(2):
        matchers = [start() for _ in range(batch)]
        t0 = time.perf_counter()
        for token in doc_ids:
            fill(matchers, mask)
            for m in matchers:
                advance(m, token)
        elapsed = time.perf_counter() - t0
    return elapsed


def _row(setup: float, first: float, cached: float, walk: float, n: int, batch: int) -> dict[str, float]:
    return {"setup_ms": setup * 1e3, "first_ms": first * 1e3, "cached_ms": cached * 1e3,
            "mask_us_per_seq_token": walk / n / batch * 1e6}


def bench_llguidance(tok: Tokenizer, doc_ids: list[int], batch: int) -> dict[str, float] | None:
    try:
        import llguidance
        import llguidance.torch as llt
    except ImportError:
        return None
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_LLGTokens(tok)), eos_token=sorted(tok.stop_ids))
    setup = time.perf_counter() - t0
    cache: dict[str, str] = {}
    times = []
    for _ in range(2):  # llguidance has no compile cache of its own: the second is a dict hit
        t0 = time.perf_counter()
        text = json.dumps(SCHEMA)
        if text not in cache:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={
                "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
            llguidance.LLMatcher(lltok, grammar, log_level=0)  # compile + validate
            cache[text] = grammar
        times.append(time.perf_counter() - t0)
    grammar, executor = cache[json.dumps(SCHEMA)], llguidance.LLExecutor()
    walk = _walk(lambda: llguidance.LLMatcher(lltok, grammar, log_level=0),
                 lambda ms, mask: llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(ms)], mask),
                 lambda m, t: m.consume_token(t), doc_ids, llt.allocate_token_bitmask(batch, tok.vocab_size), batch)
    return _row(setup, times[0], times[1], walk, len(doc_ids), batch)


def bench_xgrammar(tok: Tokenizer, doc_ids: list[int], batch: int) -> dict[str, float]:
    from model.grammar import GrammarCompiler
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile_json_schema(SCHEMA)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = compiler.compile_json_schema(SCHEMA)
    cached = time.perf_counter() - t0

    def fill(ms: list[Any], mask: torch.Tensor) -> None:
        for i, m in enumerate(ms):
            m.fill_mask(mask, i)
    walk = _walk(grammar.start, fill, lambda m, t: m.advance(t), doc_ids, compiler.allocate_bitmask(batch), batch)
    return _row(setup, first, cached, walk, len(doc_ids), batch)


def engine_ratio(checkpoint: Path, batch: int, max_tokens: int, quantize: str) -> None:
    """Decode throughput of `batch` requests all constrained by SCHEMA against the same requests
    unconstrained, in one engine, in one run (unconstrained, constrained, unconstrained again)."""
    from model.engine import EngineConfig, LLMEngine
    from model.grammar import ResponseFormat
    from model.inference import load_for_serving
    from model.sampling import SamplingParams
    from model.tokenizer import render_chat
    served = load_for_serving(checkpoint, quantize=quantize)
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=batch, max_model_len=512))
    prompts = [render_chat(served.tokenizer, [{"role": "user", "content": f"Order {n}: extract it as JSON."}]).ids
               for n in range(batch)]
    fmt = ResponseFormat.json_schema(SCHEMA)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0, response_format=fmt))  # compile
    engine.generate(prompts, SamplingParams(max_tokens=16, temperature=1.0, seed=0))  # warm the kernels
    rates = {}
    for name, p in [("plain", SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1)),
                    ("constrained", SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1,
                                                   response_format=fmt)),
                    ("plain again", SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1))]:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, p)
        rates[name] = sum(o.completion_tokens for o in outs) / (time.perf_counter() - t0)
        print(f"{name:<12} {rates[name]:8.1f} tok/s  ({sum(o.completion_tokens for o in outs)} tokens)")
    base = (rates["plain"] + rates["plain again"]) / 2
    print(f"constrained / unconstrained throughput at {batch} concurrent: {rates['constrained'] / base:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the default model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--engine", action="store_true", help="also: engine throughput, constrained / plain")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quantize", default="q4")
    args = ap.parse_args()
    if args.engine:
        engine_ratio(Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT, args.batch, args.max_tokens,
                     args.quantize)
    torch.set_num_threads(1)
    tok = Tokenizer.load(args.checkpoint or DEFAULT_CHECKPOINT)
    doc_ids = tok.encode(json.dumps(DOCUMENT))  # ", " and ": ", as model.grammar generates
    rows = {"xgrammar": bench_xgrammar(tok, doc_ids, args.batch),
            "llguidance": bench_llguidance(tok, doc_ids, args.batch)}
    print(f"vocab {tok.vocab_size}, document {len(doc_ids)} tokens, batch {args.batch}")
    print(f"{'library':<12}{'setup ms':>10}{'1st compile ms':>16}{'cached ms':>11}{'mask us/seq/tok':>17}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:<12}  (not installed)")
            continue
        print(f"{name:<12}{r['setup_ms']:>10.1f}{r['first_ms']:>16.1f}{r['cached_ms']:>11.3f}"
              f"{r['mask_us_per_seq_token']:>17.1f}")
    if rows["llguidance"]:
        ratio = rows["llguidance"]["mask_us_per_seq_token"] / rows["xgrammar"]["mask_us_per_seq_token"]
        print(f"mask time llguidance / xgrammar: {ratio:.1f}x")


if __name__ == "__main__":
    main()
