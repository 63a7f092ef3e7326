"""The FAISS index stored in a build (``build --faiss``): same inputs give the same bytes, ``verify`` checks it,
sharded builds make the same one, and queries through it list the brute-force top-k (exact values)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tracin_index import BuildConfig, InputError, build_index, load_model, open_index
from tracin_index.ann import AnnSearcher
from tracin_index.build import build_shard, finalize_build, prepare_build
from tracin_index.cli import main
from tracin_index.store import Store
from tracin_index.verify import verify

from .conftest import Trained, exact_ends

SPEC = "IVF8,SQ8"  # Nations' 1,592 rows in 8 lists
CONFIG = BuildConfig(faiss=SPEC, faiss_sample=1000, unit_rows=256)


@pytest.fixture(scope="module")
def built(distmult_plain: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ann") / "idx"
    build_index(load_model(distmult_plain.directory), out, checkpoints=distmult_plain.checkpoints, config=CONFIG)
    return out


def _faiss_sha(where: Path) -> str:
    store = Store.open(where)
    assert hashlib.sha256(store.read_blob("faiss")).hexdigest() == store.attrs["faiss"]["sha256"]
    return str(store.attrs["faiss"]["sha256"])


def test_same_inputs_give_the_same_faiss_bytes_and_shards_make_the_same(distmult_plain: Trained, built: Path,
                                                                          tmp_path: Path) -> None:
    again = tmp_path / "again"
    bundle = load_model(distmult_plain.directory)
    build_index(bundle, again, checkpoints=distmult_plain.checkpoints, config=CONFIG)
    assert _faiss_sha(again) == _faiss_sha(built)
    info = Store.open(built).attrs["faiss"]
    assert info["spec"] == SPEC and info["sample"] == 1000 and info["bytes"] > 0

    sharded = tmp_path / "sharded"
    prepare_build(bundle, sharded, checkpoints=distmult_plain.checkpoints, config=CONFIG)
    for i in range(3):
        build_shard(bundle, sharded, (i, 3), checkpoints=distmult_plain.checkpoints, config=CONFIG)
    finalize_build(sharded)
    assert _faiss_sha(sharded) == _faiss_sha(built)

    other = tmp_path / "other"
    build_index(bundle, other, checkpoints=distmult_plain.checkpoints,
                config=BuildConfig(faiss=SPEC, faiss_sample=1000, faiss_seed=1, unit_rows=256))
    assert _faiss_sha(other) != _faiss_sha(built)  # another training sample: other centroids


def test_ann_queries_list_the_brute_force_top_k(distmult_plain: Trained, built: Path) -> None:
    """Probing every list, the candidates hold the true ends: the lists are the brute-force top-k of the exact
    influences, both ends; with one list probed the values listed are still exact."""
    index = open_index(built, search="ann", nprobe=8)
    assert isinstance(index.searcher, AnnSearcher) and index.searcher.nprobe == 8
    test = distmult_plain.testing[:5]
    full = index.exact_influence(test)
    exact_scan = open_index(built, search="full")
    for res, same, row in zip(index.query(test, k=5), exact_scan.query(test, k=5), full, strict=True):
        top, bottom = exact_ends(row, 5)  # Nations has tied rows: the values are compared, and the order to a scan
        assert [i.influence for i in res.proponents] == pytest.approx(row[top].tolist(), rel=1e-4, abs=1e-7)
        assert [i.influence for i in res.opponents] == pytest.approx(row[bottom].tolist(), rel=1e-4, abs=1e-7)
        assert [i.train_index for i in res.proponents + res.opponents] == [
            i.train_index for i in same.proponents + same.opponents]
    narrow = open_index(built, search="ann", nprobe=1)
    row_of = {int(p): r for r, p in enumerate(index.train_index)}
    for res, row in zip(narrow.query(test, k=5), full, strict=True):
        for item in res.proponents + res.opponents:
            assert item.influence == pytest.approx(float(row[row_of[item.train_index]]), rel=1e-4, abs=1e-7)
    # the cosine mode weighs rows: an exact scan streamed from the store answers it, as the default search does
    plain = open_index(built)
    for a, b in zip(index.query(test, k=5, mode="cosine"), plain.query(test, k=5, mode="cosine"), strict=True):
        assert [i.train_index for i in a.proponents] == [i.train_index for i in b.proponents]


def test_verify_checks_the_faiss_index(built: Path, tmp_path: Path) -> None:
    report = verify(built, check_model=False)
    assert report.ok, report.problems
    assert any("FAISS" in c for c in report.checks)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(Store.open(built).path, copy)
    chunk = next(p for p in (copy / "faiss").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify(copy, check_model=False).problems
    assert problems and "faiss" in problems[0] and "\n" not in problems[0]


def test_refusals_are_one_line(distmult_plain: Trained, built: Path, tmp_path: Path) -> None:
    bundle = load_model(distmult_plain.directory)
    out = tmp_path / "bad"
    with pytest.raises(InputError, match=r"faiss='IVFx,SQ8' is not a FAISS index_factory string"):
        build_index(bundle, out, checkpoints=distmult_plain.checkpoints, config=BuildConfig(faiss="IVFx,SQ8"))
    assert not out.exists() or not any(out.rglob("zarr.json")), "nothing half-written"
    plain = tmp_path / "plain"
    build_index(bundle, plain, checkpoints=distmult_plain.checkpoints, config=BuildConfig(unit_rows=256))
    with pytest.raises(InputError, match=r"has no FAISS index, so search='ann' cannot search it"):
        open_index(plain, search="ann")


def test_cli_builds_and_searches_the_faiss_index(distmult_plain: Trained, built: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    runner = CliRunner()
    res = runner.invoke(main, ["build", "--model", str(distmult_plain.directory), "--out", str(out), "--faiss", SPEC,
                               "--faiss-sample", "1000", "--unit-rows", "256",
                               *[x for p, lr in distmult_plain.checkpoints for x in ("--checkpoint", p, "--lr", str(lr))]])
    assert res.exit_code == 0, res.output
    assert _faiss_sha(out) == _faiss_sha(built)
    res = runner.invoke(main, ["query", str(out), "--triple", "brazil embassy uk", "--search", "ann", "--nprobe", "8",
                               "--top-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    want = open_index(built).query("brazil embassy uk", k=3)[0]
    got = json.loads(res.output)
    assert [p["train_index"] for p in got["proponents"]] == [p.train_index for p in want.proponents]
    res = runner.invoke(main, ["build", "--model", str(distmult_plain.directory), "--out", str(tmp_path / "x"),
                               "--faiss", "Nope"])
    assert res.exit_code != 0 and res.output.count("\n") == 1 and "--faiss" in res.output, res.output


def test_auto_stores_a_faiss_index_from_a_million_rows() -> None:
    from tracin_index.ann import resolve_spec

    assert resolve_spec("auto", 999_999, 1024) is None and resolve_spec(None, 5_000_000, 1024) is None
    assert resolve_spec("none", 5_000_000, 1024) is None and resolve_spec("IVF8,SQ8", 10, 1024) == "IVF8,SQ8"
    assert resolve_spec("auto", 1_000_000, 1024) == "PQ256x4fs" and resolve_spec("auto", 10**8, 3072) == "PQ768x4fs"
    assert resolve_spec("auto", 1_000_000, 1004) == "SQ8"


def test_merged_shards_are_the_brute_force_ends() -> None:
    from tracin_index.sharded import merge_ends, shard_ranges

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 50)).astype(np.float32)
    assert shard_ranges(50, 4) == [(0, 12), (12, 25), (25, 38), (38, 50)]
    parts = []
    for lo, hi in shard_ranges(50, 4):  # each shard's own top 7 of both ends (global ids), one shard short of rows
        part = scores[:, lo:hi]
        top = np.argsort(-part, axis=1)[:, :7]
        bottom = np.argsort(part, axis=1)[:, :7]
        parts.append((np.take_along_axis(part, top, 1), top + lo, np.take_along_axis(part, bottom, 1), bottom + lo))
    ts, ti, bs, bi = merge_ends(parts, 5, 7)
    assert np.array_equal(ti, np.argsort(-scores, axis=1)[:, :5])
    assert np.array_equal(ts, -np.sort(-scores, axis=1)[:, :5])
    assert np.array_equal(bi, np.argsort(scores, axis=1)[:, :7]) and np.array_equal(bs, np.sort(scores, axis=1)[:, :7])
    _, _, bs, bi = merge_ends(parts, 5, 30)  # more than the shards hold: the 28 they gave, in order, then none
    assert (bi[:, 28:] == -1).all() and (bi[:, :28] >= 0).all() and (np.diff(bs[:, :28], axis=1) >= 0).all()


def test_ray_shards_answer_as_one_node_and_a_dead_shard_is_retried_or_named(distmult_plain: Trained, built: Path,
                                                                             tmp_path: Path) -> None:
    """Three shards on a local Ray cluster: their merged candidates are the single-node search's (the build's
    FAISS index, or the exact scan of a build without one); a killed actor is restarted and asked again; one that
    stays dead fails the query with its shard named."""
    ray = pytest.importorskip("ray")
    from tracin_index.errors import StoreError
    from tracin_index.sharded import ShardedSearcher

    plain = tmp_path / "plain"
    build_index(load_model(distmult_plain.directory), plain, checkpoints=distmult_plain.checkpoints,
                config=BuildConfig(unit_rows=256))
    test = distmult_plain.testing[:6]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 2**20)
    try:
        for where, single in ((built, open_index(built, search="ann", nprobe=4)), (plain, open_index(plain, search="full"))):
            sharded = open_index(where, search="ray", shards=3, nprobe=4)
            assert isinstance(sharded.searcher, ShardedSearcher) and len(sharded.searcher.actors) == 3
            q, _ = single.test_rows(test)
            a, b = single.searcher.search(q, 40, 200), sharded.searcher.search(q, 40, 200)
            for (xs, xi), (ys, yi), sign in (((a[0], a[1]), (b[0], b[1]), 1), ((a[2], a[3]), (b[2], b[3]), -1)):
                assert np.allclose(xs, ys, rtol=1e-5, atol=1e-7)  # the same scores place by place
                for row in range(len(q)):  # the same rows, but where Nations' tied rows meet the cut
                    inside = sign * xs[row] > sign * xs[row, -1] + 1e-6
                    assert set(xi[row][inside]) == set(yi[row][sign * ys[row] > sign * ys[row, -1] + 1e-6])
            assert [(r.proponents, r.opponents) for r in sharded.query(test, k=5)] == [
                (r.proponents, r.opponents) for r in single.query(test, k=5)]
            if where == built:
                assert isinstance(sharded.searcher, ShardedSearcher)
                sharded.searcher.shutdown()
        with pytest.raises(StoreError, match=r"^search shard 1 \(rows 398-795\) was not loaded within 3 s: the cluster "):
            ShardedSearcher(Store.open(plain), 4, sharded.searcher, load_timeout=3)  # 3 of 4 slots are taken
        searcher = sharded.searcher
        assert isinstance(searcher, ShardedSearcher)
        want = [(r.proponents, r.opponents) for r in sharded.query(test, k=5)]
        ray.kill(searcher.actors[1], no_restart=False)  # as a lost node: Ray restarts it, the call is retried
        assert [(r.proponents, r.opponents) for r in sharded.query(test, k=5)] == want
        ray.kill(searcher.actors[2], no_restart=True)
        with pytest.raises(StoreError, match=r"^search shard 2 \(rows 1061-1591\) failed after its retries"):
            sharded.query(test, k=5)
        searcher.shutdown()
    finally:
        ray.shutdown()
