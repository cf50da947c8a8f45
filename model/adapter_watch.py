"""AdapterWatcher: keeps the adapters a server runs in step with an adapters directory, without a restart.

    watcher = AdapterWatcher(adapters_dir, build=lambda path: adapt_for_serving(served, path),
                             publish=..., retire=...)
    watcher.scan()      # once at start: every complete adapter now, broken ones logged
    watcher.start()     # then a background thread polls every `interval_s`

One subdirectory per adapter, served under the directory's name; a subdirectory counts once it holds
adapter_config.json and adapter_model.safetensors (training.adapt writes a hidden `.<name>.tmp` and
renames it into place, so a visible directory is complete; hidden ones are skipped). A directory
that holds only a classification head (head.json) is not a LoRA adapter and is left to model.head.
Building (read, check, merge, repack: seconds) runs on the watcher's thread, never the engine's;
`publish(name, model)` hands the result over (the server runs it on the engine thread between steps).
A new or changed adapter is built again; a broken one (bad shapes, another base, a corrupt file) is
logged once per version and not served, while everything else keeps serving — an older good version
of the same name included. A directory gone for two polls in a row is retired (training.adapt's
swap leaves the name missing for an instant).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.adapters import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)
Fingerprint = tuple[int, ...]


def lora_dirs(directory: str | Path) -> dict[str, Path]:
    """name -> path of every visible subdirectory that holds a LoRA adapter's two peft files."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
            and (p / WEIGHTS_FILE).is_file()}


def fingerprint(path: Path) -> Fingerprint:
    """Changes whenever the adapter's files are rewritten (or the directory is swapped for a new one)."""
    stats = [(path / name).stat() for name in (CONFIG_FILE, WEIGHTS_FILE)]
    return tuple(v for s in stats for v in (s.st_ino, s.st_mtime_ns, s.st_size))


class AdapterWatcher:
    def __init__(self, directory: str | Path, build: Callable[[Path], Any],
                 publish: Callable[[str, Any], None], retire: Callable[[str], None],
                 interval_s: float = 2.0, reserved: frozenset[str] = frozenset()) -> None:
        self.directory = Path(directory)
        self.build, self.publish, self.retire = build, publish, retire
        self.interval_s = interval_s
        self.reserved = reserved  # names an adapter may not take (the base model's)
        self.errors: dict[str, str] = {}  # name -> why its newest version is not served
        self._seen: dict[str, Fingerprint] = {}  # name -> version last tried (served or refused)
        self._served: set[str] = set()
        self._missing: set[str] = set()  # served names absent at the last poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan(self) -> list[str]:
        """One poll: build and publish what is new or changed, retire what is gone. Returns the names
        published by this poll."""
        found = lora_dirs(self.directory)
        published = []
        for name, path in found.items():
            try:
                version = fingerprint(path)
            except OSError:  # swapped away between listing and stat: next poll
                continue
            if self._seen.get(name) == version:
                continue
            self._seen[name] = version
            if self._load(name, path):
                published.append(name)
        for name in sorted(self._served - set(found)):
            if name in self._missing:
                self._missing.discard(name)
                self._served.discard(name)
                self._seen.pop(name, None)
                self.retire(name)
                log.info("adapter %s: directory gone, no longer served", name)
            else:
                self._missing.add(name)
        self._missing &= self._served - set(found)
        for name in set(self._seen) - set(found) - self._served:
            del self._seen[name]
            self.errors.pop(name, None)
        return published

    def _load(self, name: str, path: Path) -> bool:
        if name in self.reserved:
            self._refuse(name, f"{path}: the name {name!r} is the base model's; rename the directory")
            return False
        try:
            model = self.build(path)
            self.publish(name, model)
        except Exception as exc:  # noqa: BLE001 - a broken adapter must not stop the others
            self._refuse(name, f"{exc}" if name in str(exc) else f"{path}: {exc}")
            return False
        self.errors.pop(name, None)
        self._served.add(name)
        log.info("adapter %s: loaded from %s", name, path)
        return True

    def _refuse(self, name: str, why: str) -> None:
        self.errors[name] = why
        kept = " (the version loaded before keeps serving)" if name in self._served else ""
        log.error("adapter %s refused%s: %s", name, kept, why)

    # ------------------------------------------------------------------ background polling
    def start(self) -> AdapterWatcher:
        self._thread = threading.Thread(target=self._run, name="seedling-adapters", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - keep watching; the next poll may succeed
                log.exception("adapter directory scan failed")
