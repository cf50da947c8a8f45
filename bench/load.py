"""Closed-loop HTTP load test for any OpenAI-compatible server (Seedling's, llama.cpp's llama-server, vLLM).

    python -m bench.load --base-url http://127.0.0.1:8000                       # 1, 8, 32 clients
    python -m bench.load --base-url http://127.0.0.1:8080 --model smollm2 --ignore-eos \
        --concurrency 1,8,32 --requests-per-client 4 --max-tokens 128 --json-out /tmp/load.json

For each concurrency level C, C clients start together and each sends `--requests-per-client`
streaming /v1/chat/completions requests back to back (greedy). Bounded in count (C x R requests
per level) and in time (`--max-wall-s` per level, `--timeout-s` per request). Loopback URLs only.

Per level it prints: requests/s, generated tokens/s (all completion tokens / level wall time),
TTFT p50/p99 (send -> first content delta), end-to-end latency p50/p99, tokens per request, errors.
Tokens come from the final `usage` chunk (stream_options.include_usage) when the server sends one,
else from the number of content chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

PEER_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "prompts.json"
BUILTIN_PROMPTS = [
    "Explain what a hash table is in two sentences.",
    "Write a short, polite reply to a customer whose parcel is late.",
    "List three tips for staying focused while studying.",
    "Summarize the plot of Little Red Riding Hood in three sentences.",
    "What are the main differences between a cat and a dog as pets?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe idea that uses rice, eggs and spinach.",
    "Why is the sky blue? Answer briefly.",
]


@dataclass
class Result:
    ok: bool
    t_send: float
    t_end: float
    ttft_s: float | None
    tokens: int
    error: str | None = None
    itl_s: list[float] | None = None  # gaps between consecutive content chunks (inter-token latency)


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load_prompts(path: str | None) -> list[str]:
    if path:
        data = json.loads(Path(path).read_text())
        return data["load_prompts"] if isinstance(data, dict) else list(data)
    if PEER_PROMPTS.is_file():
        return json.loads(PEER_PROMPTS.read_text())["load_prompts"]
    return BUILTIN_PROMPTS


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt: str) -> Result:
    messages = [{"role": "user", "content": prompt}]
    if getattr(args, "system", None):
        messages.insert(0, {"role": "system", "content": args.system})
    body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.extra_body:
        body.update(json.loads(args.extra_body))
    t0 = time.perf_counter()
    t_first = None
    t_last = None
    gaps: list[float] = []
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread())[:200]
                return Result(False, t0, time.perf_counter(), None, 0, f"HTTP {resp.status_code}: {text!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    return Result(False, t0, time.perf_counter(), None, 0, str(obj["error"])[:200])
                if obj.get("usage") and obj["usage"].get("completion_tokens") is not None:
                    usage_tokens = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        now = time.perf_counter()
                        if t_first is None:
                            t_first = now
                        else:
                            gaps.append(now - t_last)
                        t_last = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Result(False, t0, time.perf_counter(), None, 0, repr(exc)[:200])
    t_end = time.perf_counter()
    return Result(True, t0, t_end, None if t_first is None else t_first - t0,
                  usage_tokens if usage_tokens is not None else chunks, itl_s=gaps)


async def run_level(args: argparse.Namespace, prompts: list[str], conc: int) -> dict:
    results: list[Result] = []
    limits = httpx.Limits(max_connections=conc + 2, max_keepalive_connections=conc + 2)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits, headers=headers,
                                 timeout=httpx.Timeout(args.timeout_s, connect=10)) as client:
        start = asyncio.Event()

        async def worker(w: int) -> None:
            await start.wait()
            for j in range(args.requests_per_client):
                results.append(await one_request(client, args, prompts[(w * args.requests_per_client + j)
                                                                       % len(prompts)]))

        tasks = [asyncio.create_task(worker(w)) for w in range(conc)]
        t0 = time.perf_counter()
        start.set()
        _, pending = await asyncio.wait(tasks, timeout=args.max_wall_s)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - t0
    good = [r for r in results if r.ok]
    lat = [r.t_end - r.t_send for r in good]
    ttft = [r.ttft_s for r in good if r.ttft_s is not None]
    tokens = [r.tokens for r in good]
    itl = [g for r in good for g in (r.itl_s or [])]
    return {
        "concurrency": conc, "requests": len(good), "errors": len(results) - len(good),
        "cut_by_max_wall_s": len(pending), "wall_s": wall,
        "requests_per_s": len(good) / wall if wall else 0.0,
        "tokens_per_s": sum(tokens) / wall if wall else 0.0,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
        "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "tokens_per_request": [min(tokens, default=0), max(tokens, default=0)],
        "first_errors": [r.error for r in results if not r.ok][:3],
    }


async def main_async(args: argparse.Namespace) -> list[dict]:
    if args.model is None:
        async with httpx.AsyncClient(base_url=args.base_url, timeout=30) as c:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            args.model = (await c.get("/v1/models", headers=headers)).json()["data"][0]["id"]
    prompts = load_prompts(args.prompts)
    print(f"{args.base_url} model={args.model} max_tokens={args.max_tokens} ignore_eos={args.ignore_eos} "
          f"requests/client={args.requests_per_client}", flush=True)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout_s) as c:  # warm-up
        await one_request(c, args, prompts[0])
    rows = []
    print(f"{'C':>3} {'req':>4} {'err':>3} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'lat p50':>8} {'lat p99':>8} tok/req", flush=True)
    for conc in args.concurrency:
        row = await run_level(args, prompts, conc)
        rows.append(row)
        print(f"{conc:>3} {row['requests']:>4} {row['errors']:>3} {row['requests_per_s']:>6.2f} "
              f"{row['tokens_per_s']:>7.1f} {row['ttft_p50_s'] * 1000:>7.0f}ms {row['ttft_p99_s'] * 1000:>7.0f}ms "
              f"{row['latency_p50_s']:>7.2f}s {row['latency_p99_s']:>7.2f}s "
              f"{row['tokens_per_request'][0]}-{row['tokens_per_request'][1]}", flush=True)
        if row["first_errors"]:
            print(f"    errors: {row['first_errors']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (no /v1)")
    ap.add_argument("--model", default=None, help="`model` field; default: the first of GET /v1/models")
    ap.add_argument("--concurrency", default="1,8,32", help="comma list of concurrent clients")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true", help="decode exactly max_tokens (llama.cpp/Seedling)")
    ap.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--prompts", default=None, help="JSON file: {'load_prompts': [...]} or a list")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    ap.add_argument("--max-wall-s", type=float, default=300.0, help="per concurrency level")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if not is_loopback(args.base_url):
        print(f"refusing non-loopback base URL {args.base_url}", file=sys.stderr)
        return 2
    args.base_url = args.base_url.rstrip("/")
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    rows = asyncio.run(main_async(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args),
                                                   "levels": rows}, indent=1))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
