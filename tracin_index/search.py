"""Stage 5: inner-product search over the stored rows (FAISS ``IndexFlatIP``, exact)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from .store import Store

__all__ = ["build_flat_index", "load_index", "search"]


def build_flat_index(store: Store) -> faiss.Index:
    """An exact inner-product index over the store's rows, added block by block."""
    index = faiss.IndexFlatIP(int(store.attrs["width"]))
    for _, rows in store.iter_rows():
        index.add(np.ascontiguousarray(rows))
    return index


def save_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def load_index(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))


def search(index: faiss.Index, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` rows by inner product: ``(M, n) float32`` scores and ``(M, n) int64`` row ids (-1 = none)."""
    n = max(1, min(n, index.ntotal))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    return scores, ids
