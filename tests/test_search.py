"""The search and pair-product kernels against brute force (numpy argsort, the dense inner product)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tracin_index import backend, forms
from tracin_index.forms import DenseGrad, OuterGrad, RowsGrad, inner, inner_pairs
from tracin_index.search import PREFILTER_QUERIES, Int8Rows, TorchSearcher, prefilter_scan, quantize_rows, scan


@pytest.fixture(autouse=True, params=backend.MODES)
def backend_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every case with the private kernels and with the plain fallbacks (``TRACIN_INDEX_BACKEND=plain``)."""
    backend.use(request.param)
    yield request.param
    backend.use(None)


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


@pytest.mark.parametrize("dense_pairs", [0, 16])
def test_inner_pairs_equals_the_dense_inner_product(dense_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kernels: the sampled product (few pairs per matrix) and the dense GEMM (many)."""
    monkeypatch.setattr(forms, "DENSE_PAIRS", dense_pairs)
    gen = torch.Generator().manual_seed(0)
    a, b = _blocks(13, gen), _blocks(29, gen)
    ia, ib = torch.randint(13, (200,), generator=gen), torch.randint(29, (200,), generator=gen)  # any order, repeats
    full = inner(a, b)
    got = inner_pairs(a, b, ia, ib)
    assert got.shape == (200,)
    assert torch.allclose(got, full[ia, ib], rtol=1e-5, atol=1e-3)
    assert inner_pairs(a, b, ia[:0], ib[:0]).shape == (0,)


@pytest.mark.parametrize(("c", "scaled"), [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("masked", [False, True])
def test_int8_prefilter_finds_the_full_top_k_and_returns_whole_row_products(c: int, scaled: bool, masked: bool) -> None:
    """The ad-hoc two-stage search: int8 products over every row, then float32 rows for ``PREFILTER_FACTOR`` x the
    candidates."""
    rng = np.random.default_rng(1)
    n, k, m = 40_000, 128 // c, 3
    rows = rng.standard_normal((n, c * k)).astype(np.float32)
    q = rng.standard_normal((m, c * k)).astype(np.float32)
    planted = rng.choice(n, size=(m, 30), replace=False)
    for j in range(m):  # 10 proponents and 20 opponents per query, graded, close to the noise rows' products
        rows[planted[j]] += np.outer(np.r_[np.linspace(4, 2, 10), -np.linspace(4, 2, 20)], q[j]) / np.sqrt(c * k)
    row_scale = rng.uniform(0.5, 2.0, (n, c)).astype(np.float32) if scaled else None
    allowed = rng.random((n, m)) < 0.7 if masked else np.ones((n, m), dtype=bool)
    mask = (lambda a, b: torch.from_numpy(allowed[a:b])) if masked else None
    searcher = TorchSearcher(torch.from_numpy(rows), checkpoints=c, prefilter=True)
    takes = searcher.takes_prefilter(m, 10, 20, row_scale)
    assert takes == (c == 1 or not scaled)  # a weight per checkpoint needs the full scan
    assert not searcher.takes_prefilter(PREFILTER_QUERIES + 1, 10, 20)
    weighted = rows if row_scale is None else (rows.reshape(n, c, k) * row_scale[:, :, None]).reshape(n, -1)
    ts, ti, bs, bi = searcher.search(q, 10, 20, row_scale=row_scale, mask=mask)
    top, bottom = _brute(weighted, q, 20, allowed)
    for j in range(m):  # the exact top-K of brute force over all rows, planted or not, in order
        assert ti[j].tolist() == top[j][:10] and bi[j].tolist() == bottom[j]
        assert allowed[ti[j], j].all() and allowed[bi[j], j].all()
        assert np.allclose(ts[j], weighted[ti[j]] @ q[j], rtol=1e-5, atol=1e-4)  # whole-row float32 products
        assert np.allclose(bs[j], weighted[bi[j]] @ q[j], rtol=1e-5, atol=1e-4)
    # the int8 stage alone is not that exact: without the refine its order differs from brute force
    approx = searcher.int8().products(torch.from_numpy(q)).T.numpy()
    if row_scale is None:
        assert any(np.argsort(-approx[:, j])[:20].tolist() != _brute(rows, q, 20, np.ones((n, m), bool))[0][j]
                   for j in range(m))
    full = TorchSearcher(torch.from_numpy(rows), checkpoints=c, prefilter=False)  # search="full"
    assert not full.takes_prefilter(m, 10, 20)
    _, fi, _, fb = full.search(q, 10, 20, row_scale=row_scale, mask=mask)
    assert fi.tolist() == [t[:10] for t in top] and fb.tolist() == bottom


def test_quantize_rows_rounds_each_row_to_its_own_scale() -> None:
    rng = np.random.default_rng(3)
    rows = torch.from_numpy((rng.standard_normal((50, 33)) * rng.uniform(1e-3, 1e3, (50, 1))).astype(np.float32))
    rows[7] = 0.0
    codes, scale = quantize_rows(rows)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    assert torch.equal(scale, rows.abs().amax(1) / 127)
    assert bool(((codes.float() * scale[:, None] - rows).abs() <= scale[:, None] * 0.5001).all())
    assert scale[7] == 0 and not codes[7].any()


def test_int8_prefilter_reports_missing_places() -> None:
    rng = np.random.default_rng(2)
    rows = torch.from_numpy(rng.standard_normal((2000, 64)).astype(np.float32))
    q = rng.standard_normal((1, 64)).astype(np.float32)
    allowed = np.zeros((2000, 1), dtype=bool)
    allowed[:3] = True  # only 3 rows may be returned
    ts, ti, _, bi = prefilter_scan(rows, Int8Rows.of(rows), q, 5, 5, 1, mask=lambda a, b: torch.from_numpy(allowed[a:b]))
    assert sorted(ti[0][:3].tolist()) == [0, 1, 2] and ti[0][3:].tolist() == [-1, -1]
    assert sorted(bi[0][:3].tolist()) == [0, 1, 2] and bi[0][3:].tolist() == [-1, -1]
    assert np.allclose(ts[0][:3], rows.numpy()[ti[0][:3]] @ q[0], rtol=1e-5, atol=1e-5)


def test_int8_products_are_exact_integer_sums_packed_or_not(backend_mode: str) -> None:
    """Both kernels give the exact int32 sums as float32, so the background pack never changes a result."""
    rng = np.random.default_rng(4)
    rows = torch.from_numpy((rng.standard_normal((70_000, 96)) * rng.uniform(0.1, 10, (70_000, 1))).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((3, 96)).astype(np.float32))
    int8 = Int8Rows.of(rows)
    assert int8.codes is not None
    codes = int8.codes.clone()
    q_codes, q_scale = quantize_rows(q)
    exact = (q_codes.long() @ codes.long().T).to(torch.float32)  # integer arithmetic, then one rounding
    plain = int8.products(q)
    assert torch.equal(int8.sums(q_codes), exact)
    assert torch.equal(plain, exact * int8.scale[None, :] * q_scale[:, None])
    int8.pack(background=True)
    int8.wait()
    if backend_mode == "plain":
        assert not int8.packed and int8.codes is not None, "the plain backend packs nothing"
        assert torch.equal(int8.sums(q_codes), exact) and torch.equal(int8.products(q), plain)
        return
    if not int8.packed:
        pytest.skip("this torch build has no oneDNN u8 x s8 GEMM; products stay on torch._int_mm")
    assert int8.codes is None, "the plain codes are dropped once packed"
    assert torch.equal(int8.sums(q_codes), exact) and torch.equal(int8.products(q), plain)


def test_process_exits_cleanly_while_packing(backend_mode: str) -> None:
    """A background pack is stopped at exit (a daemon thread inside oneDNN at finalisation aborts the process)."""
    code = ("import torch; from tracin_index.search import Int8Rows; "
            "r = Int8Rows.of(torch.randn(400_000, 256)); r.pack(background=True); print('exiting')")
    env = {**os.environ, "TRACIN_INDEX_BACKEND": backend_mode}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "exiting"


def test_a_stopped_pack_leaves_the_plain_products() -> None:
    rows = torch.randn(140_000, 64, generator=torch.Generator().manual_seed(5))
    int8 = Int8Rows.of(rows)
    int8.stop()  # before it starts: nothing is packed
    int8.pack(background=False)
    q = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    assert not int8.packed and int8.codes is not None
    assert int8.products(q).shape == (2, 140_000)


@pytest.mark.parametrize("width", [1, 96, 1024, 4097])
def test_int_mm_and_its_plain_fallback_give_the_same_exact_sums(width: int) -> None:
    """``torch._int_mm`` and the public int32 matmul (the plain path) both give the exact integer sums rounded
    once to float32, extremes included (sums past 2**24, where float32 rounding starts)."""
    gen = torch.Generator().manual_seed(width)
    a = torch.randint(-127, 128, (5, width), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (9000, width), dtype=torch.int8, generator=gen)
    a[0], b[0], b[1] = 127, 127, -127
    exact = (a.long() @ b.long().T).to(torch.float32)
    assert torch.equal(backend.int_mm_plain(a, b.T), exact)
    assert torch.equal(backend.int_mm(a, b.T), exact)
    assert torch.equal((a.double() @ b.double().T).to(torch.float32), exact)  # float64 would do as well
