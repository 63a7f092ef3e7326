"""Stage 5: inner-product search over the stored rows.

Two engines over the same rows, both exact over the projected rows:

- FAISS ``IndexFlatIP`` for the plain case (raw dot products, no restriction): :func:`search`;
- a blocked scan (torch matmul + top-k per block, merged) for everything FAISS's flat index cannot do
  in one call: per-row weights (the cosine mode) and per-query masks (candidate filters applied before
  the top-K cut): :func:`scan`. Memory is ``block_rows x M`` scores at a time, never ``N x M``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import torch

from .store import Store

__all__ = ["build_flat_index", "flat_rows", "scan", "search"]

Mask = Callable[[int, int], torch.Tensor | None]


def build_flat_index(store: Store) -> faiss.Index:
    """An exact inner-product index over the store's rows, added block by block."""
    index = faiss.IndexFlatIP(int(store.attrs["width"]))
    for _, rows in store.iter_rows():
        index.add(np.ascontiguousarray(rows))
    return index


def flat_rows(index: faiss.Index) -> np.ndarray:
    """The ``(N, W) float32`` rows held by a CPU ``IndexFlat``, as a view (no copy)."""
    n, d = int(index.ntotal), int(index.d)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    flat: Any = faiss.downcast_index(index)
    rows: np.ndarray = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    return rows


def search(index: faiss.Index, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` rows by inner product: ``(M, n) float32`` scores and ``(M, n) int64`` row ids (-1 = none)."""
    n = max(1, min(n, index.ntotal))
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    return scores, ids


def scan(
    rows: np.ndarray,
    queries: np.ndarray,
    n_top: int,
    n_bottom: int,
    *,
    row_scale: np.ndarray | None = None,
    mask: Mask | None = None,
    block_rows: int = 32768,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Largest ``n_top`` and smallest ``n_bottom`` scores per query over ``rows (N, W) float32``.

    The score of row ``i`` for query ``m`` is ``<rows[i] * w_i, queries[m]>`` where ``w_i`` repeats
    ``row_scale[i, c]`` over checkpoint ``c``'s ``W / C`` columns (``row_scale (N, C)``; None = 1).
    ``mask(start, stop)`` returns which rows of a block may be returned: ``(b,)`` for all queries or
    ``(b, M)`` per query (None = all); masked rows never take a place in either list.

    Returns ``(top_scores (M, n_top) float32, top_ids (M, n_top) int64, bottom_scores, bottom_ids)``,
    best first; missing places (fewer allowed rows than asked) have id -1.
    """
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    m = q.shape[0]
    n = rows.shape[0]
    n_top, n_bottom = max(0, min(n_top, n)), max(0, min(n_bottom, n))
    best = [torch.full((m, 0), -torch.inf), torch.full((m, 0), -torch.inf)]
    best_ids = [torch.zeros((m, 0), dtype=torch.long), torch.zeros((m, 0), dtype=torch.long)]
    wanted = (n_top, n_bottom)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = torch.from_numpy(rows[start:stop])
        if row_scale is not None:
            c = row_scale.shape[1]
            w = torch.from_numpy(np.ascontiguousarray(row_scale[start:stop], dtype=np.float32))
            block = (block.reshape(stop - start, c, -1) * w[:, :, None]).reshape(stop - start, -1)
        scores = (block @ q.T).T  # (M, b)
        allowed = mask(start, stop) if mask is not None else None
        ids = torch.arange(start, stop).expand(m, -1)
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
        out += [(s * sign).numpy().astype(np.float32), i.numpy().astype(np.int64)]
    return out[0], out[1], out[2], out[3]
