"""Builds and loads Seedling's native CPU kernels (`model/csrc/seedling_cpu.cpp`) as `torch.ops.seedling`.

The library is compiled once per machine with the system C++ compiler against the installed torch,
and cached under a name that hashes the source, the flags and the torch version, so an upgrade or an
edit rebuilds it and concurrent processes never load a half-written file (it is renamed into place).
`python -m model.native` builds it ahead of time (the Dockerfile does, so the image needs no compiler).

    from model import native
    native.load()                      # raises NativeUnavailable with the reason if it cannot
    torch.ops.seedling.linear(x, q, d, m)
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "seedling_cpu.cpp"
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma", "-mf16c",
         "-fno-math-errno", "-Wall"]


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run here (no AVX2, no compiler, or the build failed)."""


def cache_dir() -> Path:
    if os.environ.get("SEEDLING_NATIVE_DIR"):
        return Path(os.environ["SEEDLING_NATIVE_DIR"])
    home = Path(os.environ.get("SEEDLING_HOME", Path.home() / ".cache" / "seedling"))
    return home / "native"


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode())
    return cache_dir() / f"seedling_cpu-{digest.hexdigest()[:16]}.so"


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used on this machine, or None if they can (without building them)."""
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the native kernels need an x86-64 Linux CPU with AVX2 (this one: " \
               f"{sys.platform}, {torch.backends.cpu.get_cpu_capability()})"
    if not library_path().exists() and not _compiler():
        return "the native kernels are not built and no C++ compiler was found (install g++, or run " \
               "`python -m model.native` where one is)"
    return None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(path: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    path.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        cmd = [_compiler() or "c++", *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(out),
               *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise NativeUnavailable(f"cannot run the C++ compiler {cmd[0]!r}: {e}") from e
        if result.returncode != 0:
            raise NativeUnavailable(f"building {SOURCE.name} failed:\n{result.stderr[-4000:]}")
        os.replace(out, path)  # atomic: another process sees the whole library or none


@functools.cache
def load() -> Path:
    """Make `torch.ops.seedling.*` available (building the library on first use); once per process."""
    reason = unavailable_reason()
    if reason:
        raise NativeUnavailable(reason)
    path = library_path()
    if not path.exists():
        build(path)
    torch.ops.load_library(str(path))
    return path


if __name__ == "__main__":
    print(f"seedling native kernels: {load()}")
