"""Classification heads for /classify: found in the adapters directory, matched by label set, run on
the engine thread with the texts of concurrent requests batched into shared forwards.

Owns: which heads exist (`HeadRegistry`: one `<adapters_dir>/<name>/head.json` + head.safetensors per
adapter, re-scanned when a head.json appears, changes or goes away, so a head written by
`python -m training.head` is served without a restart), which head a request gets, and the batching
of texts into engine calls (`HeadBatcher`). A head whose files are broken or whose `base` is not the
served checkpoint is refused (logged, listed in `registry.errors`) while the others keep serving.
Must not: run a forward pass on the event loop (the math is `model.head.classify_texts`, run through
`EngineClient.call`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.device import intra_op_threads
from model.features import load_feature_model, precision_unavailable
from model.head import HEAD_META, HeadError, LoadedHead, classify_ids, load_head

from .engine_client import EngineClient

log = logging.getLogger("seedling.heads")


@dataclass
class _Entry:
    mtime_ns: int
    head: LoadedHead | None
    error: str | None


class HeadRegistry:
    """The heads under `adapters_dir` whose `base` matches the served checkpoint's identity."""

    def __init__(self, adapters_dir: str | Path | None, base: dict[str, Any]) -> None:
        self.dir = Path(adapters_dir) if adapters_dir else None
        self.base = base
        self._entries: dict[str, _Entry] = {}

    @property
    def heads(self) -> dict[str, LoadedHead]:
        return {name: e.head for name, e in self._entries.items() if e.head is not None}

    @property
    def errors(self) -> dict[str, str]:
        return {name: e.error for name, e in self._entries.items() if e.error is not None}

    def refresh(self) -> None:
        """Load new or changed heads, forget removed ones: one stat per adapter directory (os.scandir
        and os.stat: pathlib's glob cost a third of the event loop's time per /classify request)."""
        if self.dir is None:
            return
        seen: dict[str, int] = {}
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    try:
                        seen[entry.name] = os.stat(os.path.join(entry.path, HEAD_META)).st_mtime_ns
                    except (FileNotFoundError, NotADirectoryError):  # no head (or removed while scanning)
                        continue
        except OSError as e:
            log.warning("cannot scan adapters dir %s: %s", self.dir, e)
            return
        for name in set(self._entries) - set(seen):
            del self._entries[name]
            log.info("head %s removed", name)
        for name, mtime in seen.items():
            entry = self._entries.get(name)
            if entry is None or entry.mtime_ns != mtime:
                self._entries[name] = self._load(name, mtime)

    def _load(self, name: str, mtime: int) -> _Entry:
        try:
            loaded = load_head(self.dir / name)  # type: ignore[operator]
        except HeadError as e:
            log.error("head %s refused: %s", name, e)
            return _Entry(mtime, None, str(e))
        sha = loaded.info.base.get("weights_sha256")
        if sha != self.base.get("weights_sha256"):
            error = (f"head {name} was trained on {loaded.info.base.get('name')!r} (weights {str(sha)[:12]}), "
                     f"not on the served checkpoint {self.base.get('name')!r} "
                     f"({str(self.base.get('weights_sha256'))[:12]}); retrain it with --base")
            log.error("%s", error)
            return _Entry(mtime, None, error)
        unavailable = precision_unavailable(loaded.info.precision)
        if unavailable:
            error = f"head {name} cannot be served here: {unavailable}; retrain it with --precision bf16"
            log.error("%s", error)
            return _Entry(mtime, None, error)
        log.info("head %s loaded: %d labels, layer %d, %s, %s features", name, len(loaded.info.labels),
                 loaded.info.layer, loaded.info.pooling, loaded.info.precision)
        return _Entry(mtime, loaded, None)

    def match(self, labels: list[str] | None, model: str | None) -> tuple[str, LoadedHead] | None:
        """The head for a request: the adapter `model` names (its labels must equal `labels` as a set
        when both are given), else the first head (by name) whose label set equals `labels`."""
        self.refresh()
        heads = self.heads
        if model is not None:
            head = heads.get(model)
            if head is None or (labels is not None and not _same_set(labels, head.info.labels)):
                return None
            return model, head
        if labels is None:
            return None
        for name in sorted(heads):
            if _same_set(labels, heads[name].info.labels):
                return name, heads[name]
        return None


