"""The search and pair-product kernels against brute force (numpy argsort, the dense inner product)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracin_index.gradients import DenseGrad, OuterGrad, RowsGrad, inner, inner_pairs
from tracin_index.search import COARSE_QUERIES, TorchSearcher, coarse_scan, scan


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


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_coarse_stage_finds_the_full_top_k_and_returns_whole_row_products(scaled: bool, masked: bool) -> None:
    """The ad-hoc two-stage search: a quarter of each checkpoint's columns, then whole rows for 4x the candidates."""
    rng = np.random.default_rng(1)
    n, c, k, m = 40_000, 2, 64, 3
    rows = rng.standard_normal((n, c * k)).astype(np.float32)
    q = rng.standard_normal((m, c * k)).astype(np.float32)
    planted = rng.choice(n, size=(m, 30), replace=False)
    for j in range(m):  # 10 proponents and 20 opponents per query, graded, far above the noise rows' products
        rows[planted[j]] += np.outer(np.r_[np.linspace(16, 10, 10), -np.linspace(16, 10, 20)], q[j]) / 4
    row_scale = rng.uniform(0.5, 2.0, (n, c)).astype(np.float32) if scaled else None
    allowed = rng.random((n, m)) < 0.7 if masked else np.ones((n, m), dtype=bool)
    mask = (lambda a, b: torch.from_numpy(allowed[a:b])) if masked else None
    searcher = TorchSearcher(torch.from_numpy(rows), checkpoints=c, coarse=True)  # search="coarse"
    assert searcher.takes_coarse(m, 10, 20) and not searcher.takes_coarse(COARSE_QUERIES + 1, 10, 20)
    weighted = rows if row_scale is None else (rows.reshape(n, c, k) * row_scale[:, :, None]).reshape(n, -1)
    ts, ti, bs, bi = searcher.search(q, 10, 20, row_scale=row_scale, mask=mask)
    top, bottom = _brute(weighted, q, 20, allowed)
    for j in range(m):
        n_pro, n_opp = int(allowed[planted[j, :10], j].sum()), int(allowed[planted[j, 10:], j].sum())
        assert ti[j][:n_pro].tolist() == top[j][:n_pro]  # every allowed planted row, in the exact order
        assert bi[j][:n_opp].tolist() == bottom[j][:n_opp]
        assert set(ti[j][:n_pro]) <= set(planted[j, :10]) and set(bi[j][:n_opp]) <= set(planted[j, 10:])
        assert allowed[ti[j], j].all() and allowed[bi[j], j].all()
        assert np.allclose(ts[j], weighted[ti[j]] @ q[j], rtol=1e-5, atol=1e-3)  # whole-row products
        assert np.allclose(bs[j], weighted[bi[j]] @ q[j], rtol=1e-5, atol=1e-3)
    # many queries, or the exhaustive backend: the full scan, equal to brute force on any rows
    full = TorchSearcher(torch.from_numpy(rows), checkpoints=c, coarse=False)
    assert not full.takes_coarse(m, 10, 20)
    _, fi, _, fb = full.search(q, 10, 20, row_scale=row_scale, mask=mask)
    assert fi.tolist() == [t[:10] for t in top] and fb.tolist() == bottom


def test_coarse_stage_reports_missing_places() -> None:
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((2000, 64)).astype(np.float32)
    q = rng.standard_normal((1, 64)).astype(np.float32)
    allowed = np.zeros((2000, 1), dtype=bool)
    allowed[:3] = True  # only 3 rows may be returned
    ts, ti, _, bi = coarse_scan(torch.from_numpy(rows), torch.from_numpy(rows[:, :16]), q, 5, 5, 1,
                                 mask=lambda a, b: torch.from_numpy(allowed[a:b]))
    assert sorted(ti[0][:3].tolist()) == [0, 1, 2] and ti[0][3:].tolist() == [-1, -1]
    assert sorted(bi[0][:3].tolist()) == [0, 1, 2] and bi[0][3:].tolist() == [-1, -1]
    assert np.allclose(ts[0][:3], rows[ti[0][:3]] @ q[0], rtol=1e-5, atol=1e-5)
