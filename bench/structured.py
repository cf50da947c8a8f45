"""Structured output's cost and the tool-call acceptance run on the real model, in one script (issue 16).

    python -m bench.structured                      # throughput: 16 constrained vs 16 plain, q4, + compile ms
    python -m bench.structured --rounds 5 --temperature 1.0
    python -m bench.structured --tools              # + tests/tool_suite.py's 20 prompts, tool_choice=required

Throughput: one engine, 16 concurrent requests (the default `--batch`), every one constrained by a
moderately complex schema (bench.grammar_libs.SCHEMA: pattern, enum, date format, nested object, array
of objects with bounded integers, anyOf with null) against the same 16 requests unconstrained. Greedy by
default, as bench.compare: the step is then the forward and one batched argmax, so the grammar's share
is largest (at `--temperature 1.0` per-row sampling adds the same cost to both sides). Three runs per
round (plain; constrained; constrained with masks filled inline after the forward instead of on the
mask thread during it), the order rotating each round, for `--rounds` rounds. Each run reports tok/s
of wall time (prefill included: the prompts are short) and tok/s of this process's CPU time, which
moves less when other jobs take the cores. Printed: every run, then per ratio (constrained / plain,
target >= 0.85; inline masks / plain) each round's value and the median; before that the schema's
first compile and a cached one (an LRU hit) in ms. The forward is timed apart (ms per step) because its
own speed moves with what is generated (the q4 forward ran ~20 % faster on the JSON outputs than on the
plain text here): "outside the forward" is the grammar's own cost per step (masks, matcher advances).

--tools: tests/tool_suite.py's 20 prompts (2-3 tools each) on the same engine, greedy, tool_choice
"required", parallel_tool_calls false: how many come back as one call to a declared tool whose
arguments validate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.grammar_libs import DEFAULT_CHECKPOINT, SCHEMA
from model.engine import EngineConfig, LLMEngine
from model.grammar import GrammarCompiler, ResponseFormat
from model.inference import load_for_serving
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer, render_chat


def compile_times(tok: Tokenizer) -> dict[str, float]:
    """ms of: indexing the vocabulary (once per engine), checking a schema (at the HTTP edge, every request),
    the first compile of SCHEMA and a cached one (an equal schema from another request: an LRU hit)."""
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    fmt = ResponseFormat.json_schema(SCHEMA)
    check = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile(fmt)
    first = time.perf_counter() - t0
    again = ResponseFormat.json_schema(json.loads(json.dumps(SCHEMA)))
    t0 = time.perf_counter()
    compiler.compile(again)
    cached = time.perf_counter() - t0
    return {"setup": setup * 1e3, "check": check * 1e3, "first": first * 1e3, "cached": cached * 1e3}


class ForwardClock:
    """Seconds spent inside the model's forward (wraps it on the instance): what is left of a step's time
    is sampling, masks and bookkeeping."""

    def __init__(self, model: Any) -> None:
        self.seconds = 0.0
        inner = model.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        model.forward = timed


@dataclass
class Run:
    wall: float  # s
    cpu: float  # s of this process's CPU time
    forward: float  # s inside the forward
    tokens: int
    steps: int


def _run(engine: LLMEngine, clock: ForwardClock, prompts: list[list[int]], params: SamplingParams) -> Run:
    """One batch of requests run to completion."""
    t0, c0, f0 = time.perf_counter(), time.process_time(), clock.seconds
    outs = engine.generate(prompts, [dataclasses.replace(params, seed=i) for i in range(len(prompts))])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Run(wall, cpu, clock.seconds - f0, sum(o.completion_tokens for o in outs),
               max(o.completion_tokens for o in outs))


def throughput(engine: LLMEngine, tok: Tokenizer, batch: int, max_tokens: int, rounds: int, temperature: float
               ) -> None:
    prompts = [render_chat(tok, [{"role": "user", "content": f"Order {n}: a customer wants a refund for two "
                                  "mugs. Extract the order as JSON."}]).ids for n in range(batch)]
    fmt = ResponseFormat.json_schema(SCHEMA)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0, response_format=fmt))  # compile once
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=1.0))  # warm the kernels
    plain = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    constrained = dataclasses.replace(plain, response_format=fmt)
    clock = ForwardClock(engine.model)
    runs = [("plain", plain, True), ("constrained", constrained, True), ("constrained, inline masks", constrained, False)]
    results: dict[str, list[Run]] = {name: [] for name, _, _ in runs}
    for r in range(rounds):
        for name, params, overlap in runs[r % 3:] + runs[:r % 3]:  # the order rotates: no run always goes first
            engine.runner.overlap_masks = overlap
            run = _run(engine, clock, prompts, params)
            results[name].append(run)
            rest_ms = (run.wall - run.forward) / run.steps * 1e3
            print(f"round {r + 1} {name:<26} {run.tokens / run.wall:7.1f} tok/s {run.tokens / run.cpu:7.1f} tok/CPU-s  "
                  f"forward {run.forward / run.steps * 1e3:6.1f} ms/step, rest {rest_ms:5.2f} ms/step ({run.tokens} tokens)")
    engine.runner.overlap_masks = True
    plain_runs = results["plain"]
    for name in ("constrained", "constrained, inline masks"):
        for unit, rate in (("wall time", lambda x: x.tokens / x.wall), ("CPU time", lambda x: x.tokens / x.cpu)):
            ratios = [rate(c) / rate(p) for c, p in zip(results[name], plain_runs, strict=True)]
            print(f"{name} / plain at {batch} concurrent, {unit}: median {statistics.median(ratios):.2f} "
                  f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})")
        extra = [((c.wall - c.forward) - (p.wall - p.forward)) / c.steps * 1e3 for c, p in zip(results[name], plain_runs,
                                                                                                 strict=True)]
        print(f"{name}: outside the forward, {statistics.median(extra):+.2f} ms per step against plain (median)")


def tool_acceptance(engine: LLMEngine, tok: Tokenizer) -> None:
    from model import tool_calls
    from tests.schema_suite import invalid
    from tests.tool_suite import CASES

    prompts, params, declared = [], [], []
    for question, tools in CASES:
        specs = [tool_calls.ToolSpec.build(t["function"]["name"], t["function"]["description"],
                                           t["function"]["parameters"]) for t in tools]
        messages = tool_calls.render_messages([tool_calls.ChatTurn("user", question)], specs, tok.default_system_prompt)
        prompts.append(render_chat(tok, messages).ids)
        params.append(SamplingParams(max_tokens=200, temperature=0.0, response_format=tool_calls.ToolCallFormat.build(
            specs, required=True, parallel=False)))
        declared.append({s.name: s.parameters for s in specs})
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    good = 0
    for (question, _), out, schemas in zip(CASES, outs, declared, strict=True):
        calls = tool_calls.parse(out.text).calls
        ok = (len(calls) == 1 and calls[0].complete and calls[0].name in schemas
              and invalid(calls[0].arguments, schemas[calls[0].name]) is None)
        good += ok
        shown = f"{calls[0].name}({calls[0].arguments})" if calls else repr(out.text[:80])
        print(f"{'ok ' if ok else 'BAD'} {question[:48]:<48} -> {shown[:110]}")
    print(f"tool calls: {good}/{len(CASES)} are one call to a declared tool with valid arguments "
          f"(tool_choice=required, greedy, {time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the default model)")
    ap.add_argument("--quantize", default="q4")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--tools", action="store_true", help="also: the 20-prompt tool-call acceptance run")
    args = ap.parse_args()
    path = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    served = load_for_serving(path, quantize=args.quantize)
    ms = compile_times(served.tokenizer)
    print(f"schema compile: first {ms['first']:.1f} ms, cached {ms['cached']:.3f} ms (checking the schema at the "
          f"edge {ms['check']:.2f} ms per request; vocabulary indexing {ms['setup']:.0f} ms once per engine)")
    engine = LLMEngine(served.model, served.tokenizer, EngineConfig(max_num_seqs=max(args.batch, 20),
                                                                    max_model_len=1024, max_num_batched_tokens=1024))
    print(f"{served.model.capabilities.path}, batch {args.batch}, {args.max_tokens} new tokens, T={args.temperature}")
    throughput(engine, served.tokenizer, args.batch, args.max_tokens, args.rounds, args.temperature)
    if args.tools:
        tool_acceptance(engine, served.tokenizer)


if __name__ == "__main__":
    main()
