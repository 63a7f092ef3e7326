"""Stage 5: inner-product search over the stored rows.

Engines over the same rows:

- a blocked scan (torch matmul + top-k per block, merged), the default: :func:`scan`. One product per
  block serves both ends (proponents from the top, opponents from the bottom), and it takes per-row
  weights (the cosine mode) and per-query masks (candidate filters applied before the top-K cut).
  Memory is ``block_rows x query_chunk`` scores at a time, never ``N x M``. On the CPU a few queries
  (an ad-hoc query) first go through an int8 copy of the rows, then the float32 rows of the kept
  candidates (:mod:`tracin_index.int8`): fewer bytes read per query;
- FAISS ``IndexFlatIP`` (``search="faiss"``; faiss-gpu's index on a GPU when it is installed): :func:`search`.
  It searches ``q`` and ``-q`` together (:func:`both_ends`), and its top-k over hundreds of candidates is slower
  than the scan's;
- the same scan streamed from the store, block by block (:class:`StreamSearcher`), for stores larger
  than memory: exact, one read of the store per search (batch the queries: bulk scoring does).

:func:`make_searcher` picks the backend: the scan over rows held in memory (float32 and int8 codes on
the CPU, float16 on a GPU, products in float32), FAISS's GPU index when faiss-gpu and a GPU are
there. When the rows would not fit (in ``memory`` bytes if given, else half the available RAM),
``auto`` streams from the store. ``full`` is the scan without the int8 prefilter: every query reads
every float32 row; ``auto`` takes it too where int8 products are not cheaper than float32 ones (no oneDNN
int8 GEMM here: :func:`~tracin_index.int8.fast_int8`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InputError, arg
from .int8 import (
    INT8_MAX_WIDTH,
    PACK_MIN_ROWS,
    PREFILTER_FACTOR,
    PREFILTER_MIN_ROWS,
    PREFILTER_QUERIES,
    Int8Rows,
    fast_int8,
    prefilter_scan,
    quantize_rows,
)
from .registry import SEARCHES
from .runtime import faiss_module
from .store import Store

if TYPE_CHECKING:
    import faiss

# Int8Rows, PREFILTER_QUERIES, prefilter_scan and quantize_rows live in .int8, re-exported here
__all__ = ["BACKENDS", "PREFILTER_QUERIES", "FaissSearcher", "Int8Rows", "Searcher", "StreamSearcher", "TorchSearcher",
           "available_memory", "build_flat_index", "flat_rows", "load_rows", "make_searcher", "prefilter_scan",
           "quantize_rows", "scan", "scan_blocks", "search"]

Mask = Callable[[int, int], torch.Tensor | None]
BACKENDS = SEARCHES.names
ANN_MIN_ROWS = 1_000_000  # from here ``auto`` searches the build's FAISS index, when it has one
STREAM_MEMORY = 256 * 2**20  # bytes of rows and scores a streamed scan holds unless told
SCORE_COPIES = 3  # float32 copies of a block's scores alive at once in scan_blocks (scores, signed, masked)


def build_flat_index(store: Store) -> faiss.Index:
    """An exact inner-product index over the store's rows, added block by block."""
    index = faiss_module().IndexFlatIP(int(store.attrs["width"]))
    for _, rows in store.iter_rows():
        index.add(np.ascontiguousarray(rows))
    return index


def flat_rows(index: faiss.Index) -> np.ndarray:
    """The ``(N, W) float32`` rows held by a CPU ``IndexFlat``, as a view (no copy)."""
    n, d = int(index.ntotal), int(index.d)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    faiss = faiss_module()
    flat: Any = faiss.downcast_index(index)
    rows: np.ndarray = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    return rows


