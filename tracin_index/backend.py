"""Platform-specific kernels and process-wide tuning, each with a plain fallback, behind one switch.

Everything here that reaches past torch's public API lives in this module:

- :func:`tune_allocator`: glibc ``mallopt`` settings that keep large freed blocks in the heap;
- :func:`conv_relu_prepack` / :func:`conv_relu`: oneDNN's fused convolution + ReLU with the weight
  packed once (``torch.ops.mkldnn``), whose output may come in a channels-last layout;
- :func:`int8_prepack` / :func:`int8_matmul_packed`: oneDNN's u8 x s8 GEMM over codes packed once
  (``torch.ops.onednn``);
- :func:`int_mm`: ``torch._int_mm``, int8 x int8 products with int32 sums.

Each function says how it reports that its kernel is not to be used (None, or :class:`Unavailable`),
and the caller then takes its plain path (``F.conv2d`` + ReLU; :func:`int_mm` falls back by itself).
The plain paths give the same numbers: the integer products are exact either way, and the convolution
differs in float rounding only.

The switch: ``TRACIN_INDEX_BACKEND=plain`` in the environment, or :func:`use` ``("plain")``, turns every
private kernel and the allocator tuning off; ``native`` (the default) uses them where this torch and
platform have them. The library never tunes the allocator by itself: the CLI asks for it
(:func:`configure`, through :func:`tracin_index.runtime.configure_threads`).
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

__all__ = ["MODES", "Unavailable", "configure", "conv_relu", "conv_relu_prepack", "int8_matmul_packed",
           "int8_prepack", "int_mm", "int_mm_plain", "mode", "native", "tune_allocator", "use"]

MODES = ("native", "plain")
ENV = "TRACIN_INDEX_BACKEND"
_mode: str | None = None  # set by use(); None: from the environment


class Unavailable(RuntimeError):
    """The kernel asked for is missing from this torch build or switched off (:func:`use`): take the plain path."""


def use(which: str | None) -> None:
    """Use the private kernels (``native``) or only torch's public ops (``plain``) from now on; None: follow
    ``TRACIN_INDEX_BACKEND`` again. It governs what is packed and run from then on; int8 codes packed before a
    switch to ``plain`` stay packed (their plain copy is gone), and :func:`int8_matmul_packed` serves them."""
    if which is not None and which not in MODES:
        raise ValueError(f"backend {which!r}: choose one of {', '.join(MODES)}")
    global _mode
    _mode = which


def mode() -> str:
    """``native`` or ``plain``: the :func:`use` setting, else ``TRACIN_INDEX_BACKEND`` (default ``native``)."""
    if _mode is not None:
        return _mode
    return "plain" if os.environ.get(ENV, "").strip().lower() == "plain" else "native"


def native() -> bool:
    """Whether private kernels and process tuning may be used."""
    return mode() == "native"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep large freed blocks in the heap for reuse instead of unmapping them (glibc only; once per process).

    glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so each large
    activation (a ConvE batch's feature maps) is page-faulted in again, every batch. Here mmap is off
    (large blocks come from the heap), up to 1 GiB of free heap top is kept, and 64 MiB of padding is
    taken per heap growth (``tests/test_runtime.py`` counts the page faults). The price is resident
    memory that is free but kept. Nothing is done when the backend is ``plain`` (:func:`use`) or
    ``TRACIN_INDEX_MALLOC=system`` is set. Returns whether the allocator is tuned.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    if not native():
        return False  # not remembered: a later switch to native may still tune
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


def configure(*, allocator: bool = True) -> dict[str, bool]:
    """The process-wide tuning a command line or pipeline asks for (``allocator``: :func:`tune_allocator`).
    Returns what is in effect."""
    return {"allocator": tune_allocator() if allocator else bool(_tuned)}


def _mkldnn(x: torch.Tensor) -> bool:
    return native() and x.device.type == "cpu" and torch.backends.mkldnn.is_available()


def conv_relu_prepack(w: torch.Tensor, padding: list[int], stride: list[int], dilation: list[int],
                      input_shape: list[int]) -> torch.Tensor | None:
    """``w`` (one group) reordered for :func:`conv_relu` over inputs of ``input_shape``; None where oneDNN's
    convolution is not available (off the CPU, missing from this torch, or the backend is ``plain``)."""
    if not _mkldnn(w):
        return None
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, 1,
                                                                             list(input_shape))
        return packed
    except (AttributeError, RuntimeError):  # a torch build without this oneDNN op
        return None


def conv_relu(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor, padding: list[int], stride: list[int],
              dilation: list[int]) -> torch.Tensor | None:
    """``relu(conv2d(x, w, b))`` in one oneDNN call with ``packed`` from :func:`conv_relu_prepack`, in the
    memory format oneDNN picks (channels-last or contiguous; same values and shape as ``F.conv2d``'s up to
    float rounding). None where the kernel is not available: the caller runs ``F.conv2d`` and a ReLU."""
    if not _mkldnn(x):
        return None
    try:
        out: torch.Tensor = torch.ops.mkldnn._convolution_pointwise(
            x, packed, b, padding, stride, dilation, 1, "relu", [], "")
        return out
    except (AttributeError, RuntimeError):  # a torch build without this oneDNN op
        return None


def int8_prepack(codes: torch.Tensor) -> torch.Tensor:
    """int8 ``codes (N, W)`` laid out for oneDNN's u8 x s8 GEMM (:func:`int8_matmul_packed`).

    Raises :class:`Unavailable` where that op is missing or the backend is ``plain``: the caller keeps the
    codes and takes its products from :func:`int_mm`."""
    if not native() or codes.device.type != "cpu":
        raise Unavailable("oneDNN's int8 GEMM is switched off or not on this device")
    try:
        packed: torch.Tensor = torch.ops.onednn.qlinear_prepack(codes, [1, int(codes.shape[1])])
        return packed
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        raise Unavailable(f"this torch build has no oneDNN int8 GEMM ({e})") from None


def int8_matmul_packed(q_codes: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor
                       ) -> torch.Tensor:
    """``q_codes (M, W) int8`` x the codes of ``packed`` (``N`` rows, :func:`int8_prepack`): ``(M, N) float32``.

    ``ones`` (``N`` float32 ones) and ``zeros`` (``N`` int64 zeros) are the per-row weight scales and zero
    points, so the result is the integer sums converted to float32 (exact as long as oneDNN accumulates in
    int32: :class:`~tracin_index.int8.Int8Rows` checks that against :func:`int_mm` before using it). The
    queries go in as u8 with zero point 128, the same integers. It serves packed codes whatever the switch
    says now (packing dropped the plain codes); raises :class:`Unavailable` where the op is missing."""
    qx = (q_codes.to(torch.int16) + 128).to(torch.uint8)
    try:
        out: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            qx, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")
        return out
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        raise Unavailable(f"this torch build has no oneDNN int8 GEMM ({e})") from None


_PLAIN_BLOCK = 8192  # columns of b converted to int32 at a time by int_mm_plain


def int_mm_plain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) int8`` x ``b (K, N) int8`` as float32, with torch's public ops only.

    An int32 matmul, a block of ``b``'s columns at a time (the int32 copies are 4x the codes): every sum is
    exact in int32 (as in :func:`int_mm`, for ``K`` under 133,000), then rounded once to float32, so the
    numbers are :func:`int_mm`'s (``tests/test_search.py`` compares them)."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
    a32 = a.to(torch.int32)
    for start in range(0, b.shape[1], _PLAIN_BLOCK):
        out[:, start : start + _PLAIN_BLOCK] = a32 @ b[:, start : start + _PLAIN_BLOCK].to(torch.int32)
    return out


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) int8`` x ``b (K, N) int8``: the exact int32 sums as float32 (``torch._int_mm``), or
    :func:`int_mm_plain`'s same numbers where that op is missing, declines these shapes (or gets ``K = 1``
    wrong), or the backend is ``plain``."""
    if native() and a.shape[1] > 1:  # K = 1: torch._int_mm's oneDNN kernels give wrong sums on AMX CPUs
        try:
            return torch._int_mm(a, b).to(torch.float32)
        except (AttributeError, RuntimeError, NotImplementedError):
            pass
    return int_mm_plain(a, b)
