"""Approximate search with a FAISS index stored in the build: compact codes in memory, both ends searched.

``build --faiss SPEC`` takes a FAISS ``index_factory`` string with the inner-product metric (``IVF1024,SQ8``,
``IVF4096,PQ64``, ``HNSW32,SQ8``...). At the end of a build (:func:`build_faiss`), the index is trained on a
seeded sample of the stored rows, every row is added block by block, and the serialised index is written
into the build (Zarr array ``faiss``, crc32c per chunk), with its sha256 in the attributes. The same rows,
spec, sample and seed give the same bytes.

At query time (:class:`AnnSearcher`) only the index's codes are in memory, not the float32 rows (the cosine
mode and candidate filters, which weigh or mask rows, take an exact scan streamed from the store). Proponents
are the top of ``<q, x>``; opponents are searched for explicitly as the top of ``<-q, x>``, since the
negative end is where an approximate index loses recall first. Candidates go to the exact re-rank as with
every search, so the values listed are exact; what the index can lose is a candidate it never returns.
``nprobe`` (IVF) or ``efSearch`` (HNSW) trades time for recall.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError, arg
from .runtime import faiss_module
from .search import ANN_MIN_ROWS, Searcher, both_ends
from .store import Store

__all__ = ["AnnSearcher", "build_faiss", "check_spec", "default_spec", "load_faiss", "resolve_spec"]

DEFAULT_SAMPLE = 65536  # rows the index is trained on (seeded)
APPROXIMATE_CANDIDATES = 4  # the default candidates re-ranked per end are 4x the exact scan's: codes rank coarsely


def default_spec(rows: int, width: int) -> str | None:
    """The FAISS index ``build --faiss auto`` stores for ``rows`` indexed rows of ``width`` numbers: none below
    :data:`~tracin_index.search.ANN_MIN_ROWS` (the exact scan answers those), else an exhaustive product
    quantiser with 4-bit fast-scan codes, one sub-quantiser per 4 numbers (``PQ512x4fs`` for 2,048: 256 bytes a
    row), or 8-bit scalar codes where the width does not split so. Projected gradients have no cluster structure
    for an inverted file to exploit; a scan of compact codes keeps every row in reach."""
    if rows < ANN_MIN_ROWS:
        return None
    return f"PQ{width // 4}x4fs" if width % 8 == 0 else "SQ8"


def resolve_spec(spec: str | None, rows: int, width: int) -> str | None:
    """``build --faiss``'s value as the spec to build: ``auto`` by :func:`default_spec`, ``none`` (or None) none."""
    if spec is None or spec.lower() == "none":
        return None
    return default_spec(rows, width) if spec.lower() == "auto" else spec


def check_spec(spec: str, width: int) -> None:
    """Refuse an ``index_factory`` string FAISS does not take for ``width`` dimensions, in one line."""
    faiss = faiss_module()
    try:
        faiss.index_factory(width, spec, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{arg('faiss', spec)} is not a FAISS index_factory string for {width} dimensions ({first}); "
                         "e.g. IVF1024,SQ8 or HNSW32,SQ8") from None


def _sample_rows(store: Store, size: int, seed: int) -> np.ndarray:
    """A seeded sample of ``size`` stored rows (float32), read in one pass over the store."""
    n = store.num_rows
    keep = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    parts = []
    for start, block in store.iter_rows():
        lo, hi = np.searchsorted(keep, [start, start + len(block)])
        if hi > lo:
            parts.append(block[keep[lo:hi] - start])
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def build_faiss(store: Store, spec: str, sample: int = DEFAULT_SAMPLE, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> tuple[bytes, bytes]:
    """The FAISS index ``spec`` trained on a seeded sample of ``sample`` rows, serialised empty (what a shard of
    the rows is added to: :class:`tracin_index.sharded.ShardedSearcher`) and with every row added."""
    faiss = faiss_module()
    width = int(store.attrs["width"])
    index = faiss.index_factory(width, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        train = _sample_rows(store, sample, seed)
        ivf = _ivf(index)
        if ivf is not None:  # k-means: seeded, and told how few points it may have
            ivf.cp.seed = seed
            ivf.cp.min_points_per_centroid = 1
        if progress is not None:
            progress(f"training FAISS {spec} on {len(train):,} rows")
        index.train(train)
    trained = bytes(faiss.serialize_index(index).tobytes())
    if progress is not None:
        progress(f"adding {store.num_rows:,} rows to FAISS {spec}")
    for _, block in store.iter_rows():
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return trained, bytes(faiss.serialize_index(index).tobytes())


def _ivf(index: Any) -> Any:
    """The IVF layer of ``index`` (possibly under a pre-transform), or None."""
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except Exception:  # not an IVF index
        return None


def load_faiss(store: Store, trained: bool = False) -> Any:
    """The build's FAISS index (``trained``: trained and empty), its bytes checked against the recorded sha256.

    FAISS reads the stored chunks as they come (no whole copy of the serialised index is assembled first)."""
    faiss = faiss_module()
    name = "faiss_trained" if trained else "faiss"
    chunks = store.iter_blob(name)
    digest = hashlib.sha256()
    pending: list[memoryview] = []

    def read(n: int) -> bytes:
        out = []
        while n > 0:
            if not pending:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                view = memoryview(chunk.data)
                digest.update(view)
                pending.append(view)
            take = pending[0][:n]
            out.append(take)
            n -= len(take)
            pending[0] = pending[0][len(take):]
            if not len(pending[0]):
                pending.pop()
        return b"".join(out)

    index = faiss.read_index(faiss.PyCallbackIOReader(read))
    for chunk in chunks:  # what FAISS did not read, for the checksum
        digest.update(chunk.data)
    info = store.attrs["faiss"]
    if digest.hexdigest() != info[f"{name}_sha256" if trained else "sha256"]:
        from .errors import StoreError

        raise StoreError(f"{store.path}: the FAISS index ({name}) does not match its recorded sha256; rebuild the index")
    return index


def set_search_parameter(index: Any, value: int | None) -> int | None:
    """``nprobe`` (IVF) or ``efSearch`` (HNSW) of ``index`` set to ``value`` (None: left as it is); the value
    in force, or None for an index without either."""
    faiss = faiss_module()
    ivf = _ivf(index)
    if ivf is not None:
        if value is not None:
            ivf.nprobe = min(value, ivf.nlist)
        return int(ivf.nprobe)
    try:
        hnsw = faiss.downcast_index(index).hnsw
    except Exception:
        return None
    if value is not None:
        hnsw.efSearch = value
    return int(hnsw.efSearch)


class AnnSearcher(Searcher):
    """Search in the build's FAISS index: proponents from ``q``, opponents from ``-q`` (approximate scores)."""

    backend = "ann"
    candidate_factor = APPROXIMATE_CANDIDATES

    def __init__(self, index: Any, fallback: Searcher, nprobe: int | None = None) -> None:
        self.index = index
        self.fallback = fallback
        self.width = int(index.d)
        self.nprobe = set_search_parameter(index, nprobe)

    def search(self, q: np.ndarray, n_top: int, n_bottom: int, *, row_scale: np.ndarray | None = None,
               mask: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Plain queries in the FAISS index; weighted (cosine) or masked ones by ``fallback`` (an exact scan)."""
        if row_scale is not None or mask is not None:
            return self.fallback.search(q, n_top, n_bottom, row_scale=row_scale, mask=mask)
        return both_ends(self.index, q, n_top, n_bottom)
