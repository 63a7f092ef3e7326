"""Process-wide settings: thread counts for torch and FAISS (and, when asked, the allocator), and the device."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from . import backend
from .errors import InputError, arg

__all__ = ["configure_threads", "faiss_module", "resolve_device"]

_threads: int | None = None  # the count configure_threads set, applied to FAISS when it is imported


def configure_threads(threads: int | None = None, *, tune_allocator: bool = False) -> int:
    """Set torch's and FAISS's thread counts (default: the cores this process may use); with ``tune_allocator``,
    also :func:`tracin_index.backend.tune_allocator` (the command line asks for it; the library never does)."""
    if tune_allocator:
        backend.tune_allocator()
    global _threads
    n = threads or len(os.sched_getaffinity(0))
    if n < 1:
        raise InputError(f"{arg('threads', n)} must be at least 1")
    torch.set_num_threads(n)
    _threads = n
    if "faiss" in sys.modules:
        faiss_module()
    return n


def faiss_module() -> Any:
    """FAISS, imported when a search first needs it, with the thread count :func:`configure_threads` set."""
    import faiss

    if _threads is not None:
        faiss.omp_set_num_threads(_threads)
    return faiss


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` / ``cuda:N``, or None (cuda when available)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{arg('device', device)}: no CUDA device is available here; use {arg('device', 'cpu')}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"{arg('device', device)} is not a device; use cpu or cuda") from None
