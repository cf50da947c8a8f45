"""Crash-safe publishing of a directory: immutable versions behind a symlink that moves atomically.

    link = Path("runs/x/checkpoint")                   # what readers open; a symlink
    staged = stage(link)                               # a locked temp dir in runs/x/checkpoint.versions/
    ...write files into staged.path...
    version = commit(staged, "step_00000100")          # fsync, rename: now a complete, immutable version
    publish(link, version)                             # one rename(2) swaps the symlink onto it
    release(staged); prune(link, keep=1)

Why: writing a directory in place, or swapping directories with two renames, leaves moments where a
reader (a server starting, a resumed job) finds half a checkpoint or none. Here a version is written
whole under a temp name, renamed once, never modified again, and published by replacing a symlink,
which POSIX makes atomic: at every instant `link` resolves to a complete version, the old or the new.

A kill -9 can leave three kinds of debris; `recover(link)` (run by every load) resolves them:
- a temp dir (`.tmp-*`) with no live writer: deleted (the previous version stays published);
- a committed version that was never announced: left for `prune` (rolled back);
- a publish intent (`.<name>.link-*`, a temp symlink made just before the swap): the swap is finished
  (rolled forward), so a checkpoint that was completely written and meant to be published is.
A live writer holds an exclusive flock on its version dir until it has published, and a reader holds a
shared one while loading, so recovery and pruning never touch a directory someone is using. All
recovery is best effort: on a read-only mount it changes nothing and still returns what to load.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

STALE_AFTER_S = 10.0  # a temp dir younger than this may belong to a writer that has not locked it yet
READ_LOCK_WAIT_S = 30.0  # how long a load waits for a writer still holding the version it just published


@dataclass
class Staged:
    """A version being written: `path` (the temp dir, then the committed version) and the fd whose
    exclusive flock tells recovery and pruning that a live writer owns it."""
    path: Path
    fd: int
    committed: bool = False


def versions_dir(link: Path) -> Path:
    return link.parent / f"{link.name}.versions"


def absolute(path: str | Path) -> Path:
    """`path` made absolute without following a symlink at its last component (that is the link)."""
    p = Path(path)
    return p.parent.resolve() / p.name


def version_name() -> str:
    return "v" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


# ---------------------------------------------------------------------------- writing
def stage(link: Path) -> Staged:
    """A fresh temp dir in `link`'s versions dir, exclusively locked by this process."""
    root = versions_dir(link)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary readable directory
    fd = os.open(tmp, os.O_RDONLY)
    with contextlib.suppress(OSError):  # a filesystem without flock: no protection from a concurrent prune
        fcntl.flock(fd, fcntl.LOCK_EX)
    return Staged(tmp, fd)


def commit(staged: Staged, name: str) -> Path:
    """Flush the staged files and rename the temp dir to `name` (`name-2`, ... if taken); from here on
    it is a complete version that nothing modifies."""
    for f in staged.path.iterdir():
        os.chmod(f, 0o644)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.fsync(staged.fd)
    for k in range(1, 1000):
        target = staged.path.parent / (name if k == 1 else f"{name}-{k}")
        try:
            os.rename(staged.path, target)  # fails on an existing non-empty dir: versions are never clobbered
        except OSError:
            if not target.exists():
                raise
            continue
        _fsync_dir(target.parent)
        staged.path, staged.committed = target, True
        return target
    raise FileExistsError(f"no free version name for {name} in {staged.path.parent}")


def publish(link: Path, version: Path) -> None:
    """Point `link` at `version` with one atomic rename. The temp symlink made first is the intent
    record that lets `recover` finish this swap after a kill. A real directory at `link` (a checkpoint
    from before versioning) is first moved into the versions dir, so it is kept, not deleted."""
    intent = link.parent / f".{link.name}.link-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(os.path.relpath(version, link.parent), intent)
    _fsync_dir(link.parent)
    _swap(intent, link)


def _swap(intent: Path, link: Path) -> None:
    if link.is_dir() and not link.is_symlink():
        os.rename(link, versions_dir(link) / f"legacy-{version_name()}")
    os.replace(intent, link)
    _fsync_dir(link.parent)


