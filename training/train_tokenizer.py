"""Train a SentencePiece tokenizer on prepared text and write the token shards pretraining reads.

    python -m training.train_tokenizer --preset cpu-demo --data_dir runs/demo/data --out_dir runs/demo/tok
    seedling-train train_tokenizer --help

Reads `train.jsonl` / `val.jsonl` ({"text": ...} per line, as `prepare_data` writes them). Writes into
`out_dir`: `tokenizer/` (byte-fallback SentencePiece with the ChatML specials `<|im_start|>` and
`<|im_end|>` reserved), `train.bin` / `val.bin` (token shards: documents joined by the end token) and
`tokenizer_report.json`. Prints compression (characters per token) on the validation split for
English and for Chinese text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.common import TrainingError, config_dict, field, run_job, write_json
from training.data import iter_jsonl, write_shard


@dataclass
class TrainTokenizerConfig:
    data_dir: str = field("", help="directory with train.jsonl / val.jsonl from prepare_data")
    out_dir: str = field("runs/tokenizer", help="output directory (tokenizer/, train.bin, val.bin)")
    vocab_size: int = field(8192, help="vocabulary size (an upper bound for small corpora)")
    model_type: str = field("bpe", help="bpe or unigram")
    max_train_chars: int = field(50_000_000, help="train the tokenizer on at most this many characters")
    write_shards: bool = field(True, help="also encode train/val into token shards")

    def __post_init__(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError("model_type must be bpe or unigram")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 byte-fallback pieces + specials)")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=400, max_train_chars=200_000),
    "cpu-demo": dict(vocab_size=4096, max_train_chars=6_000_000),
    "gpu": dict(vocab_size=32000, max_train_chars=500_000_000),
}


def is_chinese(text: str, threshold: float = 0.3) -> bool:
    """True when at least `threshold` of the non-space characters are CJK ideographs."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    cjk = sum(1 for c in chars if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return cjk / len(chars) >= threshold


def compression(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """Characters per token, separately for English (non-Chinese) and Chinese documents."""
    out: dict[str, Any] = {}
    for name, group in (("english", [t for t in texts if not is_chinese(t)]),
                        ("chinese", [t for t in texts if is_chinese(t)])):
        chars = sum(len(t) for t in group)
        toks = sum(len(tokenizer.encode(t)) for t in group)
        out[name] = {"docs": len(group), "chars": chars, "tokens": toks,
                     "chars_per_token": round(chars / toks, 3) if toks else None}
    return out


def encode_docs(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """One token stream: each document's ids followed by the end-of-text id."""
    parts = []
    for t in texts:
        parts.append(np.asarray(tokenizer.encode(t) + [tokenizer.eos_id], dtype=np.uint32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def main(cfg: TrainTokenizerConfig) -> dict[str, Any]:
    from model.tokenizer import train_sentencepiece

    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    if not cfg.data_dir or not (data_dir / "train.jsonl").exists():
        raise TrainingError(f"{data_dir / 'train.jsonl'} not found; run `seedling-train prepare_data "
                            f"--out_dir {data_dir or 'DIR'}` first")
    train = [r["text"] for r in iter_jsonl(data_dir / "train.jsonl")]
    val = [r["text"] for r in iter_jsonl(data_dir / "val.jsonl")] if (data_dir / "val.jsonl").exists() else []

    # 1. train on a bounded sample (whole documents, in file order, which prepare_data shuffled)
    sample, n = [], 0
    for t in train:
        if n >= cfg.max_train_chars:
            break
        sample.append(t)
        n += len(t)
    t0 = time.perf_counter()
    tokenizer = train_sentencepiece(sample, out_dir / "tokenizer", vocab_size=cfg.vocab_size,
                                    model_type=cfg.model_type)
    train_s = time.perf_counter() - t0
    print(f"trained {cfg.model_type} tokenizer: {tokenizer.vocab_size} pieces on {n:,} chars in {train_s:.1f}s")

    # 2. compression on validation text
    comp = compression(tokenizer, val or sample[:200])
    for lang, c in comp.items():
        if c["docs"]:
            print(f"  {lang}: {c['chars_per_token']} chars/token over {c['docs']} validation docs")

    # 3. shards
    report: dict[str, Any] = {"config": config_dict(cfg), "vocab_size": tokenizer.vocab_size,
                              "train_chars": n, "compression": comp, "seconds": round(train_s, 1)}
    if cfg.write_shards:
        for split, texts in (("train", train), ("val", val or train[-max(1, len(train) // 20):])):
            ids = encode_docs(tokenizer, texts)
            write_shard(out_dir / f"{split}.bin", ids, tokenizer.vocab_size)
            report[f"{split}_tokens"] = int(ids.size)
            print(f"  {split}.bin: {ids.size:,} tokens from {len(texts):,} docs")
    write_json(out_dir / "tokenizer_report.json", report)
    return report


def cli(argv: list[str] | None = None, prog: str = "python -m training.train_tokenizer") -> int:
    return run_job(main, TrainTokenizerConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
