"""Soak test: 64 concurrent clients against a real `python -m app` for a bounded time, then one drain.

    python -m bench.soak                                   # 10 minutes, the default model
    nice -n 10 python -m bench.soak --minutes 3 --checkpoint ckpt/ --clients 64

It starts the server itself on 127.0.0.1 (a free port; loopback only, no keys), measures one request
alone as the baseline, then runs `--clients` closed-loop clients for `--minutes`. Each request is, at
random: a streaming or plain /v1/chat/completions, /chat, a streaming or plain /v1/completions (one
or two prompts), /tokenize, or a bad request (malformed JSON, a wrong field, an unknown model,
max_tokens over the limit) that must get a 4xx; some streams and plain requests are cancelled
mid-flight on purpose. At the end the clients stop sending, SIGTERM goes to the server with requests
in flight, and those must finish inside the drain.

Prints requests sent / completed / rejected with 4xx / 5xx / lost / cancelled (lost = a connection
error, a stream without [DONE], a client timeout), p50/p99 latency of completed requests and its
ratio to the request alone, the drain's outcome and the server's exit status. Not in CI: its
accounting is tested in tests/test_bench_soak.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["Say hello.", "Name a colour.", "Write one sentence about the sea.", "What is 2 + 2?",
           "Give me a word that rhymes with cat.", "Describe bread in five words."]
OUTCOMES = ("completed", "rejected_4xx", "5xx", "lost", "cancelled")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# accounting (pure: tested without a server)

def outcome_of(status: int, events: list[str] | None = None, body_ok: bool = True) -> str:
    """One request's outcome from its HTTP status and, for a stream, its SSE `data:` payloads.

    A 200 stream counts as completed only when it ends with [DONE] and carries no error event; an
    error event counts by its envelope's type (a 5xx kind -> "5xx", else "rejected_4xx")."""
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "rejected_4xx"
    if events is None:
        return "completed" if body_ok else "lost"
    if not events or events[-1] != "[DONE]":
        return "lost"
    for payload in events[:-1]:
        error = _error_of(payload)
        if error is not None:
            return "rejected_4xx" if error.get("type") == "invalid_request_error" else "5xx"
    return "completed"


def _error_of(payload: str) -> dict | None:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return {"type": "malformed_event"}
    return data.get("error") if isinstance(data, dict) else None


@dataclass
class Tally:
    """Counts per outcome and per request kind, and the latencies of completed requests."""

    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def record(self, kind: str, outcome: str, latency_s: float) -> None:
        assert outcome in OUTCOMES, outcome
        self.outcomes[outcome] += 1
        self.by_kind[(kind, outcome)] += 1
        if outcome == "completed":
            self.latencies.append(latency_s)

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of completed latencies (nan when there are none)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    def summary(self) -> str:
        counts = "  ".join(f"{name} {self.outcomes[name]}" for name in OUTCOMES)
        return f"sent {self.sent}  {counts}"


# ----------------------------------------------------------------------------
# one client request

BAD_BODIES: list[tuple[str, str, object]] = [
    ("/v1/chat/completions", "malformed JSON", b'{"messages": [}'),
    ("/v1/chat/completions", "max_tokens < 0", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
    ("/v1/chat/completions", "max_tokens > limit", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 10**6}),
    ("/v1/chat/completions", "unknown model", {"model": "no-such-model", "messages": [{"role": "user",
                                                                                       "content": "hi"}]}),
    ("/v1/completions", "prompt of wrong type", {"prompt": {"not": "a prompt"}}),
    ("/chat", "no messages", {"max_tokens": 4}),
    ("/tokenize", "both text and messages", {"text": "a", "messages": [{"role": "user", "content": "b"}]}),
]


async def one_request(client: httpx.AsyncClient, rng: random.Random, max_tokens: int,
                      cancel_p: float) -> tuple[str, str, float]:
    """Send one random request; (kind, outcome, latency in seconds)."""
    prompt = rng.choice(PROMPTS)
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(1, max_tokens),
            "temperature": rng.choice([0.0, 0.7])}
    roll = rng.random()
    t0 = time.perf_counter()
    if roll < 0.15:
        path, kind, body = rng.choice(BAD_BODIES)
        kind = f"bad: {kind}"
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return kind, await _plain(client, path, content, None, rng), time.perf_counter() - t0
    if roll < 0.45:
        return "chat stream", await _stream(client, "/v1/chat/completions", {**chat, "stream": True}, rng,
                                            cancel_p), time.perf_counter() - t0
    if roll < 0.65:
        cancel = rng.uniform(0.05, 1.0) if rng.random() < cancel_p else None
        outcome = await _plain(client, "/v1/chat/completions", json.dumps(chat).encode(), cancel, rng)
        return "chat", outcome, time.perf_counter() - t0
    if roll < 0.75:
        return "/chat", await _plain(client, "/chat", json.dumps(chat).encode(), None, rng), time.perf_counter() - t0
    if roll < 0.85:
        prompts = prompt if rng.random() < 0.5 else [prompt, rng.choice(PROMPTS)]
        body = {"prompt": prompts, "max_tokens": chat["max_tokens"], "stream": rng.random() < 0.5}
        if body["stream"]:
            return "completions stream", await _stream(client, "/v1/completions", body, rng, cancel_p), \
                time.perf_counter() - t0
        return "completions", await _plain(client, "/v1/completions", json.dumps(body).encode(), None, rng), \
            time.perf_counter() - t0
    body = {"text": prompt * rng.randint(1, 20)}
    return "tokenize", await _plain(client, "/tokenize", json.dumps(body).encode(), None, rng), \
        time.perf_counter() - t0