def release(staged: Staged) -> None:
    """Drop the writer's lock; a temp dir that never got committed is removed."""
    if not staged.committed:
        shutil.rmtree(staged.path, ignore_errors=True)
    os.close(staged.fd)


def prune(link: Path, keep: int) -> None:
    """Delete old versions: all but the published one and the `keep` newest others (readers that
    resolved the link a moment ago may still be reading the previous one). Locked ones are skipped."""
    current = _target(link)
    pending = {_target(p) for p in _intents(link)}
    others = [v for v in _versions(link) if v != current and v not in pending]
    for version in others[:max(len(others) - keep, 0)]:
        _remove_if_unused(version)


# ---------------------------------------------------------------------------- reading and recovery
def recover(link: str | Path) -> Path | None:
    """Resolve what a killed writer left at `link`; returns the directory to load, or None if there is
    no version at all. Best effort: a failure to clean up never stops a load."""
    link = absolute(link)
    with contextlib.suppress(OSError):
        _clean(link)
    if link.is_dir():
        return link
    versions = _versions(link)
    if not versions:
        return None
    with contextlib.suppress(OSError):  # link missing or dangling: fall back to the newest version
        publish(link, versions[-1])
        return link
    return versions[-1]


@contextlib.contextmanager
def reading(path: Path) -> Iterator[Path]:
    """The real directory behind `path`, share-locked while the caller reads it, so that a concurrent
    prune does not delete it mid-read."""
    real = path.resolve()
    try:
        fd = os.open(real, os.O_RDONLY)
    except OSError:
        yield real  # let the caller report the missing file
        return
    try:
        _share_lock(fd, timeout_s=READ_LOCK_WAIT_S)
        yield real
    finally:
        os.close(fd)


def _share_lock(fd: int, timeout_s: float) -> None:
    """A shared flock, waiting at most `timeout_s` for a writer that is just publishing this version;
    past that (a writer stopped while holding it) the read goes ahead without one rather than hang."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        except OSError:  # no flock on this filesystem
            return


# ---------------------------------------------------------------------------- helpers
def _clean(link: Path) -> None:
    """Finish announced swaps, delete abandoned temp dirs, and undo the pre-versioning writer's half swap."""
    for intent in sorted(_intents(link), key=lambda p: p.lstat().st_mtime_ns):
        target = _target(intent)
        current = _target(link)
        if target is None or not target.is_dir() or (current is not None and current.is_dir() and _newer(current, target)):
            intent.unlink()  # points at nothing, or at something older than what is published since
        elif _unused(target):
            _swap(intent, link)  # the writer died between announcing and swapping: finish it
    stale = [*versions_dir(link).glob(".tmp-*"), *link.parent.glob(f".{link.name}.tmp-*")]
    for tmp in stale:  # the second pattern: temp dirs of the writer before versioning
        if time.time() - tmp.stat().st_mtime > STALE_AFTER_S:
            _remove_if_unused(tmp)
    for old in link.parent.glob(f".{link.name}.old-*"):  # that writer moved the old one here first
        if not link.exists() and not link.is_symlink() and (old / "ckpt").is_dir():
            os.rename(old / "ckpt", link)  # killed between its two renames: put the old one back
        shutil.rmtree(old, ignore_errors=True)


def _versions(link: Path) -> list[Path]:
    """Complete versions, oldest first (committed ones never start with a dot)."""
    root = versions_dir(link)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _newer(a: Path, b: Path) -> bool:
    return (a.stat().st_mtime_ns, a.name) >= (b.stat().st_mtime_ns, b.name)


def _intents(link: Path) -> list[Path]:
    return [p for p in link.parent.glob(f".{link.name}.link-*") if p.is_symlink()]


def _target(link: Path) -> Path | None:
    if not link.is_symlink():
        return None
    return (link.parent / os.readlink(link)).resolve()


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Yields whether `path` could be locked exclusively (no live writer or reader holds it); the lock
    is held until the block ends."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _unused(path: Path) -> bool:
    with _exclusive(path) as free:
        return free


def _remove_if_unused(path: Path) -> None:
    with contextlib.suppress(OSError), _exclusive(path) as free:
        if free:
            shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write one file crash-safely: a temp file beside it, fsync, then rename(2) over `path`, so a
    reader sees the old bytes or the new ones, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
