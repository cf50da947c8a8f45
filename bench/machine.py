"""What a benchmark ran on, and the speed limit it implies: the CPU (model and SIMD flags), the
memory bandwidth (a STREAM-style copy, measured in the same run as the servers), and the weight bytes
one decode step reads, whose ratio is the most tokens/s one stream can decode on this machine.

    python -m bench.machine                 # prints all three for the default model and serving path

Single-stream decode reads every weight once per token and little else, so it is memory-bound:
tokens/s <= bandwidth / weight bytes. bench/compare.py prints the measured C=1 decode against it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

# the flags that decide which kernels run (model/native.py) and what llama.cpp dispatches to
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve")


def cpu_description() -> dict:
    """Model name, core count and the SIMD flags present (from /proc/cpuinfo on Linux)."""
    info = {"model": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "simd_flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["model"] = fields.get("model name", fields.get("Model", info["model"]))
        flags = set((fields.get("flags") or fields.get("Features") or "").split())
        info["simd_flags"] = [f for f in SIMD_FLAGS if f in flags]
    return info


def copy_bandwidth(mib: int = 256, repeats: int = 10, threads: int | None = None) -> float:
    """STREAM-style copy bandwidth in bytes/s: best of `repeats` copies of a `mib` MiB buffer (far
    larger than any cache), counting the bytes read and the bytes written, as STREAM does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        src = torch.ones(mib * 2**20 // 4)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        return 2 * src.numel() * src.element_size() / best
    finally:
        torch.set_num_threads(previous)


def decode_weight_bytes(network: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter, buffer and packed tensor (a native
    model's `weights` list) once, except the embedding table (a decode looks up one row) unless the
    output head is that same storage."""
    embedding = getattr(getattr(network, "embed_tokens", None), "weight", None)
    head = getattr(getattr(network, "lm_head", None), "weight", None)
    skip = {embedding.data_ptr()} if embedding is not None and (head is None or
                                                               head.data_ptr() != embedding.data_ptr()) else set()
    seen: set[int] = set()
    total = 0
    for t in [*network.parameters(), *network.buffers(), *getattr(network, "weights", [])]:
        if t.numel() == 0 or t.data_ptr() in seen or t.data_ptr() in skip:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    from model.convert import ensure_default_model
    from model.inference import load_for_serving

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--quantize", default="auto")
    a = ap.parse_args()
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {' '.join(cpu['simd_flags'])})")
    bandwidth = copy_bandwidth()
    model = load_for_serving(a.checkpoint or ensure_default_model(), quantize=a.quantize).model
    weights = decode_weight_bytes(model.network)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {model.capabilities.path} reads {weights / 1e6:.1f} MB per "
          f"decode step -> at most {bandwidth / weights:.0f} tokens/s for one stream")


if __name__ == "__main__":
    main()