async def _plain(client: httpx.AsyncClient, path: str, content: bytes, cancel_after: float | None,
                 rng: random.Random) -> str:
    headers = {"content-type": "application/json", "x-request-id": f"soak-{rng.getrandbits(32):x}"}
    try:
        request = client.post(path, content=content, headers=headers)
        r = await (asyncio.wait_for(request, cancel_after) if cancel_after else request)
    except asyncio.TimeoutError:
        return "cancelled"
    except httpx.HTTPError:
        return "lost"
    try:
        ok = r.status_code >= 400 or isinstance(r.json(), dict)
    except ValueError:
        ok = False
    return outcome_of(r.status_code, None, ok)


async def _stream(client: httpx.AsyncClient, path: str, body: dict, rng: random.Random, cancel_p: float) -> str:
    cancel_at = rng.randint(1, 4) if rng.random() < cancel_p else None
    events: list[str] = []
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return outcome_of(r.status_code)
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if cancel_at is not None and len(events) >= cancel_at and events[-1] != "[DONE]":
                        return "cancelled"  # leaving the block closes the connection: the server aborts
    except httpx.HTTPError:
        return "lost"
    return outcome_of(200, events)


# ----------------------------------------------------------------------------
# the run

def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDLING_") or k == "SEEDLING_HOME"}
    env.update({"SEEDLING_LOG_LEVEL": "warning", "SEEDLING_MAX_NUM_SEQS": str(args.max_num_seqs),
                "SEEDLING_DRAIN_TIMEOUT_S": str(args.drain_timeout_s), "SEEDLING_MAX_TOKENS_LIMIT": "256"})
    if args.checkpoint:
        env["SEEDLING_CHECKPOINT"] = args.checkpoint
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode} before it was ready")
            try:
                if (await c.get("/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("server not ready in time")


async def soak(args: argparse.Namespace, base: str, proc: subprocess.Popen) -> tuple[Tally, float, dict]:
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout_s, limits=limits) as client:
        alone = []
        for _ in range(3):  # baseline: one plain chat request with nothing else running
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPTS[0]}],
                                                               "max_tokens": args.max_tokens, "temperature": 0})
            r.raise_for_status()
            alone.append(time.perf_counter() - t0)
        tally, stop, in_flight = Tally(), asyncio.Event(), [0]

        async def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                in_flight[0] += 1
                try:
                    kind, outcome, latency = await one_request(client, rng, args.max_tokens, args.cancel_p)
                finally:
                    in_flight[0] -= 1
                tally.record(kind, outcome, latency)

        tasks = [asyncio.create_task(client_loop(args.seed * 1000 + i)) for i in range(args.clients)]
        await asyncio.sleep(args.minutes * 60)
        stop.set()  # no new requests; SIGTERM with the current ones in flight: they must finish
        before = Counter(tally.outcomes)
        drain = {"in_flight": in_flight[0], "t0": time.perf_counter()}
        proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        drain.update(outcomes=tally.outcomes - before, seconds=time.perf_counter() - drain["t0"])
        return tally, sorted(alone)[1], drain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: the default SmolLM2 model)")
    ap.add_argument("--max-tokens", type=int, default=16, help="the most new tokens a good request asks for")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--cancel-p", type=float, default=0.1, help="share of streams/plain chats cancelled")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request (then: lost)")
    ap.add_argument("--drain-timeout-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    log_path = Path(tempfile.mkdtemp(prefix="seedling-soak-")) / "server.log"
    proc, base = start_server(args, log_path)
    try:
        asyncio.run(wait_ready(base, proc, 600))
        tally, alone_s, drain = asyncio.run(soak(args, base, proc))
        status = proc.wait(args.drain_timeout_s + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(report(args, tally, alone_s, drain, status, log_path.read_text()))
    return 0 if tally.outcomes["5xx"] == tally.outcomes["lost"] == 0 else 1


def report(args: argparse.Namespace, tally: Tally, alone_s: float, drain: dict, status: int, log: str) -> str:
    p50, p99 = tally.percentile(50), tally.percentile(99)
    kinds = sorted({k for k, _ in tally.by_kind})
    rows = [f"  {k:<28} " + " ".join(f"{tally.by_kind[(k, o)]:>12}" for o in OUTCOMES) for k in kinds]
    return "\n".join([
        f"soak: {args.minutes:g} min, {args.clients} clients, max_tokens <= {args.max_tokens}, "
        f"cancel p {args.cancel_p}, seed {args.seed}, checkpoint {args.checkpoint or 'default'}",
        tally.summary(),
        f"latency of completed requests (n={len(tally.latencies)}): p50 {p50:.2f} s  p99 {p99:.2f} s; "
        f"one request alone {alone_s:.2f} s -> p99 / alone = {p99 / alone_s:.1f}x",
        f"drain: SIGTERM with {drain['in_flight']} requests in flight -> "
        f"{dict(drain['outcomes']) or 'none left'} in {drain['seconds']:.1f} s; server exit status {status}; "
        f"server log: {log.count('Traceback')} tracebacks, {len(log.splitlines())} lines",
        f"  {'kind':<28} " + " ".join(f"{o:>12}" for o in OUTCOMES),
        *rows,
    ])


if __name__ == "__main__":
    raise SystemExit(main())
