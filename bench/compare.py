"""Our server against llama.cpp's llama-server on the same machine, prompts and settings, in one run.

    python -m bench.compare --llama-server ~/.cache/llama-server/bin/llama-server        # starts both
    python -m bench.compare --llama-url http://127.0.0.1:8080 --quantize int8 --dtype bfloat16
    python -m bench.compare --no-llama --concurrency 1,16                                 # ours only
    python -m bench.compare --from-json runs/compare.json      # the tables of a --json-out run, e.g. for docs

Without --quantize / --dtype ours runs what `make serve` runs (SEEDLING_QUANTIZE=auto; /ready names
the path). The run also prints the CPU and its SIMD flags, a STREAM-style copy bandwidth measured
before and after the servers, and single-stream decode (1 / inter-token latency p50 at C=1) against
its memory-bound limit, bandwidth / weight bytes per decode step (bench/machine.py).

The servers run one after the other, never together. Workloads (streaming /v1/chat/completions,
greedy, exactly --max-tokens new tokens per request, closed loop with C clients x R requests):
  1. the 16 load prompts at C = 1, 4, 16, 64: aggregate tok/s, TTFT and inter-token latency p50/p99;
  2. a ~1,000-token shared system prompt + a short question at C = 1: TTFT p50 with prefix caching on
     and off (ours: SEEDLING_PREFIX_CACHING; llama-server: `cache_prompt`).
Prints one table with the ratio ours / theirs per row. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.load import main_async as load_levels
from bench.machine import copy_bandwidth, cpu_description, decode_weight_bytes
from bench.workload import LOAD_PROMPTS
from model.config import QUANTIZATIONS

SYSTEM_PARAGRAPHS = [
    "You are the support assistant of Northwind Bank. Answer politely, in at most three sentences.",
    "Cards: a lost or stolen card must be blocked at once in the app under Cards > Block; a new card "
    "arrives in 5 to 7 working days; contactless payments are limited to 50 euros per payment.",
    "Transfers: SEPA transfers arrive on the next working day; instant transfers cost 0.50 euros; "
    "international transfers take 2 to 4 working days and show the exchange rate before you confirm.",
    "Accounts: opening an account needs a passport or identity card and a proof of address; "
    "statements are in the app under Accounts > Documents; the overdraft limit can be changed there.",
    "Security: never ask for a PIN or a full card number; suspected fraud goes to the fraud team at "
    "once; a customer may freeze every card with one tap in the app.",
]


def shared_system_prompt(min_words: int = 700) -> str:
    """~1,000 tokens of policy text, deterministic."""
    out: list[str] = []
    i = 0
    while sum(len(p.split()) for p in out) < min_words:
        out.append(f"Section {i + 1}. " + SYSTEM_PARAGRAPHS[i % len(SYSTEM_PARAGRAPHS)])
        i += 1
    return "\n\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}{path} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_ours(a: argparse.Namespace, prefix_caching: bool) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "SEEDLING_PORT": str(port), "SEEDLING_MAX_NUM_SEQS": str(max(a.levels)),
           "SEEDLING_PREFIX_CACHING": "1" if prefix_caching else "0",
           "SEEDLING_MAX_QUEUED_REQUESTS": "256", "SEEDLING_MAX_MODEL_LEN": "2048"}
    if a.dtype:
        env["SEEDLING_DTYPE"] = a.dtype
    if a.quantize:
        env["SEEDLING_QUANTIZE"] = a.quantize
    if a.checkpoint:
        env["SEEDLING_CHECKPOINT"] = a.checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/ready")
    return url, proc


def start_llama(a: argparse.Namespace) -> tuple[str, subprocess.Popen]:
    from model.convert import default_gguf_path

    port = free_port()
    slots = max(a.levels)
    cmd = [a.llama_server, "-m", str(a.gguf or default_gguf_path()), "--host", "127.0.0.1", "--port",
           str(port), "--parallel", str(slots), "--cont-batching", "-t", str(a.threads), "-c",
           str(max(8192, slots * 1536)), "--alias", "smollm2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/health")
    return url, proc


def run_load(url: str, a: argparse.Namespace, levels: list[int], prompts: list[str] | None = None,
             system: str | None = None, extra: dict | None = None, requests_per_client: int | None = None
             ) -> list[dict]:
    args = argparse.Namespace(
        base_url=url, model=None, max_tokens=a.max_tokens, ignore_eos=True, api_key=None,
        extra_body=json.dumps({"repeat_penalty": 1.0, **(extra or {})}), concurrency=levels,
        requests_per_client=requests_per_client or a.requests_per_client, timeout_s=600.0, max_wall_s=900.0,
        prompts=None, system=system)
    if prompts is not None:
        path = Path(f"/tmp/seedling-compare-prompts-{os.getpid()}.json")
        path.write_text(json.dumps({"load_prompts": prompts}))
        args.prompts = str(path)
    return asyncio.run(load_levels(args))


def measure(url: str, a: argparse.Namespace, caching_extra: dict | None) -> dict:
    ready = httpx.get(url + "/ready", timeout=10)
    serving_path = ready.json().get("serving_path") if ready.status_code == 200 else None
    rows = run_load(url, a, a.levels, prompts=LOAD_PROMPTS, extra=caching_extra)
    system = shared_system_prompt()
    shared = run_load(url, a, [1], prompts=[f"Question {i}: {q}" for i, q in enumerate(LOAD_PROMPTS)],
                      system=system, extra=caching_extra, requests_per_client=6)
    return {"levels": rows, "shared_prompt": shared[0], "serving_path": serving_path}


def machine_limits(a: argparse.Namespace) -> dict:
    """The CPU, and the weight bytes our serving path reads per decode step (same settings as the server)."""
    import torch

    from model.convert import ensure_default_model
    from model.inference import load_for_serving

    model = load_for_serving(a.checkpoint or ensure_default_model(), dtype=getattr(torch, a.dtype or "float32"),
                             quantize=a.quantize or "auto").model
    return {"cpu": cpu_description(), "weight_bytes": decode_weight_bytes(model.network),
            "path": model.capabilities.path, "copy_bandwidth_Bps": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=str(Path.home() / ".cache/llama-server/bin/llama-server"),
                    help="llama-server binary to start (see ../shared/tools/build-llama-server.sh)")
    ap.add_argument("--llama-url", default=None, help="use an already running llama-server instead")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--gguf", default=None, help="GGUF for llama-server (default: the cached SmolLM2 one)")
    ap.add_argument("--checkpoint", default=None, help="our checkpoint (default: SmolLM2)")
    ap.add_argument("--dtype", default=None, help="SEEDLING_DTYPE (default: the server's, auto)")
    ap.add_argument("--quantize", default=None, choices=("auto", "none", *QUANTIZATIONS),
                    help="SEEDLING_QUANTIZE (default: the server's, auto)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--from-json", default=None, help="print the tables of an earlier --json-out run (no servers)")
    a = ap.parse_args()
    if a.from_json:
        report(json.loads(Path(a.from_json).read_text()))
        return
    a.levels = [int(c) for c in a.concurrency.split(",")]
    results: dict[str, dict] = {"machine": machine_limits(a)}
    cpu = results["machine"]["cpu"]
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {' '.join(cpu['simd_flags'])})", flush=True)
    results["machine"]["copy_bandwidth_Bps"].append(copy_bandwidth(threads=a.threads))

    print("== ours (prefix caching on)", flush=True)
    url, proc = start_ours(a, prefix_caching=True)
    try:
        results["ours"] = measure(url, a, None)
    finally:
        stop(proc)
    print("== ours (prefix caching off): shared system prompt only", flush=True)
    url, proc = start_ours(a, prefix_caching=False)
    try:
        results["ours_nocache"] = {"shared_prompt": run_load(
            url, a, [1], prompts=[f"Question {i}: {q}" for i, q in enumerate(LOAD_PROMPTS)],
            system=shared_system_prompt(), requests_per_client=6)[0]}
    finally:
        stop(proc)
    if not a.no_llama:
        print("== llama-server", flush=True)
        proc = None
        url = a.llama_url
        if url is None:
            url, proc = start_llama(a)
        try:
            results["llama"] = measure(url, a, None)
            results["llama_nocache"] = {"shared_prompt": run_load(
                url, a, [1], prompts=[f"Question {i}: {q}" for i, q in enumerate(LOAD_PROMPTS)],
                system=shared_system_prompt(), extra={"cache_prompt": False}, requests_per_client=6)[0]}
        finally:
            if proc is not None:
                stop(proc)
    results["machine"]["copy_bandwidth_Bps"].append(copy_bandwidth(threads=a.threads))
    report(results)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=1))


def report(results: dict[str, dict]) -> None:
    ours, theirs = results["ours"], results.get("llama")
    cpu = results["machine"]["cpu"]
    print(f"\nCPU: {cpu['model']} ({cpu['cpus']} CPUs; {' '.join(cpu['simd_flags'])}); "
          f"ours: {ours['serving_path'] or results['machine']['path']}")
    print("\n| workload | C | ours tok/s | llama.cpp tok/s | ratio | ours TTFT p50/p99 ms | llama.cpp TTFT p50/p99 ms "
          "| ours ITL p50/p99 ms | llama.cpp ITL p50/p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")

    def ms(row: dict, key: str) -> str:
        return f"{row[key + '_p50_s'] * 1e3:.0f} / {row[key + '_p99_s'] * 1e3:.0f}"

    for i, row in enumerate(ours["levels"]):
        other = theirs["levels"][i] if theirs else None
        ratio = f"{row['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other else "-"
        print(f"| load prompts | {row['concurrency']} | {row['tokens_per_s']:.1f} | "
              f"{other['tokens_per_s']:.1f} | {ratio} | {ms(row, 'ttft')} | {ms(other, 'ttft')} | "
              f"{ms(row, 'itl')} | {ms(other, 'itl')} |" if other else
              f"| load prompts | {row['concurrency']} | {row['tokens_per_s']:.1f} | - | - | {ms(row, 'ttft')} | - "
              f"| {ms(row, 'itl')} | - |")
    print("\nShared ~1,000-token system prompt, C=1, TTFT p50:")
    on = ours["shared_prompt"]["ttft_p50_s"]
    off = results["ours_nocache"]["shared_prompt"]["ttft_p50_s"]
    print(f"  ours: prefix caching on {on * 1e3:.0f} ms, off {off * 1e3:.0f} ms -> {off / on:.1f}x faster")
    if theirs:
        lon = theirs["shared_prompt"]["ttft_p50_s"]
        loff = results["llama_nocache"]["shared_prompt"]["ttft_p50_s"]
        print(f"  llama.cpp: cache_prompt on {lon * 1e3:.0f} ms, off {loff * 1e3:.0f} ms; "
              f"ours/llama.cpp TTFT with caching: {on / lon:.2f}x")
    report_limit(results)


def report_limit(results: dict[str, dict]) -> None:
    """Single-stream decode against bandwidth / weight bytes (the best of the copy measurements)."""
    machine = results["machine"]
    bandwidth, weights = max(machine["copy_bandwidth_Bps"]), machine["weight_bytes"]
    limit = bandwidth / weights
    print(f"\nMemory: STREAM-style copy {', '.join(f'{b / 1e9:.1f}' for b in machine['copy_bandwidth_Bps'])} GB/s "
          f"(before, after the servers); {machine['path']} reads {weights / 1e6:.1f} MB of weights per decode "
          f"step -> limit {limit:.0f} tokens/s at C=1")
    for name in ("ours", "llama"):
        level = next((r for r in results.get(name, {}).get("levels", []) if r["concurrency"] == 1), None)
        if level and level["itl_p50_s"]:
            decode = 1 / level["itl_p50_s"]
            print(f"  {name}: decode at C=1 (1 / ITL p50) {decode:.0f} tokens/s = limit / {limit / decode:.2f}")


if __name__ == "__main__":
    main()
