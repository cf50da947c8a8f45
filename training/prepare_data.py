"""Prepare pretraining text: read, clean, split into sentences, de-duplicate, filter, split train/val.

    python -m training.prepare_data --preset cpu-demo --out_dir runs/demo/data
    python -m training.prepare_data --inputs notes.txt tickets.csv hf:wikitext:wikitext-2-raw-v1:train \\
        --out_dir runs/mine/data
    seedling-train prepare_data --help

Inputs: JSONL / JSONL.gz (the text is `--text_field`, else `text`, else the record's messages,
document+summary or src+tgt joined), plain text (one document per blank-line-separated block), CSV
(`--text_field` column, else `text`), and Hugging Face datasets as `hf:NAME[:CONFIG]:SPLIT`.
Cleaning: Unicode NFKC (full-width CJK punctuation kept as written, so Chinese survives intact),
HTML tags/entities and control characters removed, whitespace normalised. Sentences come from an
NLTK Punkt model trained on this corpus (no downloads) plus CJK sentence punctuation; documents
longer than `max_chars` are cut at sentence boundaries. Exact duplicates (after case/space folding)
and near duplicates (MinHash over word/character shingles) are dropped, then length filters apply.
Writes `train.jsonl`, `val.jsonl` ({"text"} per line, deterministic split by content hash) and
`report.json` (what was dropped and why).
"""

from __future__ import annotations

import csv
import hashlib
import html
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.common import TrainingError, config_dict, field, run_job, write_json
from training.data import iter_jsonl, open_text, write_jsonl

SHARED = "../shared/data"


@dataclass
class PrepareDataConfig:
    inputs: list[str] = field(default_factory=list, help="files (.jsonl[.gz], .txt, .csv) or hf:NAME[:CONFIG]:SPLIT")
    out_dir: str = field("runs/data", help="output directory (train.jsonl, val.jsonl, report.json)")
    text_field: str = field("", help="record field / CSV column holding the text (default: auto)")
    max_docs_per_input: int = field(0, help="read at most this many documents per input (0 = all)")
    val_fraction: float = field(0.02, help="share of documents in the validation split")
    min_chars: int = field(20, help="drop documents shorter than this (characters, after cleaning)")
    max_chars: int = field(4000, help="cut longer documents into chunks of whole sentences")
    min_sentences: int = field(1, help="drop documents with fewer sentences")
    near_dup_threshold: float = field(0.8, help="drop documents whose estimated Jaccard similarity to a kept "
                                      "one is at least this (0 = off)")
    seed: int = field(0, help="salt of the train/val split hash")

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        if not 0 <= self.near_dup_threshold <= 1:
            raise ValueError("near_dup_threshold must be in [0, 1]")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(val_fraction=0.1, min_chars=10),
    # ~3 MB of text: public-domain English, Chinese Wikipedia paragraphs, customer-support dialogues
    "cpu-demo": dict(inputs=[f"{SHARED}/en_public_domain_text/train.jsonl.gz",
                             f"{SHARED}/zh_wiki_paragraphs/cmrc2018_dev.jsonl",
                             f"{SHARED}/bitext_customer_support/train.jsonl",
                             f"{SHARED}/chatterbot_corpus/train.jsonl"],
                     max_docs_per_input=1500, val_fraction=0.03),
    "gpu": dict(inputs=[f"{SHARED}/en_public_domain_text/train.jsonl.gz", f"{SHARED}/zh_wiki_paragraphs/cmrc2018_dev.jsonl",
                        f"{SHARED}/zh_wiki_paragraphs/drcd_dev.jsonl", f"{SHARED}/sgd_dialogue/train.jsonl.gz",
                        f"{SHARED}/bitext_customer_support/train.jsonl", f"{SHARED}/chatterbot_corpus/train.jsonl"],
                val_fraction=0.01),
}


# ---------------------------------------------------------------------------- reading
def record_text(rec: dict[str, Any], text_field: str = "") -> str | None:
    if text_field:
        v = rec.get(text_field)
        return v if isinstance(v, str) else None
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict))
    if "document" in rec and "summary" in rec:
        return f"{rec['document']}\n\n{rec['summary']}"
    if "src" in rec and "tgt" in rec:
        return f"{rec['src']}\n{rec['tgt']}"
    return None


