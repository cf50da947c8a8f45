"""LoRA training speed on this CPU: tokens/s of one `training.adapt` step (forward + backward of a
packed row, LoRA on every projection) under bf16 autocast against fp32, interleaved in one run.

    python -m bench.adapt_speed                    # 512-token rows, 1 thread, 4 rounds
    python -m bench.adapt_speed --seq-len 1024 --threads 2 --rounds 3

Prints tokens/s per round and the bf16 / fp32 ratio of the medians. `--dtype auto` in
training.adapt picks bf16 on CPUs with AVX512-BF16 because of this ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.workload import median
from model.checkpoint import load_checkpoint
from model.convert import ensure_default_model
from training.adapt import AdaptConfig, packed_loss, precision, wrap_lora
from training.packing import collate


def one_step(model: torch.nn.Module, batch: object, dtype: str) -> float:
    device = torch.device("cpu")
    t0 = time.perf_counter()
    with precision(device, dtype):
        loss = packed_loss(model, batch, device)  # type: ignore[arg-type]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = wrap_lora(load_checkpoint(ensure_default_model(), dtype=torch.float32).model, AdaptConfig()).train()
    from training.data import SFTExample

    gen = torch.Generator().manual_seed(0)
    n = 64  # examples of 64 tokens, the second half of each an "assistant answer"
    examples = [SFTExample("translate", torch.randint(100, 40000, (n,), generator=gen).tolist(),
                           [i >= n // 2 for i in range(n)]) for _ in range(args.seq_len // (n - 1))]
    batch = collate(examples, [list(range(len(examples)))], pad_id=0)
    tokens = int((batch.doc >= 0).sum())
    one_step(model, batch, "fp32")  # warm-up
    speeds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for dtype in speeds:
            speeds[dtype].append(tokens / one_step(model, batch, dtype))
        print(f"round {r + 1}: fp32 {speeds['fp32'][-1]:.1f} tok/s, bf16 {speeds['bf16'][-1]:.1f} tok/s")
    fp32, bf16 = median(speeds["fp32"]), median(speeds["bf16"])
    print(f"{tokens}-token packed row, {args.threads} thread(s): fp32 {fp32:.1f} tok/s, bf16 {bf16:.1f} tok/s, "
          f"bf16 / fp32 = {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
