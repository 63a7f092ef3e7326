"""Process-wide settings in one place: thread counts for torch and FAISS, the allocator, and the device."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from .errors import InputError

__all__ = ["configure_threads", "resolve_device", "tune_allocator"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep large freed blocks in the heap for reuse instead of unmapping them (glibc only; once per process).

    glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so each large
    activation (ConvE's 2048 x 32 x 18 x 18 feature maps are 85 MB) is page-faulted in again, every batch:
    measured on 2 cores, conv + BatchNorm + ReLU over 2048 rows took 136 ms that way and 31 ms with the
    heap kept, and a 20k-triple build went from 3,376 to 6,130 triples/s (``benchmarks/RESULTS.md``).
    Here mmap is off (large blocks come from the heap), up to 1 GiB of free heap top is kept, and
    64 MiB of padding is taken per heap growth (``tests/test_runtime.py`` counts the page faults). The
    price is resident memory that is free but kept: the same build's peak RSS went from 889 to 1,062 MB.
    Set ``TRACIN_INDEX_MALLOC=system`` to leave the allocator alone. Returns whether it was tuned.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("TRACIN_INDEX_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt ignores these parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 30) and mallopt(_M_TOP_PAD, 64 << 20)
    _tuned = bool(ok)
    return _tuned



def configure_threads(threads: int | None = None) -> int:
    """Set torch's and FAISS's thread counts (default: the cores this process may use); tune the allocator."""
    tune_allocator()
    n = threads or len(os.sched_getaffinity(0))
    if n < 1:
        raise InputError(f"--threads {n} must be at least 1")
    torch.set_num_threads(n)
    import faiss

    faiss.omp_set_num_threads(n)
    return n


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` / ``cuda:N``, or None (cuda when available)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device; use cpu or cuda") from None
