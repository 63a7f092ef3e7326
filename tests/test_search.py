"""The search and pair-product kernels against brute force (numpy argsort, the dense inner product)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracin_index.gradients import DenseGrad, OuterGrad, RowsGrad, inner, inner_pairs
from tracin_index.search import scan


def _brute(rows: np.ndarray, q: np.ndarray, n: int, allowed: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    scores = q.astype(np.float64) @ rows.astype(np.float64).T  # (M, N)
    top, bottom = [], []
    for m in range(len(q)):
        ok = np.flatnonzero(allowed[:, m])
        order = ok[np.argsort(-scores[m, ok], kind="stable")]
        top.append(order[:n].tolist())
        bottom.append(order[::-1][:n].tolist() if len(order) else [])
    return top, bottom


@pytest.mark.parametrize("query_chunk", [1, 3, 1024])
@pytest.mark.parametrize("masked", [False, True])
def test_scan_equals_brute_force_in_any_query_chunking(query_chunk: int, masked: bool) -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    allowed = rng.random((300, 7)) < 0.4 if masked else np.ones((300, 7), dtype=bool)
    mask = (lambda a, b: torch.from_numpy(allowed[a:b])) if masked else None
    ts, ti, _, bi = scan(rows, q, 9, 11, mask=mask, block_rows=64, query_chunk=query_chunk)
    top, bottom = _brute(rows, q, 11, allowed)
    for m in range(len(q)):
        assert ti[m][ti[m] >= 0].tolist() == top[m][:9]
        assert bi[m][bi[m] >= 0].tolist() == bottom[m][:11]
        assert np.allclose(ts[m][ti[m] >= 0], (rows[ti[m][ti[m] >= 0]] @ q[m]), rtol=1e-5, atol=1e-5)
        assert np.all(bi[m][len(bottom[m]):] == -1), "missing places are -1"


def _blocks(n: int, gen: torch.Generator) -> list:
    return [OuterGrad(torch.randn(2, n, 7, generator=gen), torch.randn(2, n, 2000, generator=gen)),
            DenseGrad(torch.randn(n, 5, generator=gen)), DenseGrad(torch.randn(n, 1500, generator=gen)),
            RowsGrad(torch.randint(4, (n, 2), generator=gen), torch.randn(n, 2, 3, generator=gen), 4)]


def test_inner_pairs_equals_the_dense_inner_product() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = _blocks(13, gen), _blocks(29, gen)
    ia, ib = torch.randint(13, (200,), generator=gen), torch.randint(29, (200,), generator=gen)  # any order, repeats
    full = inner(a, b)
    got = inner_pairs(a, b, ia, ib)
    assert got.shape == (200,)
    assert torch.allclose(got, full[ia, ib], rtol=1e-5, atol=1e-3)
    assert inner_pairs(a, b, ia[:0], ib[:0]).shape == (0,)
