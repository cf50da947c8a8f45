"""`seedling-train <job> [flags]`: one console script for every training job.

    seedling-train prepare_data --preset cpu-demo --out_dir runs/demo/data
    seedling-train train_tokenizer --preset cpu-demo --data_dir runs/demo/data --out_dir runs/demo/tok
    seedling-train pretrain --preset cpu-demo --data_dir runs/demo/tok --out_dir runs/demo/pretrain
    seedling-train finetune --preset cpu-demo --init_from runs/demo/pretrain/checkpoint --out_dir runs/demo/sft
    seedling-train adapt --preset translate-de --time_budget_min 20     (a LoRA task adapter)
    seedling-train evaluate --preset cpu-demo --checkpoint runs/demo/sft/checkpoint --out_dir runs/demo/eval
    seedling-train head --name banking77 --adapters_dir adapters       (a classification head)
    seedling-train <job> --help

Each job is also `python -m training.<job>`; this only dispatches to the job's `cli()`.
"""

from __future__ import annotations

import importlib
import sys

JOBS = ("prepare_data", "train_tokenizer", "pretrain", "finetune", "adapt", "merge_adapter", "evaluate", "head")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown job {argv[0]!r}", file=sys.stderr)
        print(__doc__.strip(), file=sys.stderr)
        print(f"\njobs: {', '.join(JOBS)}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    job = importlib.import_module(f"training.{argv[0]}")
    return int(job.cli(argv[1:], prog=f"seedling-train {argv[0]}"))


if __name__ == "__main__":
    raise SystemExit(main())
