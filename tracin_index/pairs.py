"""The exact re-rank: the TracIn value of each asked (test, candidate) pair, train-major.

Only the asked pairs are computed (:meth:`Tracer.exact_pairs`), not the tests x union matrix, so a large batch
of tests costs its pairs plus one gradient per distinct candidate: the bigger the batch, the more tests share
each recomputed training gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .store import Store
from .tracer import Tracer

__all__ = ["Activations", "StoredActs", "distinct_inverse", "rerank"]


def distinct_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_inverse=True)`` for a 1-D int array, by one stable sort: numpy 2's ``unique``
    hashes first, which is much slower on int64 keys, above all on a bulk batch's millions of them."""
    order = np.argsort(a, kind="stable")
    ranked = a[order]
    first = np.r_[True, ranked[1:] != ranked[:-1]] if len(ranked) else np.zeros(0, dtype=bool)
    inverse = np.empty(len(a), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ranked[first], inverse


class StoredActs:
    """A build's stored activations read for the asked rows alone (``acts[rows]``), none held in memory."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.store.read_rows("acts", rows))


Activations = tuple[str, "torch.Tensor | StoredActs"]  # the cache module's name, every row's values


def rerank(tracer: Tracer, triples: torch.Tensor, blocks: list[Any], pi: np.ndarray, oi: np.ndarray,
           test_scale: torch.Tensor | None = None, row_scale: np.ndarray | None = None,
           acts: Activations | None = None, progress: Callable[[float], None] | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Exact values ``(M, n)`` of each test's candidates per end (row ids ``pi`` / ``oi`` into ``triples``, -1
    for a missing place, whose value is 0). ``blocks``: the tests' gradient blocks; ``test_scale`` /
    ``row_scale``: the cosine mode's scales; ``acts``: the stored activations of every row (module, values)."""
    m = pi.shape[0]
    cand = np.concatenate([pi, oi], axis=1)
    valid = cand >= 0
    # (row, test) pairs, asked once or twice, sorted by row then test; each asked place's pair among them
    keys, pair_of = distinct_inverse((cand.astype(np.int64) * m + np.arange(m)[:, None])[valid])
    at = np.zeros(cand.shape, dtype=np.int64)
    at[valid] = pair_of
    rows, tests = keys // m, keys % m
    union, pair_train = distinct_inverse(rows)
    values = tracer.exact_pairs(
        blocks, triples[torch.from_numpy(union)], torch.from_numpy(tests), torch.from_numpy(pair_train),
        test_scale=test_scale, train_scale=None if row_scale is None else torch.from_numpy(row_scale[union]),
        progress=progress, train_acts=None if acts is None else (acts[0], acts[1][union]),
    ).numpy()
    got = np.where(valid, values[at] if len(values) else 0.0, 0.0).astype(np.float32)
    return got[:, : pi.shape[1]], got[:, pi.shape[1] :]