def _same_set(labels: list[str], head_labels: list[str]) -> bool:
    """Order-free equality; a request repeating a label is not the head's set (zero-shot refuses it)."""
    return len(labels) == len(head_labels) and set(labels) == set(head_labels)


@dataclass
class _Pending:
    texts: list[list[int]]  # encoded texts
    future: asyncio.Future[list[list[float]]]


@dataclass
class HeadBatcher:
    """Texts of concurrent requests for one head go to the engine thread together: while one engine
    call runs, newly arrived texts wait and then share the next call. Before taking a batch of fewer
    than `max_texts` texts the batcher waits `window_s` for more (0: never waits, so a lone request
    never waits). At most `max_texts` texts per call."""

    client: EngineClient
    run: Callable[[list[list[int]]], list[list[float]]]  # runs on the engine thread
    max_texts: int = 64
    window_s: float = 0.0
    _pending: list[_Pending] = field(default_factory=list, init=False)
    _draining: bool = field(default=False, init=False)

    async def classify(self, texts: list[list[int]]) -> list[list[float]]:
        future: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(texts, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return await future

    def _take(self) -> list[_Pending]:
        batch, n = [], 0
        while self._pending and (not batch or n + len(self._pending[0].texts) <= self.max_texts):
            item = self._pending.pop(0)
            if item.future.done():  # cancelled (client gone): skip its texts
                continue
            batch.append(item)
            n += len(item.texts)
        return batch

    async def _drain(self) -> None:
        try:
            while self._pending:
                if self.window_s > 0 and sum(len(p.texts) for p in self._pending) < self.max_texts:
                    await asyncio.sleep(self.window_s)  # let the requests already on their way join
                batch = self._take()
                if batch:
                    await self._call(batch)
        finally:
            self._draining = False

    async def _call(self, batch: list[_Pending]) -> None:
        """One engine call for the batch's texts; each request gets its rows, or the call's error."""
        texts = [t for item in batch for t in item.texts]
        try:
            probs = await self.client.call(self.run, texts)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        start = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(probs[start:start + len(item.texts)])
            start += len(item.texts)


class HeadService:
    """What /classify needs for heads: the registry, one batcher per loaded head, and the engine-thread
    call (`model.head.classify_ids`) on a feature model: the served checkpoint's first blocks in the
    head's precision (q4: the native kernels, as q4 serving runs them), loaded once per (depth,
    precision) on the engine thread (a second or two, the first time), whatever variant serves
    generation."""

    def __init__(self, registry: HeadRegistry, client: EngineClient, checkpoint_dir: Path, pad_id: int) -> None:
        self.registry, self.client, self.pad_id = registry, client, pad_id
        self.checkpoint_dir = checkpoint_dir
        self._batchers: dict[str, tuple[LoadedHead, HeadBatcher]] = {}
        self._copies: dict[tuple[int, str], Any] = {}  # (depth, precision) -> feature model (engine thread only)

    def match(self, labels: list[str] | None, model: str | None) -> tuple[str, LoadedHead] | None:
        return self.registry.match(labels, model)

    async def probabilities(self, name: str, loaded: LoadedHead, ids: list[list[int]]) -> list[list[float]]:
        """Label probabilities (loaded.info.labels order) per encoded text, batched with other requests."""
        current = self._batchers.get(name)
        if current is None or current[0] is not loaded:  # new or reloaded head
            current = (loaded, HeadBatcher(self.client, self._runner(loaded)))
            self._batchers[name] = current
        return await current[1].classify(ids)

    def _feature_model(self, loaded: LoadedHead) -> Any:
        """Engine thread: the model the head's features come from, made once per (depth, precision)."""
        key = (loaded.info.layer, loaded.info.precision)
        if key not in self._copies:
            self._copies[key] = load_feature_model(self.checkpoint_dir, *key)
        return self._copies[key]

    def _runner(self, loaded: LoadedHead) -> Callable[[list[list[int]]], list[list[float]]]:
        def run(ids: list[list[int]]) -> list[list[float]]:  # on the engine thread
            with intra_op_threads(HEAD_THREADS):
                return classify_ids(self._feature_model(loaded), loaded, ids, self.pad_id)

        return run


# The head's forward is small (a few shallow blocks over a few hundred tokens): split over two threads
# it cost 9.3 CPU-ms per text against 0.55 on one (16 Banking77 texts, block 1 in q4, a 2-core CPU at
# load average 6: the second thread spins waiting for a core), and the event loop needs the other core.
HEAD_THREADS = 1