def search(index: faiss.Index, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` rows by inner product: ``(M, n) float32`` scores and ``(M, n) int64`` row ids (-1 = none)."""
    n = max(1, min(n, index.ntotal))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    return scores, ids.astype(np.int64)


def both_ends(index: faiss.Index, q: np.ndarray, n_top: int, n_bottom: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A FAISS index's top ``n_top`` of ``<q, x>`` and bottom ``n_bottom`` (the top of ``<-q, x>``, searched
    for as such): scores and row ids of each end, as :meth:`Searcher.search` returns them.

    Both ends are one search of ``q`` and ``-q`` together: FAISS then reads the codes once for both."""
    m = len(q)
    scores, ids = search(index, np.concatenate([q, -q]), max(n_top, n_bottom))
    n_top, n_bottom = min(n_top, scores.shape[1]), min(n_bottom, scores.shape[1])
    return scores[:m, :n_top], ids[:m, :n_top], -scores[m:, :n_bottom], ids[m:, :n_bottom]


def scan(
    rows: np.ndarray | torch.Tensor,
    queries: np.ndarray,
    n_top: int,
    n_bottom: int,
    *,
    row_scale: np.ndarray | None = None,
    mask: Mask | None = None,
    block_rows: int | None = None,
    query_chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Largest ``n_top`` and smallest ``n_bottom`` scores per query over ``rows (N, W)``.

    ``rows`` is a float32 array or a torch tensor on any device (float16 or float32; products are
    float32, on that device). The score of row ``i`` for query ``m`` is ``<rows[i] * w_i, queries[m]>``
    where ``w_i`` repeats ``row_scale[i, c]`` over checkpoint ``c``'s ``W / C`` columns
    (``row_scale (N, C)``; None = 1). ``mask(start, stop)`` returns which rows of a block may be
    returned: ``(b,)`` for all queries or ``(b, M)`` per query (None = all); masked rows never take a
    place in either list.

    Returns ``(top_scores (M, n_top) float32, top_ids (M, n_top) int64, bottom_scores, bottom_ids)``,
    best first; missing places (fewer allowed rows than asked) have id -1.

    ``block_rows`` (default: ``2**23 / M`` rows, at least 32768) bounds the scores held at once; a few
    queries scan the table as one block, so the top-K of each end is cut once, not merged per block.
    """
    table = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)
    n = table.shape[0]
    if block_rows is None:
        block_rows = max(32768, (1 << 23) // max(1, min(len(queries), query_chunk)))

    def one_chunk(q: np.ndarray, chunk_mask: Mask | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        blocks = ((start, table[start : min(n, start + block_rows)]) for start in range(0, n, block_rows))
        return scan_blocks(blocks, n, q, n_top, n_bottom, row_scale=row_scale, mask=chunk_mask, device=table.device)

    # bounded scores (block_rows x query_chunk); rows in memory are cheap to re-read per chunk
    return _in_query_chunks(queries, query_chunk, mask, one_chunk)


def _in_query_chunks(
    queries: np.ndarray, chunk: int, mask: Mask | None,
    search: Callable[[np.ndarray, Mask | None], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``search(queries, mask)`` over consecutive chunks of at most ``chunk`` queries, results joined.

    A per-query mask (``(b, M)``) is cut to each chunk's columns.
    """
    if len(queries) <= chunk:
        return search(queries, mask)

    def cut(lo: int, hi: int) -> Mask | None:
        if mask is None:
            return None

        def part(start: int, stop: int) -> torch.Tensor | None:
            out = mask(start, stop)
            return out[:, lo:hi] if out is not None and out.dim() == 2 else out
        return part

    parts = [search(queries[lo : lo + chunk], cut(lo, lo + chunk)) for lo in range(0, len(queries), chunk)]
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(4))  # type: ignore[return-value]


def scan_blocks(
    blocks: Iterable[tuple[int, np.ndarray | torch.Tensor]],
    n: int,
    queries: np.ndarray,
    n_top: int,
    n_bottom: int,
    *,
    row_scale: np.ndarray | None = None,
    mask: Mask | None = None,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`scan` over ``(start, rows)`` blocks of ``n`` rows in all, merging each block's top-K.

    Only one block is held at a time, so the rows may come from disk (or object storage) block by
    block: the exact search over a store larger than memory.
    """
    dev = device or torch.device("cpu")
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    m = q.shape[0]
    n_top, n_bottom = max(0, min(n_top, n)), max(0, min(n_bottom, n))
    best = [torch.full((m, 0), -torch.inf, device=dev), torch.full((m, 0), -torch.inf, device=dev)]
    best_ids = [torch.zeros((m, 0), dtype=torch.long, device=dev), torch.zeros((m, 0), dtype=torch.long, device=dev)]
    wanted = (n_top, n_bottom)
    for start, rows in blocks:
        stop = start + int(rows.shape[0])
        block = (rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)).to(device=dev, dtype=torch.float32)
        if row_scale is not None:
            c = row_scale.shape[1]
            w = torch.from_numpy(np.ascontiguousarray(row_scale[start:stop], dtype=np.float32)).to(dev)
            block = (block.reshape(stop - start, c, -1) * w[:, :, None]).reshape(stop - start, -1)
        scores = (block @ q.T).T  # (M, b)
        del block
        allowed = mask(start, stop) if mask is not None else None
        if allowed is not None:
            allowed = allowed.to(dev)
        ids = torch.arange(start, stop, device=dev).expand(m, -1)
        for end, sign in ((0, 1.0), (1, -1.0)):
            if wanted[end] == 0:
                continue
            s = scores * sign
            if allowed is not None:
                s = s.masked_fill(~(allowed.T if allowed.dim() == 2 else allowed[None, :]), -torch.inf)
            cat_s = torch.cat([best[end], s], dim=1)
            cat_i = torch.cat([best_ids[end], ids], dim=1)
            top = torch.topk(cat_s, min(wanted[end], cat_s.shape[1]), dim=1)
            best[end] = top.values
            best_ids[end] = torch.gather(cat_i, 1, top.indices)
    out: list[np.ndarray] = []
    for end, sign in ((0, 1.0), (1, -1.0)):
        s, i = best[end], best_ids[end].clone()
        i[~torch.isfinite(s)] = -1
        out += [(s * sign).cpu().numpy().astype(np.float32), i.cpu().numpy().astype(np.int64)]
    return out[0], out[1], out[2], out[3]


# rows from which the auto backend keeps int8 codes: below, a float32 scan of one query reads at most 128 MiB
# and quantising every row at open costs more than the prefilter saves
INT8_MIN_ROWS = 32_768


class Searcher:
    """Both ends of an inner-product search over the stored rows, optionally weighted and masked."""

    backend = "abstract"
    candidate_factor = 1  # approximate searches: the default candidates are this many times the exact scan's
    width: int

    def search(self, q: np.ndarray, n_top: int, n_bottom: int, *, row_scale: np.ndarray | None = None,
               mask: Mask | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(top_scores, top_ids, bottom_scores, bottom_ids)`` as :func:`scan` returns them."""
        raise NotImplementedError


class FaissSearcher(Searcher):
    """FAISS ``IndexFlatIP`` (CPU, or GPU with faiss-gpu) for plain searches; the scan over its rows otherwise."""

    def __init__(self, index: faiss.Index, rows: np.ndarray, backend: str = "faiss-cpu") -> None:
        self.index, self.rows, self.backend, self.width = index, rows, backend, int(rows.shape[1])

    def search(self, q: np.ndarray, n_top: int, n_bottom: int, *, row_scale: np.ndarray | None = None,
               mask: Mask | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if mask is None and row_scale is None:
            return both_ends(self.index, q, n_top, n_bottom)
        return scan(self.rows, q, n_top, n_bottom, row_scale=row_scale, mask=mask)


class TorchSearcher(Searcher):
    """The blocked scan over rows held on a torch device (a GPU without faiss-gpu).

    With ``prefilter`` (the default on the CPU), a search of at most ``PREFILTER_QUERIES`` queries over a
    table with at least ``PREFILTER_MIN_ROWS`` rows per kept candidate goes through :func:`prefilter_scan`
    over int8 codes of the rows (built here, ``N x W`` bytes); everything else (bulk batches, small
    indexes, a per-checkpoint row scale, ``search="full"``) is the full float32 scan.
    """

    backend = "torch"

    def __init__(self, rows: torch.Tensor, checkpoints: int = 1, prefilter: bool = False,
                 int8: Int8Rows | None = None) -> None:
        self.rows, self.width, self.checkpoints = rows, int(rows.shape[1]), checkpoints
        self.backend = f"torch-{rows.device.type}"
        self.prefilter = prefilter and rows.device.type == "cpu" and self.width <= INT8_MAX_WIDTH
        self._int8 = int8 if self.prefilter else None

    def wait(self) -> None:
        """Until background work (the int8 pack) is done; searches never need it, they are only faster after."""
        if self._int8 is not None:
            self._int8.wait()

    def close(self) -> None:
        """Stop background work (searches keep working, on the plain int8 products)."""
        if self._int8 is not None:
            self._int8.stop()

    def int8(self) -> Int8Rows:
        """The int8 codes of the rows (:class:`Int8Rows`), made on first use unless given."""
        if self._int8 is None:
            self._int8 = Int8Rows.of(self.rows)
        return self._int8

    def takes_prefilter(self, m: int, n_top: int, n_bottom: int, row_scale: np.ndarray | None = None) -> bool:
        kept = PREFILTER_FACTOR * (n_top + n_bottom)
        return (self.prefilter and m <= PREFILTER_QUERIES and self.rows.shape[0] >= PREFILTER_MIN_ROWS * max(1, kept)
                and (row_scale is None or self.checkpoints == 1))

    def search(self, q: np.ndarray, n_top: int, n_bottom: int, *, row_scale: np.ndarray | None = None,
               mask: Mask | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.takes_prefilter(len(q), n_top, n_bottom, row_scale):
            return prefilter_scan(self.rows, self.int8(), q, n_top, n_bottom, self.checkpoints,
                                  row_scale=row_scale, mask=mask)
        return scan(self.rows, q, n_top, n_bottom, row_scale=row_scale, mask=mask)


def available_memory() -> int:
    """MemAvailable of this machine in bytes (a huge number where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits


def load_rows(store: Store, name: str = "grads", dtype: torch.dtype = torch.float32,
              device: torch.device | None = None, each: Callable[[int, torch.Tensor], None] | None = None
              ) -> torch.Tensor:
    """A per-row array of the store as one tensor, read in 64 MiB blocks (Zarr's decoding stays small),
    checksums checked; ``each(start, block)`` sees every block once it is in the tensor."""
    arr = store.array(name)
    out = torch.empty((store.num_rows, *arr.shape[1:]), dtype=dtype, device=device)
    for start, block in store.iter_rows(name=name, float32=False):
        part = out[start : start + len(block)]
        part.copy_(torch.from_numpy(block))  # converted here, in torch (vectorised, threaded)
        if each is not None:
            each(start, part)
    return out


def _fits_in_memory(store: Store, memory: int | None, codes: bool = False) -> bool:
    """Whether the in-memory float32 index (and its int8 codes) fits: within ``memory`` if given, else half
    the available RAM."""
    need = store.num_rows * int(store.attrs["width"]) * (5 if codes else 4)
    return need <= (memory if memory is not None else available_memory() // 2)


class StreamSearcher(Searcher):
    """Exact search straight from the store, one block of rows in memory at a time (a store larger than RAM).

    ``memory`` bounds the bytes held: half for one block of rows (its stored bytes, their decoding and
    float32 copy), half for the block's scores (``block_rows x queries``, about three float32 copies).
    Each search reads the whole store once per ``query_chunk`` queries, so its time is the store's read
    time (a large bulk batch under the default 256 MiB reads it several times; raise ``memory``).
    """

    backend = "stream"

    def __init__(self, store: Store, memory: int = STREAM_MEMORY, device: torch.device | None = None) -> None:
        self.store, self.width = store, int(store.attrs["width"])
        self.device = device or torch.device("cpu")
        # a row costs its stored bytes about three times over while Zarr decodes (chunk, checksum, output),
        # plus its float32 copy, with a byte to spare (tests/test_distributed.py bounds the peak with tracemalloc)
        per_row = self.width * (3 * np.dtype(str(store.array("grads").dtype)).itemsize + 5)
        unit = int(store.attrs["unit_rows"])  # whole chunks: a chunk is never read twice
        self.block_rows = max(unit, (memory // 2 // per_row) // unit * unit)
        self.query_chunk = max(1, memory // 2 // (SCORE_COPIES * 4 * self.block_rows))

    def search(self, q: np.ndarray, n_top: int, n_bottom: int, *, row_scale: np.ndarray | None = None,
               mask: Mask | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        def one_chunk(queries: np.ndarray, chunk_mask: Mask | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            return scan_blocks(self.store.iter_rows(self.block_rows), self.store.num_rows, queries, n_top, n_bottom,
                               row_scale=row_scale, mask=chunk_mask, device=self.device)

        return _in_query_chunks(q, self.query_chunk, mask, one_chunk)  # one read of the store per chunk


def make_searcher(store: Store, device: torch.device, backend: str = "auto", memory: int | None = None,
                  nprobe: int | None = None, shards: int | None = None) -> Searcher:
    """The search backend for ``device``: ``auto`` (see the module docstring), ``torch`` (the scan, with the int8
    prefilter for ad-hoc queries on the CPU), ``full`` (the scan without it), ``faiss``, ``stream``, ``ann`` (the
    build's FAISS index, searched with ``nprobe``: :mod:`tracin_index.ann`) or ``ray`` (``shards`` Ray actors, each
    holding a shard's codes: :mod:`tracin_index.sharded`)."""
    SEARCHES.check(backend)
    on_gpu = device.type == "cuda"
    has_ann = bool(store.attrs.get("faiss"))
    if backend == "ann" and not has_ann:
        raise InputError(f"{store.path.name} has no FAISS index, so {arg('search', 'ann')} cannot search it; build it "
                         f"with {arg('faiss')} (auto stores one from 1M rows; e.g. PQ256x4fs) or choose another search")
    prefilter = (backend == "torch" or (backend == "auto" and store.num_rows >= INT8_MIN_ROWS and fast_int8())) and not on_gpu

    def streamed() -> StreamSearcher:  # the exact scan from the store: the search, or the codes' fallback
        return StreamSearcher(store, memory or STREAM_MEMORY, device)

    if backend == "ray":
        from .sharded import ShardedSearcher

        return ShardedSearcher(store, shards, streamed(), nprobe=nprobe)
    if backend == "ann" or (backend == "auto" and has_ann and not on_gpu and (
            store.num_rows >= ANN_MIN_ROWS or not _fits_in_memory(store, memory, prefilter))):
        from .ann import AnnSearcher, load_faiss

        return AnnSearcher(load_faiss(store), streamed(), nprobe)
    if backend == "stream" or (backend == "auto" and not _fits_in_memory(store, memory, prefilter)):
        return streamed()
    faiss = faiss_module() if on_gpu or backend == "faiss" else None
    faiss_gpu = faiss is not None and on_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if SEARCHES[backend]["scan"] or (backend == "auto" and not faiss_gpu):
        width = int(store.attrs["width"])
        int8 = Int8Rows.empty(store.num_rows, width) if prefilter and width <= INT8_MAX_WIDTH else None
        # CPUs without fp16 GEMM: float32, as FAISS holds them; the int8 codes made while each block is in cache
        table = load_rows(store, "grads", torch.float16 if on_gpu else torch.float32, device,
                          each=None if int8 is None else int8.fill)
        if int8 is not None and store.num_rows >= PACK_MIN_ROWS:
            int8.pack(background=True)  # queries use int_mm until it is done, with the same results
        checkpoints = len(store.attrs["checkpoints"])
        return TorchSearcher(table, checkpoints, prefilter=int8 is not None, int8=int8)
    index = build_flat_index(store)
    rows = flat_rows(index)
    if faiss_gpu and faiss is not None:  # pragma: no cover - needs faiss-gpu and a GPU
        gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
        return FaissSearcher(gpu, rows, backend="faiss-gpu")
    return FaissSearcher(index, rows)
