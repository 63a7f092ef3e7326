"""Distributed builds: shards (any scheduler's array job), finalize, and the Ray executor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model
from tracin_index.build import build_shard, finalize_build, prepare_build, shard_units
from tracin_index.errors import InputError, StoreError
from tracin_index.search import scan
from tracin_index.store import Store, resolve

from .conftest import Trained

ARRAYS = ("grads", "triples", "train_index", "self_influence", "norms", "done", "entity_labels", "relation_labels")
CLI = [sys.executable, "-m", "tracin_index.cli"]
CONFIG = BuildConfig(projection=ProjectionSpec("sparse", 256, 0), unit_rows=64, batch_size=32)


def _array_bytes(build: Path) -> dict[str, bytes]:
    """Every file of every array (chunks and metadata), keyed by relative path: byte identity of the arrays."""
    return {str(f.relative_to(build)): f.read_bytes()
            for name in ARRAYS for f in sorted((build / name).rglob("*")) if f.is_file()}


def _cli(trained: Trained, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, "build", "--model", str(trained.directory), "--out", str(out), "--dim", "256", "--unit-rows", "64",
           "--batch-size", "32", "--threads", "1"]
    for path, lr in trained.checkpoints:
        cmd += ["--checkpoint", path, "--lr", repr(lr)]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def single(conve_inverse: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-process build with the same settings as the distributed ones."""
    out = tmp_path_factory.mktemp("dist") / "single"
    build_index(load_model(conve_inverse.directory), out, checkpoints=conve_inverse.checkpoints, config=CONFIG)
    return out


def test_shard_units_cover_every_unit_once() -> None:
    for units in (1, 7, 25, 100):
        for n in (1, 2, 3, 8, 30):
            parts = [shard_units(units, i, n) for i in range(n)]
            assert sorted(u for p in parts for u in p) == list(range(units))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
