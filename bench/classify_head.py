"""/classify through a classification head vs zero-shot label scoring, over HTTP, same server, same run.

    python -m training.head --name banking77 --adapters_dir adapters        # once: writes the head
    python -m bench.classify_head --adapters-dir adapters --head banking77 --concurrency 16

Starts `python -m app` with SEEDLING_ADAPTERS_DIR, then C clients each send one-text /classify
requests back to back with the head's labels: first naming the head (`model: <head>`), then naming
the base model (`model: <base>`: zero-shot scoring of every label, the baseline). Each phase is
bounded by `--texts` and `--max-wall-s`. Texts come from `--data` (Banking77 test split by default).
Prints texts/s per phase, the ratio, accuracy on the texts sent (n), and the CPU milliseconds per text
of the server and of this client (on a shared CPU the texts/s depend on the load; CPU time much less).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

from bench.compare import free_port, stop, wait_ready

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "test.jsonl"


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far; nan when unknown. On a
    shared CPU, CPU time per text is the number that does not depend on what else runs."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def phase(url: str, model: str, labels: list[str], records: list[dict], concurrency: int,
                max_wall_s: float, server_pid: int | None = None) -> dict:
    """C clients, one text per request; returns texts/s, accuracy, errors, latency p50, and the
    server's and this client's CPU milliseconds per text."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for r in records:
        queue.put_nowait(r)
    correct, done, errors, latencies = 0, 0, 0, []
    t0, server0, client0 = time.perf_counter(), cpu_seconds(server_pid), time.process_time()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal correct, done, errors
        while not queue.empty() and time.perf_counter() - t0 < max_wall_s:
            rec = queue.get_nowait()
            t = time.perf_counter()
            resp = await http.post(url + "/classify", json={"text": rec["text"], "labels": labels, "model": model})
            latencies.append(time.perf_counter() - t)
            if resp.status_code != 200:
                errors += 1
                continue
            done += 1
            correct += resp.json()["label"] == rec["label"]

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(server_pid) - server0, time.process_time() - client0
    latencies.sort()
    return {"texts": done, "errors": errors, "wall_s": round(wall, 2), "texts_per_s": done / wall if wall else 0.0,
            "accuracy": correct / done if done else float("nan"),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
            "server_cpu_ms_per_text": 1000 * server_cpu / max(done, 1),
            "client_cpu_ms_per_text": 1000 * client_cpu / max(done, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters-dir", required=True, help="directory holding <head>/head.json")
    ap.add_argument("--head", default="banking77", help="adapter name of the head")
    ap.add_argument("--checkpoint", default=None, help="base checkpoint (default: SmolLM2 default)")
    ap.add_argument("--data", default=str(DATA), help="JSONL of {text, label}")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--texts", type=int, default=800, help="head phase: texts sent (at most; 0 skips it)")
    ap.add_argument("--zero-shot-texts", type=int, default=16, help="baseline phase: texts sent (at most)")
    ap.add_argument("--max-wall-s", type=float, default=180, help="per phase")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--server-log", default="/tmp/seedling-bench-classify-head.log", help="the server's output")
    ap.add_argument("--url", default=None, help="bench a server that is already running (started with "
                    "SEEDLING_ADAPTERS_DIR=--adapters-dir) instead of starting one")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, to count its CPU time")
    a = ap.parse_args()
    info = json.loads((Path(a.adapters_dir) / a.head / "head.json").read_text())
    records = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    if a.url:
        results = run_phases(a.url.rstrip("/"), a, info["labels"], records, a.server_pid)
    else:
        results = run_with_server(a, info["labels"], records)
    report(a, info["labels"], results)


def run_with_server(a: argparse.Namespace, labels: list[str], records: list[dict]) -> dict[str, dict]:
    """Start `python -m app` on a free port with the adapters directory, run the phases, stop it."""
    port = free_port()
    # zero-shot scoring of many labels under a loaded CPU can run one engine call past the default
    # stall limit (120 s), which would end the server mid-baseline
    env = {**os.environ, "SEEDLING_PORT": str(port), "SEEDLING_ADAPTERS_DIR": a.adapters_dir,
           "SEEDLING_MAX_QUEUED_REQUESTS": "256", "SEEDLING_ENGINE_STALL_TIMEOUT_S": "3600"}
    if a.checkpoint:
        env["SEEDLING_CHECKPOINT"] = a.checkpoint
    proc = subprocess_app(env, a.server_log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, "/ready")
        return run_phases(url, a, labels, records, proc.pid)
    finally:
        stop(proc)


def run_phases(url: str, a: argparse.Namespace, labels: list[str], records: list[dict],
               server_pid: int | None) -> dict[str, dict]:
    """The head phase, then the zero-shot phase (skipped with --zero-shot-texts 0)."""
    base = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    results = {}
    for name, model, n in (("head", a.head, a.texts), ("zero-shot", base, a.zero_shot_texts)):
        if n > 0:
            results[name] = asyncio.run(phase(url, model, labels, records[:n], a.concurrency, a.max_wall_s,
                                              server_pid))
    return results


def report(a: argparse.Namespace, labels: list[str], results: dict[str, dict]) -> None:
    print(f"/classify, {len(labels)} labels, concurrency {a.concurrency}, one text per request "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}):")
    for name, r in results.items():
        print(f"  {name:9s} {r['texts_per_s']:8.2f} texts/s  p50 {r['p50_ms']:8.0f} ms  accuracy "
              f"{r['accuracy']:.3f} (n={r['texts']})  errors {r['errors']}  wall {r['wall_s']} s  CPU ms/text: "
              f"server {r['server_cpu_ms_per_text']:.1f}, client {r['client_cpu_ms_per_text']:.1f}")
    ratio = None
    if "zero-shot" in results and "head" in results:
        ratio = results["head"]["texts_per_s"] / max(results["zero-shot"]["texts_per_s"], 1e-9)
        print(f"  head / zero-shot: {ratio:.0f}x")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"results": results, "ratio": ratio}, indent=2) + "\n")


def subprocess_app(env: dict[str, str], log_path: str):  # noqa: ANN201 - subprocess.Popen
    import subprocess

    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=log, stderr=subprocess.STDOUT)


if __name__ == "__main__":
    main()
