"""Projections: defined by the seed alone, equal to their dense definition, unbiased, deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, outer
from tracin_index.engine import Engine, describe_parameters
from tracin_index.forms import SharedOuterGrad, densify, inner
from tracin_index.layers import select_parameters
from tracin_index.losses import get_loss
from tracin_index.plan import probe
from tracin_index.projection import GaussianProjector, SketchProjector, _key, hash64, make_projector

from .conftest import Trained

M64 = (1 << 64) - 1


def _splitmix_reference(key: int, coords: np.ndarray) -> np.ndarray:
    """splitmix64 in numpy uint64 (well-defined wrap-around), independent of torch's int64 arithmetic."""
    with np.errstate(over="ignore"):
        z = coords.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key & M64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def test_hash_matches_uint64_reference() -> None:
    coords = np.arange(0, 200_000, 7, dtype=np.int64)
    key = _key(123, 4, 1)
    ours = hash64(key, torch.from_numpy(coords)).numpy().view(np.uint64)
    assert np.array_equal(ours, _splitmix_reference(key, coords))


def _blocks(trained: Trained, layers: str, n: int = 6) -> tuple[list, list]:
    bundle = load_model(trained.directory)
    names = select_parameters(bundle.model, layers, bundle.triples.mapped[:2])
    tracked = describe_parameters(bundle.model, names)
    engine = Engine(bundle.model, tracked, get_loss("bce"))
    triples = bundle.triples.mapped[:n]
    return tracked, engine.run(triples, probe(engine, triples).plan).blocks