def test_shards_as_an_array_job_equal_a_single_build(conve_inverse: Trained, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    bundle = load_model(conve_inverse.directory)
    ckpts = conve_inverse.checkpoints

    with pytest.raises(StoreError, match="no prepared build"):
        build_shard(bundle, out, (0, 3), checkpoints=ckpts, config=CONFIG)
    store = prepare_build(bundle, out, checkpoints=ckpts, config=CONFIG)
    attrs_file = store.path / "zarr.json"
    attrs_before = attrs_file.read_bytes()
    assert not store.done().any(), "the coordinator computes nothing"

    # shards 0 and 2 run at once, in two processes (as an array job would)
    procs = [_cli_popen(conve_inverse, out, "--shard", f"{i}/3") for i in (0, 2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with pytest.raises(StoreError, match=r"write units are not done \(first: unit 8\)"):
        finalize_build(out)
    assert not (out / "LATEST").exists()

    with pytest.raises(InputError, match="other inputs or settings"):
        build_shard(bundle, out, (1, 3), checkpoints=ckpts, config=BuildConfig(projection=ProjectionSpec("sparse", 128, 0),
                                                                                unit_rows=64, batch_size=32))
    report = build_shard(bundle, out, (1, 3), checkpoints=ckpts, config=CONFIG)
    assert report["units"] == shard_units(25, 1, 3) and report["units_computed"] == len(report["units"])
    chunks = _array_bytes(store.path)
    again = build_shard(bundle, out, (1, 3), checkpoints=ckpts, config=CONFIG)
    assert again["units_computed"] == 0, "a finished shard does nothing when re-run"
    assert _array_bytes(store.path) == chunks
    assert attrs_file.read_bytes() == attrs_before, "shards never touch the store's attributes"

    res = subprocess.run([*CLI, "finalize", str(out)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert resolve(out) == store.path
    assert _array_bytes(resolve(out)) == _array_bytes(resolve(single))
    assert not (out / "PREPARED").exists()
    # after publication a late or repeated shard is a no-op too
    assert build_shard(bundle, out, (2, 3), checkpoints=ckpts, config=CONFIG)["units_computed"] == 0


def _cli_popen(trained: Trained, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [*CLI, "build", "--model", str(trained.directory), "--out", str(out), "--dim", "256", "--unit-rows", "64",
           "--batch-size", "32", "--threads", "1"]
    for path, lr in trained.checkpoints:
        cmd += ["--checkpoint", path, "--lr", repr(lr)]
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_shard_flags_are_checked_in_one_line(conve_inverse: Trained, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    for extra, message in [(("--shard", "3/3"), "need 0 <= i < n"), (("--shard", "x"), "is not i/n"),
                           (("--shard", "0/2", "--prepare"), "exclude each other"),
                           (("--workers", "2"), "need --executor ray"),
                           (("--shard", "0/2"), "no prepared build")]:
        res = _cli(conve_inverse, out, *extra)
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not out.exists() or not any((out / "builds").glob("*")) if (out / "builds").exists() else True


@pytest.mark.slow
def test_ray_build_equals_a_single_build_even_when_workers_die(conve_inverse: Trained, single: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from tracin_index.distributed import ray_build

    out = tmp_path / "idx"
    bundle = load_model(conve_inverse.directory)
    lines: list[str] = []
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 2**20)
    try:
        # fake GPUs: one per actor, as on a GPU node; the model itself runs on the CPU here
        store = ray_build(bundle, out, checkpoints=conve_inverse.checkpoints, config=CONFIG, workers=2,
                          gpus_per_worker=1, shards=4, log=lines.append, _die_after_units=2)
        assert any("worker died; requeued" in line for line in lines), lines
        assert store.path == resolve(out)
        assert _array_bytes(resolve(out)) == _array_bytes(resolve(single))
        assert Store.open(out).attrs["status"] == "complete"
        lines.clear()
        again = ray_build(bundle, out, checkpoints=conve_inverse.checkpoints, config=CONFIG, workers=2, gpus_per_worker=1,
                          log=lines.append)
        assert again.path == store.path and any("up to date" in line for line in lines)
    finally:
        ray.shutdown()
    assert np.array_equal(Store.open(out).read("grads"), Store.open(single).read("grads"))


def test_streaming_search_over_a_store_larger_than_its_memory_cap(conve_inverse: Trained, tmp_path: Path) -> None:
    """Exact search block by block from the store: same answers as the in-memory index, a fraction of its memory."""
    import tracemalloc

    from tracin_index import open_index

    bundle = load_model(conve_inverse.directory)
    single = tmp_path / "wide"  # 26 MB of rows: k=4096 x 2 checkpoints
    build_index(bundle, single, checkpoints=conve_inverse.checkpoints,
                config=BuildConfig(projection=ProjectionSpec("sparse", 4096, 0), unit_rows=16, batch_size=256))
    grads_bytes = Store.open(single).num_rows * int(Store.open(single).attrs["width"]) * 2
    cap = grads_bytes // 16  # far below the store: the search may hold 1/16 of the rows at a time
    tests = conve_inverse.testing[:12]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        streamed = open_index(single, model=bundle, search="stream", memory=cap)
        assert streamed.searcher.backend == "stream"
        got = [streamed.query(tests, k=10, candidates=40, opponent_candidates=80, rerank=rerank, mode=mode)
               for rerank in (True, False) for mode in ("dot", "cosine")]
        peak_stream = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        in_memory = open_index(single, model=bundle, search="faiss")
        want = [in_memory.query(tests, k=10, candidates=40, opponent_candidates=80, rerank=rerank, mode=mode)
                for rerank in (True, False) for mode in ("dot", "cosine")]
        peak_faiss = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    for g_res, w_res in zip(got, want, strict=True):
        for g, w in zip(g_res, w_res, strict=True):
            for end in ("proponents", "opponents"):
                gi, wi = getattr(g, end), getattr(w, end)
                assert [i.train_index for i in gi] == [i.train_index for i in wi]
                np.testing.assert_allclose([i.influence for i in gi], [i.influence for i in wi], rtol=1e-5, atol=1e-7)
    assert peak_stream < grads_bytes / 4, (peak_stream, grads_bytes)
    # many queries under a small cap: the scores are bounded too, by searching in chunks of queries
    tiny = open_index(single, model=bundle, search="stream", memory=grads_bytes // 1024).searcher
    many = np.random.default_rng(0).standard_normal((300, tiny.width)).astype(np.float32)
    assert tiny.query_chunk < len(many)  # type: ignore[attr-defined]
    everything = np.concatenate([rows for _, rows in Store.open(single).iter_rows()])
    for a, b in zip(tiny.search(many, 7, 9), scan(everything, many, 7, 9), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert peak_faiss > grads_bytes, (peak_faiss, grads_bytes)  # the in-memory index holds every row (as float32)
    # the CLI takes the cap as a size
    from click.testing import CliRunner

    from tracin_index.cli import main

    res = CliRunner().invoke(main, ["query", str(single), "--triple", " ".join(bundle.triples.entity_labels[i] if k != 1
                                    else bundle.triples.relation_labels[i] for k, i in enumerate(tests[0].tolist())),
                                    "--search", "stream", "--memory", "64KB", "--json"])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(main, ["query", str(single), "--triple", "a b c", "--memory", "lots"])
    assert bad.exit_code == 2 and "is not a size" in bad.output