def read_input(spec: str, text_field: str) -> Iterator[str | None]:
    """Raw documents of one input (None for a record without usable text)."""
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) < 2:
            raise TrainingError(f"{spec!r}: use hf:NAME[:CONFIG]:SPLIT")
        name, split, config = parts[0], parts[-1], (parts[1] if len(parts) > 2 else None)
        import datasets

        for rec in datasets.load_dataset(name, config, split=split):
            yield record_text(dict(rec), text_field)
        return
    path = Path(spec)
    if not path.exists():
        raise TrainingError(f"input {path} not found")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        for rec in iter_jsonl(path):
            yield record_text(rec, text_field)
    elif name.endswith((".csv", ".csv.gz")):
        with open_text(path) as fh:
            reader = csv.DictReader(fh)
            col = text_field or "text"
            if reader.fieldnames is None or col not in reader.fieldnames:
                raise TrainingError(f"{path}: no column {col!r} (columns: {reader.fieldnames}); pass --text_field")
            for row in reader:
                yield row[col]
    else:
        with open_text(path) as fh:
            yield from re.split(r"\n\s*\n", fh.read())


# ---------------------------------------------------------------------------- cleaning
_FULLWIDTH_PUNCT = re.compile(r"([\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u3000-\u303f]+)")
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|</?[a-zA-Z][^<>]*>", re.S | re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff]")


def nfkc_keep_cjk_punct(text: str) -> str:
    """NFKC everywhere except full-width/CJK punctuation, which Chinese text uses on purpose."""
    parts = _FULLWIDTH_PUNCT.split(text)
    return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))