@pytest.mark.parametrize("block_bytes", [None, 1])
def test_tensorsketch_equals_countsketch_of_the_outer_product(conve_inverse: Trained, block_bytes: int | None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the CountSketch of the dense outer products; ``block_bytes=1``: the CPU path's blocks of
    16 triples, with the same bytes as one block (shared ``v`` rows included)."""
    tracked, blocks = _blocks(conve_inverse, "interaction.hr1d.0.weight", n=40)
    assert isinstance(blocks[0], SharedOuterGrad)  # rows share their encoder input
    k = 257
    proj = SketchProjector(ProjectionSpec("sparse", k, 5), tracked, torch.device("cpu"), 0)
    if block_bytes is not None:
        whole = proj(blocks)
        monkeypatch.setattr(outer, "SKETCH_BLOCK_BYTES", block_bytes)
        assert torch.equal(proj(blocks), whole)
    out_dim, in_dim = tracked[0].shape
    h0 = hash64(_key(5, 0, 0), torch.arange(out_dim))
    h1 = hash64(_key(5, 0, 1), torch.arange(in_dim))
    from tracin_index.projection import _lsr

    bucket = ((_lsr(h0, 1) % k)[:, None] + (_lsr(h1, 1) % k)[None, :]) % k
    sign = ((h0 & 1) * 2 - 1).double()[:, None] * ((h1 & 1) * 2 - 1).double()[None, :]
    dense = densify(blocks).double()  # (B, out*in), row-major (o, i)
    expected = torch.zeros(dense.shape[0], k, dtype=torch.float64)
    expected.index_add_(1, bucket.reshape(-1), dense * sign.reshape(-1))
    assert torch.allclose(proj(blocks).double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("layers", ["last:2", "all"])
def test_gaussian_equals_dense_matrix(conve_inverse: Trained, layers: str) -> None:
    tracked, blocks = _blocks(conve_inverse, layers)
    k = 48
    proj = GaussianProjector(ProjectionSpec("gaussian", k, 3), tracked, torch.device("cpu"), 1 << 20)
    parts = []  # assemble P from its chunks, parameter by parameter, in row-major order
    for j, p in enumerate(tracked):
        rows, _ = proj._rows_cols(p)
        n = proj._rows_per_chunk(p)
        parts += [proj.chunk(j, c) for c in range((rows + n - 1) // n)]
    dense_p = torch.cat(parts, dim=1)
    assert dense_p.shape == (k, sum(p.size for p in tracked))
    expected = densify(blocks) @ dense_p.T
    assert torch.allclose(proj(blocks), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # the matrix does not depend on the memory budget or the order chunks are made in
    fresh = GaussianProjector(ProjectionSpec("gaussian", k, 3), tracked, torch.device("cpu"), 0)
    assert torch.equal(fresh.chunk(len(tracked) - 1, 0), proj.chunk(len(tracked) - 1, 0))
    assert torch.equal(fresh(blocks), proj(blocks))
    # a budget smaller than P keeps the first chunks (chunks are visited cyclically: LRU would never hit)
    assert len(tracked) >= 3
    budget = (proj.chunk(0, 0).numel() + proj.chunk(1, 0).numel()) * 4
    small = GaussianProjector(ProjectionSpec("gaussian", k, 3), tracked, torch.device("cpu"), budget)
    a, b, _ = small.chunk(0, 0), small.chunk(1, 0), small.chunk(2, 0)
    assert small.chunk(0, 0) is a and small.chunk(1, 0) is b and small.chunk(2, 0) is not small.chunk(2, 0)
    assert torch.equal(small(blocks), proj(blocks))


@pytest.mark.parametrize("kind", ["sparse", "gaussian"])
@pytest.mark.parametrize("layers", ["last:2", "all"])
def test_projected_inner_products_are_unbiased(conve_inverse: Trained, kind: str, layers: str) -> None:
    tracked, blocks = _blocks(conve_inverse, layers, n=4)
    exact = inner(blocks, blocks).double()
    seeds = 200
    samples = []
    for seed in range(seeds):
        proj = make_projector(ProjectionSpec(kind, 32, seed), tracked, torch.device("cpu"))
        z = proj(blocks).double()
        samples.append(z @ z.T)
    stack = torch.stack(samples)
    mean, sem = stack.mean(0), stack.std(0) / seeds**0.5
    # each entry's mean within 4.5 standard errors of the exact inner product (all 16 entries)
    assert bool(((mean - exact).abs() <= 4.5 * sem + 1e-9 * exact.abs().max()).all()), (mean - exact) / sem


@pytest.mark.parametrize("kind", ["sparse", "gaussian"])
def test_build_is_deterministic(conve_inverse: Trained, kind: str, tmp_path: Path) -> None:
    bundle = load_model(conve_inverse.directory)
    config = BuildConfig(projection=ProjectionSpec(kind, 64, 11), unit_rows=600, batch_size=250)
    a = build_index(bundle, tmp_path / "a", checkpoints=conve_inverse.checkpoints, config=config)
    b = build_index(load_model(conve_inverse.directory), tmp_path / "b", checkpoints=conve_inverse.checkpoints,
                    config=config)
    for name in ("grads", "self_influence", "norms", "triples"):
        assert np.asarray(a.array(name)[:]).tobytes() == np.asarray(b.array(name)[:]).tobytes(), name
    for f in sorted((tmp_path / "a" / "grads").rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "b" / "grads" / f.relative_to(tmp_path / "a" / "grads")).read_bytes()
    other = build_index(load_model(conve_inverse.directory), tmp_path / "c", checkpoints=conve_inverse.checkpoints,
                        config=BuildConfig(projection=ProjectionSpec(kind, 64, 12), unit_rows=600))
    assert not np.array_equal(np.asarray(a.array("grads")[:10]), np.asarray(other.array("grads")[:10]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_projection_matrix_is_device_independent(conve_inverse: Trained) -> None:
    tracked, _ = _blocks(conve_inverse, "last:2")
    coords = torch.arange(100_000)
    assert torch.equal(hash64(_key(1, 2, 3), coords), hash64(_key(1, 2, 3), coords.cuda()).cpu())
    cpu = GaussianProjector(ProjectionSpec("gaussian", 64, 1), tracked, torch.device("cpu"), 1 << 26)
    gpu = GaussianProjector(ProjectionSpec("gaussian", 64, 1), tracked, torch.device("cuda"), 1 << 26)
    assert torch.equal(cpu.chunk(0, 0), gpu.chunk(0, 0).cpu())


@pytest.mark.parametrize(("n", "batch_innermost"), [(3000, True), (3000, False), (200, False)])
def test_countsketch_same_bytes_for_any_thread_count_or_batch_split(n: int, batch_innermost: bool) -> None:
    """Each CPU kernel of the CountSketch (CSR x dense for batch-innermost rows, dense x CSR, index_add_ for
    narrow blocks) gives every row the same bytes with 1 or 2 threads and whatever rows share its call;
    and the kernels agree with a plain sum of signed columns per bucket."""
    proj = SketchProjector(ProjectionSpec("sparse", 64, 3), [], torch.device("cpu"), 0)
    memory = torch.randn(n, 300, generator=torch.Generator().manual_seed(1))

    def rows(lo: int, hi: int) -> torch.Tensor:  # rows lo:hi, laid out as the case says
        return memory[:, lo:hi].contiguous().T if batch_innermost else memory[:, lo:hi].T.contiguous()

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = proj.countsketch(rows(0, 300), 0, 1)
        torch.set_num_threads(1)
        single = proj.countsketch(rows(0, 300), 0, 1)
    finally:
        torch.set_num_threads(threads)
    split = torch.cat([proj.countsketch(rows(0, 113), 0, 1), proj.countsketch(rows(113, 300), 0, 1)])
    assert rows(0, 300).T.is_contiguous() == batch_innermost
    assert torch.equal(whole, single) and torch.equal(whole, split)
    bucket, sign = proj._fixed(0, 1, n)
    x = rows(0, 300).double()
    truth = torch.stack([(x[:, bucket == b] * sign[bucket == b].double()).sum(1) for b in range(64)], dim=1)
    assert torch.allclose(whole.double(), truth, rtol=1e-5, atol=1e-5)
