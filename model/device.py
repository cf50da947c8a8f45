"""Where a model runs and in what precision: the one reading of `auto` for the server, the training
jobs and the benchmarks (cuda when present, else cpu; bfloat16 on cuda, float32 on cpu)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class DeviceError(ValueError):
    """A device the caller asked for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda[:N]' must be available; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on cuda (fast, range-safe), float32 on cpu (the exact path); else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DeviceError(f"unknown dtype {name!r}")
    return dtype


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count (what the native kernels' parallel_for uses) set to `n` for the
    block, then restored. For the thread that runs the tensor work (the engine thread): the setting
    is process-wide."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
