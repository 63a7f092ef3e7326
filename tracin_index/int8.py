"""int8 codes of the stored rows and the two-stage search over them for a few queries.

:func:`quantize_rows` rounds each row to int8 codes with its own scale; :class:`Int8Rows` holds the codes
and gives their exact integer products with quantised queries (through :mod:`tracin_index.backend`'s
int8 GEMMs); :func:`prefilter_scan` ranks the rows by those products, then rescores the kept candidates
from the float32 rows. :mod:`tracin_index.search` uses it for ad-hoc queries on the CPU.
"""

from __future__ import annotations

import atexit
import functools
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import backend

if TYPE_CHECKING:
    from .search import Mask

__all__ = ["INT8_MAX_WIDTH", "PACK_MIN_ROWS", "PREFILTER_FACTOR", "PREFILTER_MIN_ROWS", "PREFILTER_QUERIES", "Int8Rows",
           "fast_int8", "prefilter_scan", "quantize_rows"]

PREFILTER_QUERIES = 16  # at most this many queries take the int8 prefilter (bound by the table's bytes up to here)
PREFILTER_FACTOR = 2  # the int8 stage keeps 2x the asked candidates of each end for the float32 refine
PREFILTER_MIN_ROWS = 16  # rows per kept candidate below which the full scan costs about the same
INT8_MAX_WIDTH = (2**31 - 1) // (127 * 127)  # int32 products of int8 codes cannot overflow up to this width
PACK_MIN_ROWS = 100_000  # rows from which open_index lays the int8 codes out for oneDNN (the faster GEMM per query)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes ``(N, W)`` and scales ``(N,) float32``: ``rows ~ codes * scale[:, None]``."""
    x = rows.to(torch.float32)
    scale = x.abs().amax(1) / 127
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return torch.round(x * inv[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _stop_packing() -> None:
    for rows in list(_PACKING):
        rows.stop()


_PACKING: weakref.WeakSet[Int8Rows] = weakref.WeakSet()  # background packs still alive
atexit.register(_stop_packing)


def fast_int8() -> bool:
    """Whether oneDNN's int8 GEMM serves packed codes here with exact sums (:meth:`Int8Rows.pack` succeeds): what
    makes the prefilter pay. Without it (CPUs without AVX-512 VNNI, or the ``plain`` backend) the products come
    from ``int_mm``, which costs more than the float32 scan it would spare."""
    return _fast_int8(backend.mode())


@functools.cache
def _fast_int8(mode: str) -> bool:
    rows = Int8Rows.of(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))
    rows.pack(background=False)
    return rows.packed


class Int8Rows:
    """int8 codes of the rows (:func:`quantize_rows`) and their exact integer products with a few queries.

    Products come from :func:`~tracin_index.backend.int_mm` until :meth:`pack` has laid the codes out for
    oneDNN's u8 x s8 GEMM (:func:`~tracin_index.backend.int8_matmul_packed`, faster per query; the layout
    takes a while, so ``open_index`` runs it on a background thread). Both give the exact int32 sums
    converted to float32, so which one answers never changes a result (checked when packing). With the
    backend ``plain`` (:func:`tracin_index.backend.use`) nothing is packed.
    """

    BLOCK = 65536  # rows per packed block

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.codes: torch.Tensor | None = codes  # dropped once packed (the packed copy holds the same numbers)
        self.scale = scale
        self.shape = (int(codes.shape[0]), int(codes.shape[1]))
        self._packed: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def empty(cls, n: int, width: int) -> Int8Rows:
        """Codes to be filled block by block (:meth:`fill`)."""
        return cls(torch.empty((n, width), dtype=torch.int8), torch.empty(n))

    @classmethod
    def of(cls, rows: torch.Tensor, block: int = 32768) -> Int8Rows:
        out = cls.empty(*rows.shape)
        for start in range(0, rows.shape[0], block):
            out.fill(start, rows[start : start + block])
        return out

    def fill(self, start: int, rows: torch.Tensor) -> None:
        """Quantise ``rows`` into the codes from row ``start`` (before :meth:`pack`)."""
        assert self.codes is not None, "the codes are packed"
        self.codes[start : start + len(rows)], self.scale[start : start + len(rows)] = quantize_rows(rows)

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def pack(self, background: bool = True) -> None:
        """Lay the codes out for oneDNN (where this torch has the op; else products stay on ``int_mm``)."""
        if background:
            _PACKING.add(self)  # stopped at interpreter exit: a thread inside oneDNN then would abort the process
            self._thread = threading.Thread(target=self._pack, name="tracin-index-int8-pack", daemon=True)
            self._thread.start()
        else:
            self._pack()

    def stop(self) -> None:
        """Stop a background :meth:`pack` at its next block (products stay on ``int_mm``) and wait for it."""
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        """Until a background :meth:`pack` is done."""
        if self._thread is not None:
            self._thread.join()

    def _pack(self) -> None:
        n, width = self.shape
        codes = self.codes
        assert codes is not None
        try:
            packed = []
            for start in range(0, n, self.BLOCK):
                if self._stop.is_set():
                    return
                part = codes[start : start + self.BLOCK]
                rows = part.shape[0]
                packed.append((start, backend.int8_prepack(part), torch.ones(rows), torch.zeros(rows, dtype=torch.long)))
            probe = torch.randint(-127, 128, (2, width), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
            if not torch.equal(self._packed_sums(probe, packed[:1])[:, : packed[0][2].shape[0]],
                               backend.int_mm(probe, codes[: self.BLOCK].T)):
                return  # not the exact integer sums here: stay on int_mm
        except backend.Unavailable:  # no oneDNN int8 GEMM here, or the backend is plain
            return
        self._packed = packed  # first: sums() reads the codes before the packed blocks
        self.codes = None

    def _packed_sums(self, q_codes: torch.Tensor, packed: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
                     ) -> torch.Tensor:
        out = torch.empty(q_codes.shape[0], self.shape[0])
        for start, blk, ones, zeros in packed:
            out[:, start : start + ones.shape[0]] = backend.int8_matmul_packed(q_codes, blk, ones, zeros)
        return out

    def sums(self, q_codes: torch.Tensor) -> torch.Tensor:
        """Exact ``q_codes (M, W) int8`` x codes products ``(M, N)`` as float32."""
        codes = self.codes  # before the packed blocks: a background pack sets those first, then drops the codes
        packed = self._packed
        if packed is not None:
            return self._packed_sums(q_codes, packed)
        assert codes is not None
        return backend.int_mm(q_codes, codes.T)

    def products(self, q: torch.Tensor) -> torch.Tensor:
        """Estimates ``(M, N) float32`` of the rows' products with float32 queries ``q (M, W)``."""
        q_codes, q_scale = quantize_rows(q)
        approx = self.sums(q_codes)
        approx *= self.scale[None, :]
        approx *= q_scale[:, None]
        return approx


def prefilter_scan(
    rows: torch.Tensor,
    int8: Int8Rows,
    queries: np.ndarray,
    n_top: int,
    n_bottom: int,
    checkpoints: int,
    *,
    row_scale: np.ndarray | None = None,
    mask: Mask | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-stage :func:`~tracin_index.search.scan` for a few queries: int8 products (``int8``, the codes of ``rows``), then the
    float32 rows of its ``PREFILTER_FACTOR`` x more candidates per end.

    A few queries read the whole table once, so their scan is bound by its bytes, and int8 codes are a
    quarter of the float32 rows' (:class:`Int8Rows`: exact int32 sums). The int8 products are estimates
    of the float32 ones (both sides rounded to 8 bits); the refine recomputes the kept candidates'
    products from the float32 rows, so the returned scores are whole-row float32 products as
    :func:`~tracin_index.search.scan` gives them (up to summation order), and what can differ is a row of
    the full top-K that the int8 stage ranked below its ``PREFILTER_FACTOR`` x cut. ``row_scale`` needs one
    checkpoint (one weight per row).
    """
    assert row_scale is None or checkpoints == 1, "a per-checkpoint row scale needs the full scan"
    n = rows.shape[0]
    nt, nb = min(n, n_top * PREFILTER_FACTOR), min(n, n_bottom * PREFILTER_FACTOR)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    approx = int8.products(q)  # (M, N)
    if row_scale is not None:
        approx *= torch.from_numpy(np.ascontiguousarray(row_scale[:, 0], dtype=np.float32))[None, :]
    allowed = mask(0, n) if mask is not None else None
    scale = None if row_scale is None else torch.from_numpy(np.ascontiguousarray(row_scale, dtype=np.float32))
    out: list[np.ndarray] = []
    for kept, want, sign in ((nt, n_top, 1.0), (nb, n_bottom, -1.0)):
        s = approx * sign
        if allowed is not None:
            s.masked_fill_(~(allowed.T if allowed.dim() == 2 else allowed[None, :]), -torch.inf)
        pick = torch.topk(s, kept, dim=1)
        idx = pick.indices.masked_fill(~torch.isfinite(pick.values), -1)  # a masked row is a missing place
        del s
        cand = rows[idx.clamp(min=0)].to(torch.float32)  # (M, kept, W): the candidates' float32 rows
        prods = torch.bmm(cand, q[:, :, None])[:, :, 0]  # the same products scan() takes, row by row
        if scale is not None:
            prods = prods * scale[idx.clamp(min=0), 0]
        scores = (prods * sign).masked_fill(idx < 0, -torch.inf)
        best = torch.topk(scores, min(want, kept), dim=1)
        best_ids = torch.gather(idx, 1, best.indices)
        best_ids[~torch.isfinite(best.values)] = -1
        out += [(best.values * sign).numpy().astype(np.float32), best_ids.numpy().astype(np.int64)]
    return out[0], out[1], out[2], out[3]
