"""Another user's latency while abusive requests run (issue 13): ratios against a baseline, same run.

    python -m app &                                   # the default model, loopback
    python -m bench.abuse --base-url http://127.0.0.1:8000 --seconds 20

A "victim" sends one greedy 8-token /v1/chat/completions at a time; its end-to-end latency is taken
first with nobody else on the server (idle), then while `--attackers` clients loop one kind of
request, each paired with the same load minus the abusive part, so the ratio shows what the abuse
itself costs the victim:
    bias      4-prompt /v1/completions with a 300-entry logit_bias   vs  the same without the bias
    stops     16 stop strings of the longest allowed length          vs  the same without stops
    classify  /classify of 16 texts x 8 labels                       vs  the same tokens as a 16-prompt
                                                                         /v1/completions (1 token out)
    huge      a ~900 KB prompt (refused: too long)                   vs  the same body refused by max_tokens=0
Prints, per scenario: victim p50 / p90 (n), the ratio to its baseline, and the attackers' statuses.
Bounded: `--seconds` per scenario; loopback URLs only. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.load import is_loopback, pct
from model import tasks
from model.sampling import MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOPS

VICTIM = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0,
          "ignore_eos": True}


def bias_body(abusive: bool) -> dict[str, Any]:
    rng = random.Random(0)
    body: dict[str, Any] = {"prompt": ["Once upon a time", "The weather", "In 1990", "Dear Sir"],
                            "max_tokens": 32, "temperature": 0.8, "ignore_eos": True}
    if abusive:
        body["logit_bias"] = {str(i): rng.uniform(-1, 1) for i in rng.sample(range(1, 20_000), MAX_LOGIT_BIAS)}
    return body


def stops_body(abusive: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0.8, "ignore_eos": True}
    if abusive:
        body["stop"] = [chr(0x4E00 + i) * MAX_STOP_CHARS for i in range(MAX_STOPS)]  # never match: held-back work only
    return body


CLASSIFY_TEXTS = [f"Review {i}: the product arrived late but works well." for i in range(16)]
CLASSIFY_LABELS = [f"label {i}" for i in range(8)]


def classify_body(abusive: bool) -> dict[str, Any]:
    if abusive:
        return {"text": CLASSIFY_TEXTS, "labels": CLASSIFY_LABELS}
    # the plain load: each text's classify prompt and its labels (about the tokens scoring runs), prefilled
    # by the ordinary scheduler, one token out
    prompts = ["\n".join(m["content"] for m in tasks.classify_messages(t, CLASSIFY_LABELS)) + "\n" +
               " ".join(CLASSIFY_LABELS) for t in CLASSIFY_TEXTS]
    return {"prompt": prompts, "max_tokens": 1, "temperature": 0}


def huge_body(abusive: bool) -> dict[str, Any]:
    # the plain load: the same bytes, refused by a field check before any tokenizing (max_tokens=0 is a 400),
    # so the ratio is what the prompt's length check costs beyond receiving and parsing the body
    return {"prompt": "lorem ipsum dolor sit amet " * 33_000, "max_tokens": 1 if abusive else 0}


SCENARIOS: dict[str, tuple[str, str, Callable[[bool], dict[str, Any]]]] = {
    # name: (abusive path, plain-load path or "" for none: the baseline is idle, body(abusive))
    "bias": ("/v1/completions", "/v1/completions", bias_body),
    "stops": ("/v1/completions", "/v1/completions", stops_body),
    "classify": ("/classify", "/v1/completions", classify_body),
    "huge": ("/v1/completions", "/v1/completions", huge_body),
}


async def victim(client: httpx.AsyncClient, until: float) -> list[float]:
    latencies = []
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/chat/completions", json=VICTIM)
        except httpx.HTTPError:
            continue  # counted as missing (n drops)
        if r.status_code == 200:
            latencies.append(time.perf_counter() - t0)
    return latencies


async def attacker(client: httpx.AsyncClient, path: str, body: dict[str, Any], until: float,
                   statuses: collections.Counter) -> None:
    while time.perf_counter() < until:
        try:
            r = await client.post(path, json=body)
            statuses[r.status_code] += 1
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1


async def measure(args: argparse.Namespace, path: str | None, body: dict[str, Any] | None
                  ) -> tuple[list[float], collections.Counter]:
    statuses: collections.Counter = collections.Counter()
    async with httpx.AsyncClient(base_url=args.base_url, timeout=max(60.0, args.seconds * 4),
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else None,
                                 limits=httpx.Limits(max_connections=args.attackers + 4)) as client:
        until = time.perf_counter() + args.seconds
        tasks = [asyncio.create_task(attacker(client, path, body, until, statuses))
                 for _ in range(args.attackers if path else 0)]
        await asyncio.sleep(0.5 if path else 0)  # let the attack start
        latencies = await victim(client, until)
        await asyncio.gather(*tasks)
    return latencies, statuses


def row(name: str, latencies: list[float], base: float | None, statuses: collections.Counter) -> str:
    p50 = pct(latencies, 50)
    ratio = f"{p50 / base:6.2f}x" if base else "   -   "
    return (f"{name:<22} p50 {p50 * 1000:8.1f} ms  p90 {pct(latencies, 90) * 1000:8.1f} ms  n={len(latencies):<4}"
            f" {ratio}  attackers: {dict(statuses) or '-'}")


async def main_async(args: argparse.Namespace) -> None:
    idle, _ = await measure(args, None, None)
    idle_p50 = pct(idle, 50)
    print(row("idle", idle, None, collections.Counter()))
    for name in args.scenarios.split(","):
        path, plain_path, make = SCENARIOS[name]
        base = idle_p50
        if plain_path:
            plain, statuses = await measure(args, plain_path, make(False))
            print(row(f"{name} (plain load)", plain, idle_p50, statuses))
            base = pct(plain, 50)
        latencies, statuses = await measure(args, path, make(True))
        print(row(f"{name} (abusive)", latencies, base, statuses), "<- ratio vs",
              "the plain load" if plain_path else "idle")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    ap.add_argument("--attackers", type=int, default=2)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args(argv)
    if not is_loopback(args.base_url):
        print("refusing a non-loopback --base-url", file=sys.stderr)
        return 2
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
