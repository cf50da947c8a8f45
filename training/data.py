"""Data plumbing shared by the jobs: JSONL readers, token shards, packed windows, SFT examples.

Token shard format (little-endian), written by `train_tokenizer`, read by `pretrain`/`evaluate`:

    offset 0   8 bytes  magic  b"SEEDTOK\\0"
    offset 8   u32      version (1)
    offset 12  u32      dtype code (1 = uint16, 2 = uint32)
    offset 16  u64      token count
    offset 24  u64      vocab size of the tokenizer that wrote it
    offset 32  32 bytes reserved (zero)
    offset 64  count tokens
"""

from __future__ import annotations

import gzip
import json
import random
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import tasks

SHARD_MAGIC = b"SEEDTOK\0"
SHARD_VERSION = 1
HEADER_BYTES = 64
_DTYPES = {1: np.uint16, 2: np.uint32}
_HEADER = struct.Struct("<8sIIQQ")
REBUILD_HINT = "re-run `seedling-train train_tokenizer` (it writes train.bin / val.bin next to the tokenizer)"


class DataError(ValueError):
    """Input data that cannot be used; the message says what to fix or which command to re-run."""


# ---------------------------------------------------------------------------- JSONL
def open_text(path: Path) -> Any:
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def iter_jsonl(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Records of a .jsonl or .jsonl.gz file; a bad line raises DataError naming file and line."""
    with open_text(path) as fh:
        n = 0
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            yield rec
            n += 1
            if limit is not None and n >= limit:
                return


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    from training.common import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---------------------------------------------------------------------------- token shards
def write_shard(path: Path, tokens: Sequence[int] | np.ndarray, vocab_size: int) -> None:
    from model.versioned import atomic_write_bytes

    code = 1 if vocab_size <= 65536 else 2
    arr = np.asarray(tokens, dtype=_DTYPES[code])
    if arr.size and int(arr.max()) >= vocab_size:
        raise DataError(f"token id {int(arr.max())} >= vocab size {vocab_size}")
    header = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, code, arr.size, vocab_size).ljust(HEADER_BYTES, b"\0")
    atomic_write_bytes(Path(path), header + arr.tobytes())


@dataclass
class Shard:
    path: Path
    tokens: np.ndarray  # (count,) uint16 | uint32, memory-mapped
    vocab_size: int


def read_shard(path: Path, vocab_size: int | None = None) -> Shard:
    """Memory-map a shard after checking its header; every problem names the command to re-run."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"token shard {path} not found; {REBUILD_HINT}")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != SHARD_MAGIC:
        raise DataError(f"{path} is not a Seedling token shard (bad magic); {REBUILD_HINT}")
    _, version, code, count, shard_vocab = _HEADER.unpack(head[:_HEADER.size])
    if version != SHARD_VERSION:
        raise DataError(f"{path}: shard version {version}, this code reads {SHARD_VERSION}; {REBUILD_HINT}")
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown dtype code {code}; {REBUILD_HINT}")
    itemsize = np.dtype(_DTYPES[code]).itemsize
    if size != HEADER_BYTES + count * itemsize:
        raise DataError(f"{path}: header says {count} tokens but the file holds "
                        f"{(size - HEADER_BYTES) // itemsize} (truncated?); {REBUILD_HINT}")
    if vocab_size is not None and shard_vocab != vocab_size:
        raise DataError(f"{path} was written for a vocabulary of {shard_vocab}, the model has {vocab_size}; "
                        f"{REBUILD_HINT} with the same tokenizer")
    tokens = np.memmap(path, dtype=_DTYPES[code], mode="r", offset=HEADER_BYTES, shape=(count,))
    return Shard(path=path, tokens=tokens, vocab_size=shard_vocab)


# ---------------------------------------------------------------------------- packed windows
class PackedWindows:
    """Non-overlapping windows of `seq_len + 1` tokens over a token stream, visited in a fixed
    shuffled order per epoch. Sample `i` of the infinite stream is a pure function of
    (seed, i), so the data position of a run is one integer and resume is exact."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True) -> None:
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"only {len(tokens)} tokens: not enough for one window of {seq_len + 1}; "
                            "use more data or a smaller seq_len")
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n_windows, generator=gen)
            else:
                perm = torch.arange(self.n_windows)
            self._perm = (epoch, perm)
        return self._perm[1]

    def window(self, i: int) -> np.ndarray:
        epoch, pos = divmod(i, self.n_windows)
        start = int(self._order(epoch)[pos]) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first .. first+count-1 as inputs x and targets y, both (count, seq_len) long."""
        rows = np.stack([self.window(first + k) for k in range(count)])  # (count, seq_len + 1)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


# ---------------------------------------------------------------------------- SFT examples
def detect_task(record: Mapping[str, Any]) -> str:
    """The task a shared-data record belongs to, from its fields (see ../shared/data/README.md)."""
    if "messages" in record:
        return tasks.CHAT
    if "document" in record and "summary" in record:
        return tasks.SUMMARIZE
    if "src" in record and "tgt" in record:
        return tasks.TRANSLATE
    if "text" in record and "label" in record:
        return tasks.CLASSIFY
    raise DataError(f"cannot tell the task of a record with keys {sorted(record)}; expected messages, "
                    "document+summary, src+tgt or text+label")


def candidate_labels(gold: str, labels: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """All labels (k <= 0 or k >= len) or the gold label plus k-1 distinct random others, shuffled."""
    if k <= 0 or k >= len(labels):
        return list(labels)
    others = rng.sample([lab for lab in labels if lab != gold], k - 1)
    picked = others + [gold]
    rng.shuffle(picked)
    return picked


def task_messages(task: str, record: Mapping[str, Any], labels: Sequence[str] = (), candidates: int = 0,
                  rng: random.Random | None = None) -> list[dict[str, str]]:
    """A training conversation for one record, rendered with the shared prompts of `model.tasks`:
    prompt messages + the assistant answer."""
    rng = rng or random.Random(0)
    if task == tasks.CHAT:
        msgs = [m for m in record["messages"] if m.get("role") in ("system", "user", "assistant")]
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("a chat record needs at least one assistant message")
        return tasks.chat_messages(msgs)
    if task == tasks.SUMMARIZE:
        return tasks.summarize_messages(record["document"]) + [
            {"role": "assistant", "content": record["summary"].strip()}]
    if task == tasks.TRANSLATE:
        return tasks.translate_messages(record["src"], record.get("tgt_lang", "en"), record.get("src_lang")) + [
            {"role": "assistant", "content": record["tgt"].strip()}]
    if task == tasks.CLASSIFY:
        gold = str(record["label"])
        cands = candidate_labels(gold, labels, candidates, rng)
        return tasks.classify_messages(record["text"], cands) + [
            {"role": "assistant", "content": tasks.classify_answer(gold)}]
    raise DataError(f"unknown task {task!r}; choose one of {tasks.TASKS}")


@dataclass
class SFTExample:
    task: str
    ids: list[int]
    loss_mask: list[bool]  # True where the token is a target (assistant content + its end token)


def render_example(tokenizer: Any, messages: list[dict[str, str]], task: str) -> SFTExample:
    r = tasks.render_conversation(tokenizer, messages)
    return SFTExample(task=task, ids=list(r.ids), loss_mask=list(r.loss_mask))


def sft_batch(examples: Sequence[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs x, targets y and target weights w, each (B, T): y[t] = ids[t+1], and w[t] is
    1 exactly where token t+1 is an assistant token (its loss counts)."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), pad_id, dtype=torch.long)
    w = torch.zeros((len(examples), T), dtype=torch.float32)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        x[b, :n] = torch.tensor(e.ids[:-1])
        y[b, :n] = torch.tensor(e.ids[1:])
        w[b, :n] = torch.tensor(e.loss_mask[1:], dtype=torch.float32)
    return x, y, w


def read_labels(path: Path) -> list[str] | None:
    """labels.json next to a classification file, when the dataset ships one."""
    p = Path(path).parent / "labels.json"
    if p.exists():
        labels = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(labels, list):
            return [str(x) for x in labels]
    return None