def clean_text(text: str) -> str:
    text = nfkc_keep_cjk_punct(text)
    if "<" in text:
        text = _TAG.sub(" ", text)
    if "&" in text:
        text = html.unescape(text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------- sentences
_CJK_END = re.compile(r"(?<=[。！？；])")


class SentenceSplitter:
    """NLTK Punkt trained on the corpus itself (learns its abbreviations), then CJK punctuation."""

    def __init__(self, texts: list[str]) -> None:
        from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

        trainer = PunktTrainer()
        trainer.INCLUDE_ALL_COLLOCS = True
        sample = "\n\n".join(texts[:2000])
        trainer.train(sample, finalize=True)
        self.punkt = PunktSentenceTokenizer(trainer.get_params())

    def split(self, text: str) -> list[str]:
        out: list[str] = []
        for para in text.split("\n"):
            for sent in self.punkt.tokenize(para):
                out += [s.strip() for s in _CJK_END.split(sent) if s.strip()]
        return out


def chunk(sentences: list[str], max_chars: int) -> list[str]:
    """Greedy chunks of whole sentences, each at most max_chars (a longer sentence stands alone)."""
    chunks, cur = [], ""
    for s in sentences:
        if cur and len(cur) + 1 + len(s) > max_chars:
            chunks.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    if cur:
        chunks.append(cur)
    return chunks


# ---------------------------------------------------------------------------- duplicates
def fold(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


class NearDuplicates:
    """MinHash (64 hashes) with LSH banding (16 bands x 4 rows) over word 3-shingles, or character
    4-grams for text without spaces (Chinese); a candidate pair is a duplicate when the signatures
    agree on at least `threshold` of the hashes (an estimate of Jaccard similarity)."""

    PRIME = (1 << 61) - 1

    def __init__(self, threshold: float, n_hashes: int = 64, bands: int = 16, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self.PRIME, n_hashes, dtype=np.uint64)
        self.b = rng.integers(0, self.PRIME, n_hashes, dtype=np.uint64)
        self.threshold, self.bands, self.rows = threshold, bands, n_hashes // bands
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.signatures: list[np.ndarray] = []

    def _signature(self, text: str) -> np.ndarray | None:
        words = fold(text).split()
        if len(words) >= 8:
            shingles = {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}
        else:
            compact = fold(text).replace(" ", "")
            shingles = {compact[i:i + 4] for i in range(max(1, len(compact) - 3))}
        if not shingles:
            return None
        x = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64)
        # (n_hashes, shingles): a*x + b mod 2^64 (wrapping) is a fine universal-ish hash here
        return (np.outer(self.a, x) + self.b[:, None]).min(axis=1)

    def is_duplicate(self, text: str) -> bool:
        """True if `text` nearly duplicates one seen before; otherwise remember it."""
        sig = self._signature(text)
        if sig is None:
            return False
        keys = [(band, sig[band * self.rows:(band + 1) * self.rows].tobytes()) for band in range(self.bands)]
        seen: set[int] = set()
        for key in keys:
            for j in self.buckets.get(key, ()):
                if j not in seen:
                    seen.add(j)
                    if float(np.mean(self.signatures[j] == sig)) >= self.threshold:
                        return True
        idx = len(self.signatures)
        self.signatures.append(sig)
        for key in keys:
            self.buckets.setdefault(key, []).append(idx)
        return False


def split_of(text: str, seed: int, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


# ---------------------------------------------------------------------------- the job
def main(cfg: PrepareDataConfig) -> dict[str, Any]:
    if not cfg.inputs:
        raise TrainingError("no --inputs given (files or hf:NAME:SPLIT)")
    dropped: Counter[str] = Counter()
    per_input: dict[str, int] = {}
    # 1. read + clean
    docs: list[str] = []
    for spec in cfg.inputs:
        n = 0
        for raw in read_input(spec, cfg.text_field):
            if cfg.max_docs_per_input and n >= cfg.max_docs_per_input:
                break
            n += 1
            if raw is None:
                dropped["no_text_field"] += 1
                continue
            text = clean_text(raw)
            if not text:
                dropped["empty_after_cleaning"] += 1
                continue
            docs.append(text)
        per_input[spec] = n
    read_total = sum(per_input.values())
    # 2. sentences: cut long documents, count sentences
    splitter = SentenceSplitter(docs)
    pieces: list[str] = []
    n_sentences = cut = 0
    for doc in docs:
        sents = splitter.split(doc)
        n_sentences += len(sents)
        if len(sents) < cfg.min_sentences:
            dropped["too_few_sentences"] += 1
            continue
        if len(doc) > cfg.max_chars:
            pieces += chunk(sents, cfg.max_chars)
            cut += 1
        else:
            pieces.append(doc)
    # 3. length filter, exact and near duplicates
    exact: set[str] = set()
    near = NearDuplicates(cfg.near_dup_threshold) if cfg.near_dup_threshold > 0 else None
    kept: list[str] = []
    for text in pieces:
        if len(text) < cfg.min_chars:
            dropped["too_short"] += 1
            continue
        key = hashlib.blake2b(fold(text).encode(), digest_size=16).digest()
        if key in exact:
            dropped["exact_duplicate"] += 1
            continue
        exact.add(key)
        if near is not None and near.is_duplicate(text):
            dropped["near_duplicate"] += 1
            continue
        kept.append(text)
    # 4. deterministic split and order (sorted by content hash = a fixed shuffle)
    kept.sort(key=lambda t: hashlib.blake2b(f"order:{cfg.seed}:{t}".encode(), digest_size=8).digest())
    train = [t for t in kept if split_of(t, cfg.seed, cfg.val_fraction) == "train"]
    val = [t for t in kept if split_of(t, cfg.seed, cfg.val_fraction) == "val"]
    if not val and len(train) > 1 and cfg.val_fraction > 0:
        val.append(train.pop())
    if not train:
        raise TrainingError(f"no documents left after filtering ({dict(dropped)}); check the inputs and filters")
    out = Path(cfg.out_dir)
    write_jsonl(out / "train.jsonl", [{"text": t} for t in train])
    write_jsonl(out / "val.jsonl", [{"text": t} for t in val])
    report = {"config": config_dict(cfg), "inputs": per_input, "documents_read": read_total,
              "documents_after_cleaning": len(docs), "sentences": n_sentences,
              "long_documents_cut": cut,
              "pieces_after_sentence_chunking": len(pieces), "dropped": dict(dropped),
              "train_docs": len(train), "val_docs": len(val),
              "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val))}
    write_json(out / "report.json", report)
    print(f"prepare_data: {read_total} documents read -> {len(train)} train / {len(val)} val "
          f"({report['train_chars']:,} / {report['val_chars']:,} chars); dropped: {dict(dropped)}")
    return report


def cli(argv: list[str] | None = None, prog: str = "python -m training.prepare_data") -> int:
    return run_job(main, PrepareDataConfig, PRESETS, argv, prog=prog, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(cli())
