"""Stage 3: seeded random projections ``R^D -> R^k`` with ``E[<Pa, Pb>] = <a, b>``, applied to factored gradients.

The projection matrix is a function of ``(kind, dim, seed, tracked shapes)`` alone, identical on every
device and run, and never materialised beyond a memory budget:

- ``sparse``: CountSketch, with buckets and signs from a counter-based 64-bit hash (splitmix64) of
  ``(seed, parameter, mode, coordinate)``, computed by the same integer arithmetic on any device. A
  Linear weight's outer-product gradient is sketched as the circular convolution of the CountSketches
  of its two factors (TensorSketch, via FFT): ``O(out + in + k log k)`` per triple, exact in distribution.
- ``gaussian``: i.i.d. ``N(0, 1/k)`` entries, generated on the CPU in chunks of ``CHUNK`` columns by a
  ``torch.Generator`` seeded from ``(seed, parameter, chunk)``, cached up to a memory budget (the first chunks that fit).
- ``none``: the flat gradient itself (exact; for small models and tests).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .errors import InputError, arg
from .forms import GradBlock, TrackedParam, densify
from .registry import PROJECTIONS
from .search import ANN_MIN_ROWS

__all__ = ["ProjectionSpec", "Projector", "make_projector", "hash64"]

CHUNK = 1 << 15  # columns of P generated at once by the gaussian kind (part of its definition)
SMALL_SKETCH = 1024  # up to this many columns, a CountSketch on the CPU is an index_add_
MAX_EXACT_DIM = 1 << 20  # refuse --projection none beyond this many tracked numbers per triple
DEFAULT_MEMORY = 1 << 30  # bytes of cached gaussian chunks

_MASK64 = (1 << 64) - 1


def _s64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _lsr(z, 30)) * _MIX1
    z = (z ^ _lsr(z, 27)) * _MIX2
    return z ^ _lsr(z, 31)


def _key(*parts: int) -> int:
    """A 64-bit key from small non-negative integers (splitmix64 chained on the CPU in Python ints)."""
    z = 0
    for part in parts:
        z = (z + part * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return _s64(z)


def hash64(key: int, coords: torch.Tensor) -> torch.Tensor:
    """splitmix64 of ``coords * golden + key``, as int64 (two's-complement wrap-around)."""
    return _mix(coords.to(torch.int64) * _GOLDEN + key)


DEFAULT_DIM = 1024  # the projected dimension below ANN_MIN_ROWS indexed rows
LARGE_DIM = 2048  # ... and from there, where the build's FAISS codes pick the candidates: their opponents need less noise


def default_dim(rows: int) -> int:
    """The projected dimension of an index of ``rows`` rows when none is asked for."""
    return LARGE_DIM if rows >= ANN_MIN_ROWS else DEFAULT_DIM


@dataclass(frozen=True)
class ProjectionSpec:
    """What defines the projection; written into the store and compared at query time. ``dim`` None: by the
    number of rows indexed (:func:`default_dim`), fixed by :meth:`for_rows` before anything is projected."""

    kind: str = "sparse"
    dim: int | None = None
    seed: int = 0

    def check(self) -> None:
        """Refuse an unknown kind, a dimension outside 1..65536 or a negative seed (one-line errors)."""
        if PROJECTIONS[self.kind]["dim"] and self.dim is not None and not 1 <= self.dim <= 65536:
            raise InputError(f"{arg('dim', self.dim)} is out of range; choose 1..65536 (or auto, the default)")
        if self.seed < 0:
            raise InputError(f"{arg('seed', self.seed)} must be a non-negative integer")

    def for_rows(self, rows: int) -> ProjectionSpec:
        """This projection with an unset ``dim`` fixed for an index of ``rows`` rows."""
        return self if self.dim is not None else replace(self, dim=default_dim(rows))

    @property
    def k(self) -> int:
        """The projected dimension (``dim``, fixed)."""
        if self.dim is None:
            raise ValueError("the projection's dim is not fixed yet; call for_rows(rows) first")
        return self.dim

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.kind == "gaussian":
            out["chunk"] = CHUNK
        if self.kind == "sparse":
            out["hash"] = "splitmix64"
        return out


class Projector:
    """Maps one checkpoint's gradient blocks to ``(B, out_dim) float32``."""

    out_dim: int

    def __call__(self, blocks: list[GradBlock]) -> torch.Tensor:
        raise NotImplementedError


class NoProjection(Projector):
    def __init__(self, spec: ProjectionSpec, params: list[TrackedParam], device: torch.device, memory: int) -> None:
        self.out_dim = sum(p.size for p in params)
        if self.out_dim > MAX_EXACT_DIM:
            raise InputError(
                f"{arg('projection', 'none')} would store {self.out_dim:,} numbers per triple (limit {MAX_EXACT_DIM:,}); "
                f"use {arg('projection', 'sparse')} or track fewer layers"
            )

    def __call__(self, blocks: list[GradBlock]) -> torch.Tensor:
        return densify(blocks)


class SketchProjector(Projector):
    """CountSketch / TensorSketch with counter-based hashes."""

    def __init__(self, spec: ProjectionSpec, params: list[TrackedParam], device: torch.device, memory: int) -> None:
        self.k = self.out_dim = spec.k
        self.seed = spec.seed
        self.params = params
        self.device = device
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def hashes(self, j: int, mode: int, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hash64(_key(self.seed, j, mode), coords)
        bucket = _lsr(h, 1) % self.k
        sign = (h & 1).to(torch.float32) * 2 - 1
        return bucket, sign

    def _fixed(self, j: int, mode: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (j, mode) not in self._cache:
            self._cache[(j, mode)] = self.hashes(j, mode, torch.arange(n, device=self.device))
        return self._cache[(j, mode)]

    def _signed_buckets(self, j: int, mode: int, n: int) -> torch.Tensor:
        """Each coordinate's bin among ``2k``: its bucket, plus ``k`` where its sign is negative."""
        key = (j, mode, -3)
        if key not in self._cache:
            bucket, sign = self._fixed(j, mode, n)
            self._cache[key] = (bucket + self.k * (sign < 0).long(), sign)
        return self._cache[key][0]

    def _matrix(self, j: int, mode: int, n: int) -> torch.Tensor:
        """The sketch as a CSR matrix ``(k, n)``: column ``i`` holds ``sign[i]`` at row ``bucket[i]``, each
        row's columns ascending."""
        key = (j, mode, -2)
        if key not in self._cache:
            bucket, sign = self._fixed(j, mode, n)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                csr = torch.sparse_coo_tensor(torch.stack([bucket, torch.arange(n, device=bucket.device)]), sign,
                                              (self.k, n), check_invariants=True).coalesce().to_sparse_csr()
            self._cache[key] = (csr, sign)
        return self._cache[key][0]

    def countsketch(self, x: torch.Tensor, j: int, mode: int) -> torch.Tensor:
        """``x (..., n) -> (..., k)``, along the last axis whatever the strides.

        On the CPU, wider than ``SMALL_SKETCH`` columns, without a signed copy of ``x`` and with the same
        bytes for any thread count or batch split: rows scattered into ``2k`` bins, a positive and a
        negative one per bucket, then one subtraction; or CSR x dense when ``x``'s rows come
        batch-innermost (a ``batch_last`` encoder's output), which reads them contiguously. Narrower blocks
        (biases, BatchNorm, a Linear's output side) take ``index_add_``.
        """
        n = x.shape[-1]
        if x.device.type == "cpu" and x.dtype == torch.float32 and n > SMALL_SKETCH:
            flat = x.reshape(-1, n)
            if flat.shape[0] > 1 and flat.T.is_contiguous():  # rows batch-innermost (a batch_last encoder's)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                    out = torch.sparse.mm(self._matrix(j, mode, n), flat.T)  # (k, rows)
                return out.T.contiguous().reshape(*x.shape[:-1], self.k)  # the FFT reads rows
            flat = flat.contiguous()
            bins = flat.new_zeros(flat.shape[0], 2 * self.k)
            bins.scatter_add_(1, self._signed_buckets(j, mode, n).expand(flat.shape[0], n), flat)
            return (bins[:, : self.k] - bins[:, self.k :]).reshape(*x.shape[:-1], self.k)
        bucket, sign = self._fixed(j, mode, n)
        out = torch.zeros(*x.shape[:-1], self.k, device=x.device, dtype=x.dtype)
        out.index_add_(x.dim() - 1, bucket, x * sign)
        return out

    def __call__(self, blocks: list[GradBlock]) -> torch.Tensor:
        return _sum([blk.countsketch(self, j) for j, blk in enumerate(blocks)])


class GaussianProjector(Projector):
    """Dense ``N(0, 1/k)`` projection, generated chunk by chunk on the CPU and cached up to ``memory`` bytes."""

    def __init__(self, spec: ProjectionSpec, params: list[TrackedParam], device: torch.device, memory: int) -> None:
        self.k = self.out_dim = spec.k
        self.seed = spec.seed
        self.params = params
        self.device = device
        self.memory = memory
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._cached_bytes = 0

    @staticmethod
    def _rows_cols(p: TrackedParam) -> tuple[int, int]:
        if len(p.shape) <= 1:
            return p.size, 1
        return p.shape[0], p.size // p.shape[0]

    def _rows_per_chunk(self, p: TrackedParam) -> int:
        return max(1, CHUNK // self._rows_cols(p)[1])

    def layout(self, j: int) -> tuple[int, int, int]:
        """Parameter ``j`` as a matrix for P's chunks: ``(rows, cols, rows per chunk)``."""
        p = self.params[j]
        rows, cols = self._rows_cols(p)
        return rows, cols, self._rows_per_chunk(p)

    def chunk(self, j: int, c: int) -> torch.Tensor:
        """Chunk ``c`` of parameter ``j``'s block of P: ``(k, rows_in_chunk * cols) float32`` on the device."""
        key = (j, c)
        if key in self._cache:
            return self._cache[key]
        p = self.params[j]
        rows, cols = self._rows_cols(p)
        n = self._rows_per_chunk(p)
        width = (min(rows, (c + 1) * n) - c * n) * cols
        gen = torch.Generator(device="cpu").manual_seed(_key(self.seed, j, c) & ((1 << 63) - 1))
        block = (torch.randn(self.k, width, generator=gen) / self.k**0.5).to(self.device)
        size = block.numel() * 4
        # Chunks are always visited in the same cyclic order, where LRU evicts each chunk just before
        # its next use (no hit at all once P exceeds the budget). Keeping the first chunks that fit
        # instead hits a budget/total share of them on every batch.
        if self._cached_bytes + size <= self.memory:
            self._cache[key] = block
            self._cached_bytes += size
        return block

    def __call__(self, blocks: list[GradBlock]) -> torch.Tensor:
        return _sum([blk.gaussian(self, j) for j, blk in enumerate(blocks)])


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def make_projector(
    spec: ProjectionSpec, params: list[TrackedParam], device: torch.device, memory: int = DEFAULT_MEMORY
) -> Projector:
    spec.check()
    return PROJECTIONS[spec.kind].load()(spec, params, device, memory)
