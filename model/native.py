"""Builds and loads Seedling's native CPU kernels (`model/csrc/`) as `torch.ops.seedling`.

The library is compiled once per machine with the system C++ compiler against the installed torch,
and cached under a name that hashes the sources, the flags and the torch version, so an upgrade or an
edit rebuilds it and concurrent processes never load a half-written file (it is renamed into place).
`python -m model.native` builds it ahead of time (`make serve`, `make test` and the Dockerfile do, so
the first request never waits for a compiler).

One library holds every kernel variant (AVX-512 VNNI, AVX2 + FMA, plain C++); the ops run the best
one this CPU has (CPUID, at load), or the one SEEDLING_CPU_ISA names (`avx512`, `avx2`, `generic`: to
measure or test a slower variant, or to simulate a CPU without AVX2).

    from model import native
    native.load()                      # raises NativeUnavailable with the reason if it cannot
    torch.ops.seedling.linear(x, q, d, m, native.isa())
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

CSRC = Path(__file__).parent / "csrc"
# the translation units; each x86 variant is selected by `#pragma GCC target` inside them, so the
# flags stay at the baseline and the library loads on any CPU of the architecture
SOURCES = [CSRC / "seedling_cpu.cpp", CSRC / "kernels_x86.cpp", CSRC / "kernels_generic.cpp"]
HEADERS = [CSRC / "seedling_cpu.h", CSRC / "kernels_x86.inc"]
FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-fno-math-errno", "-Wall"]
ISA_ENV = "SEEDLING_CPU_ISA"


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run here (no AVX2, no compiler, or the build failed)."""


def cache_dir() -> Path:
    if os.environ.get("SEEDLING_NATIVE_DIR"):
        return Path(os.environ["SEEDLING_NATIVE_DIR"])
    home = Path(os.environ.get("SEEDLING_HOME", Path.home() / ".cache" / "seedling"))
    return home / "native"


def library_path() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(FLAGS).encode()
                            + torch.__version__.encode())
    return cache_dir() / f"seedling_cpu-{digest.hexdigest()[:16]}.so"


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used on this machine, or None if they can (without building them)."""
    if sys.platform != "linux":
        return f"the native kernels are built for Linux (this is {sys.platform})"
    if not library_path().exists() and not _compiler():
        return "the native kernels are not built and no C++ compiler was found (install g++, or run " \
               "`python -m model.native` where one is)"
    return None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(path: Path) -> None:
    """Compile SOURCES side by side (one compiler per file, ~1 min in all on 2 cores), then link."""
    from torch.utils.cpp_extension import include_paths, library_paths

    path.parent.mkdir(parents=True, exist_ok=True)
    compile_flags = [*FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                     *(f"-I{p}" for p in include_paths())]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        _run_all([[_compiler() or "c++", *compile_flags, "-c", str(src), "-o", str(obj)]
                  for src, obj in zip(SOURCES, objects, strict=True)], [src.name for src in SOURCES])
        out = Path(tmp) / path.name
        _run_all([[_compiler() or "c++", "-shared", "-fopenmp", *map(str, objects), "-o", str(out),
                   *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]], [path.name])
        os.replace(out, path)  # atomic: another process sees the whole library or none


def _run_all(commands: list[list[str]], names: list[str]) -> None:
    """Run the commands concurrently; NativeUnavailable names the first that failed, with its errors."""
    try:
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for cmd in commands]
    except OSError as e:
        raise NativeUnavailable(f"cannot run the C++ compiler {commands[0][0]!r}: {e}") from e
    errors = [proc.communicate()[1] for proc in procs]
    for name, proc, err in zip(names, procs, errors, strict=True):
        if proc.returncode != 0:
            raise NativeUnavailable(f"building {name} failed:\n{err[-4000:]}")


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


def isa() -> str:
    """The kernel variant the ops run: SEEDLING_CPU_ISA if set (it must be one this CPU has), else the
    best one (CPUID). Loads the library first."""
    load()
    supported = list(torch.ops.seedling.cpu_isas())
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if wanted in ("", "auto"):
        return supported[0]
    if wanted not in supported:
        raise NativeUnavailable(f"{ISA_ENV}={wanted!r} is not a kernel variant this CPU runs "
                                f"(it runs: {', '.join(supported)})")
    return wanted


if __name__ == "__main__":
    print(f"seedling native kernels: {load()} (variants this CPU runs: "
          f"{', '.join(torch.ops.seedling.cpu_isas())}; selected: {isa()})")
