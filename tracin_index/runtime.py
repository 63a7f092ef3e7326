"""Process-wide settings: thread counts for torch and FAISS (and, when asked, the allocator), and the device."""

from __future__ import annotations

import os

import torch

from . import backend
from .errors import InputError

__all__ = ["configure_threads", "resolve_device"]


def configure_threads(threads: int | None = None, *, tune_allocator: bool = False) -> int:
    """Set torch's and FAISS's thread counts (default: the cores this process may use); with ``tune_allocator``,
    also :func:`tracin_index.backend.tune_allocator` (the command line asks for it; the library never does)."""
    if tune_allocator:
        backend.tune_allocator()
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
