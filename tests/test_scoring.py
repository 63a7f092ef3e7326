"""The query phase in full (bulk scoring, modes, filters, aggregate, sampling, one-shot run) against brute force.

Brute force here is :meth:`TracinIndex.exact_influence` over every training row (itself checked against a
per-triple autograd loop in ``test_exact.py``) or that loop directly, followed by a plain argsort.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
from tracin_index.build import sample_rows
from tracin_index.cli import main
from tracin_index.layers import select_parameters
from tracin_index.query import TracinIndex
from tracin_index.results import write_scores

from .conftest import Trained, exact_ends, reference_gradients


@pytest.fixture(scope="module")
def nations_index(conve_inverse: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scoring") / "idx"
    build_index(load_model(conve_inverse.directory), out, checkpoints=conve_inverse.checkpoints,
                config=BuildConfig(projection=ProjectionSpec("sparse", 512, 0), unit_rows=400))
    return out


@pytest.fixture(scope="module")
def index(nations_index: Path) -> TracinIndex:
    return open_index(nations_index)


def _ids(items: list) -> list[int]:
    return [i.train_index for i in items]


def test_bulk_scoring_equals_per_triple_queries(index: TracinIndex, conve_inverse: Trained) -> None:
    test = conve_inverse.testing[:40]
    bulk = index.score(test, k=5, batch_size=16)
    assert index.bulk_batch_size(40) == 40, "a small test set is one batch: each candidate's gradient once"
    calls: list[tuple[int, int]] = []
    whole = index.score(test, k=5, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (40, 40) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert any(0 < done < 40 for done, _ in calls), "progress is reported within a batch"
    assert len(bulk) == 40
    for m in range(40):
        [single] = index.query(test[m : m + 1], k=5)
        assert _ids(whole[m].proponents) == _ids(single.proponents) and _ids(whole[m].opponents) == _ids(single.opponents)
        for a, b in zip(whole[m].proponents + whole[m].opponents, single.proponents + single.opponents, strict=True):
            assert a.influence == pytest.approx(b.influence, rel=1e-5, abs=1e-9)
        assert bulk[m].test_ids == single.test_ids
        assert _ids(bulk[m].proponents) == _ids(single.proponents)
        assert _ids(bulk[m].opponents) == _ids(single.opponents)
        for a, b in zip(bulk[m].proponents + bulk[m].opponents, single.proponents + single.opponents, strict=True):
            assert a.influence == pytest.approx(b.influence, rel=1e-5, abs=1e-9)


def test_rankings_equal_brute_force_when_every_row_is_a_candidate(index: TracinIndex, conve_inverse: Trained) -> None:
    test = conve_inverse.testing[:6]
    n = index.num_rows
    full = index.exact_influence(test)  # (6, N)
    for mode in ("dot", "abs"):
        results = index.query(test, k=8, mode=mode, candidates=n)
        for m, res in enumerate(results):
            if mode == "dot":
                top, bottom = exact_ends(full[m], 8)
                assert _ids(res.proponents) == top and _ids(res.opponents) == bottom
            else:
                order = torch.argsort(full[m].abs(), descending=True)[:8].tolist()
                assert _ids(res.top) == order
                assert [i.influence for i in res.top] == pytest.approx(full[m, order].tolist(), rel=1e-5, abs=1e-9)


def test_cosine_equals_normalised_autograd_loop(index: TracinIndex, conve_inverse: Trained) -> None:
    """Cosine mode: sum_c lr_c cos(g_c(train), g_c(test)) / sum_c lr_c, from an independent autograd loop."""
    bundle = load_model(conve_inverse.directory)
    names = select_parameters(bundle.model, "last:2", bundle.triples.mapped[:2])
    states = [torch.load(p, weights_only=True) for p, _ in conve_inverse.checkpoints]
    lrs = [lr for _, lr in conve_inverse.checkpoints]
    test = conve_inverse.testing[:2]
    rows = torch.arange(0, index.num_rows, 7)
    ref_train = reference_gradients(bundle.model, states, names, bundle.triples.mapped[rows])
    ref_test = reference_gradients(bundle.model, states, names, test)
    expected = sum(
        lr * (torch.nn.functional.normalize(gt, dim=1) @ torch.nn.functional.normalize(gr, dim=1).T)
        for lr, gt, gr in zip(lrs, ref_test, ref_train, strict=True)
    ) / sum(lrs)
    assert isinstance(expected, torch.Tensor)
    assert torch.allclose(index.exact_influence(test, rows, mode="cosine"), expected, atol=2e-4)
    # the ranking over every row, with exact values, is the argsort of the brute-force cosine
    full = index.exact_influence(test, mode="cosine")
    assert float(full.abs().max()) <= 1.0 + 1e-5
    for m, res in enumerate(index.query(test, k=10, mode="cosine", candidates=index.num_rows)):
        top, bottom = exact_ends(full[m], 10)
        assert _ids(res.proponents) == top and _ids(res.opponents) == bottom
    # the default candidate retrieval (projected cosine over the stored norms) finds the exact top-10
    hits = [_ids(r.proponents) == exact_ends(full[m], 10)[0] for m, r in enumerate(index.query(test, k=10, mode="cosine"))]
    assert all(hits)


def test_filters_apply_before_the_cut(index: TracinIndex, conve_inverse: Trained) -> None:
    test = conve_inverse.testing[:8]
    triples = index.triples
    full = index.exact_influence(test)
    rel_ids = index.relation_ids(["embassy", "intergovorgs"])
    assert rel_ids is not None
    rel_ok = torch.isin(triples[:, 1], torch.tensor(rel_ids))
    for neighbourhood, relations in ((True, None), (False, ["embassy", "intergovorgs"]), (True, ["embassy", "intergovorgs"])):
        exhaustive = index.query(test, k=10, neighbourhood=neighbourhood, relations=relations, candidates=index.num_rows)
        default = index.query(test, k=10, neighbourhood=neighbourhood, relations=relations)
        for m in range(len(test)):
            h, t = int(test[m, 0]), int(test[m, 2])
            allowed = torch.ones(len(triples), dtype=torch.bool)
            if neighbourhood:
                allowed &= (triples[:, 0] == h) | (triples[:, 0] == t) | (triples[:, 2] == h) | (triples[:, 2] == t)
            if relations:
                allowed &= rel_ok
            restricted = torch.where(allowed, full[m], torch.tensor(0.0))  # disallowed rows can never be listed
            top, bottom = exact_ends(restricted, 10)
            assert _ids(exhaustive[m].proponents) == top and _ids(exhaustive[m].opponents) == bottom
            # with the default candidates the filter still comes before the cut: full lists of allowed rows
            assert all(bool(allowed[i]) for i in _ids(default[m].proponents) + _ids(default[m].opponents))
            assert len(default[m].proponents) == len(top)
            assert _ids(default[m].proponents) == top


def test_aggregate_equals_summed_brute_force(index: TracinIndex, conve_inverse: Trained) -> None:
    test = conve_inverse.testing[:30]
    total = index.exact_influence(test).sum(0)
    agg = index.aggregate(test, k=10, candidates=index.num_rows, batch_size=7)
    top, bottom = exact_ends(total, 10)
    assert agg.num_test == 30
    assert _ids(agg.proponents) == top and _ids(agg.opponents) == bottom
    assert [p.influence for p in agg.proponents] == pytest.approx(total[top].tolist(), rel=1e-4)
    default = index.aggregate(test, k=10, batch_size=7)
    assert _ids(default.proponents) == top


def _kill_after_parts(cmd: list[str], parts: Path, count: int) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and len(list(parts.glob("part-*"))) >= count:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_bulk_run_resumes_to_the_same_bytes(index: TracinIndex, nations_index: Path, conve_inverse: Trained,
                                                   tmp_path: Path) -> None:
    settings = index.settings(5)
    unbroken = write_scores(index, conve_inverse.testing, tmp_path / "unbroken.jsonl", settings, batch_size=16)
    out = tmp_path / "resumed.jsonl"
    # the same thread count as this process (conftest): GEMMs split over other thread counts may round the last bit
    # of a re-ranked value differently, which is not what this test is about
    cmd = [sys.executable, "-m", "tracin_index.cli", "score", str(nations_index), "--test", "pykeen:nations",
           "--out", str(out), "--top-k", "5", "--batch-size", "16", "--threads", "2"]
    parts = tmp_path / ".resumed.jsonl.parts"
    _kill_after_parts(cmd, parts, 3)
    assert not out.exists(), "a killed run must not leave a results file"
    done = len(list(parts.glob("part-*")))
    assert 3 <= done < 13
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    assert out.read_bytes() == unbroken.read_bytes()
    assert not parts.exists()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {x["test_index"] for x in lines} == set(range(len(conve_inverse.testing)))


def test_interrupted_parquet_run_resumes_to_the_same_bytes(index: TracinIndex, conve_inverse: Trained, tmp_path: Path) -> None:
    settings = index.settings(3, mode="cosine")
    test = conve_inverse.testing[:50]
    unbroken = write_scores(index, test, tmp_path / "a.parquet", settings, batch_size=8)

    class Stop(Exception):
        pass

    def stop_after_three(done: int, total: int) -> None:
        if done >= 24:
            raise Stop

    out = tmp_path / "b.parquet"
    with pytest.raises(Stop):
        write_scores(index, test, out, settings, batch_size=8, progress=stop_after_three)
    assert not out.exists()
    write_scores(index, test, out, settings, batch_size=8)
    assert out.read_bytes() == unbroken.read_bytes()
    frame = pd.read_parquet(out)
    api = index.score(test, settings, batch_size=50).to_frame()
    pd.testing.assert_frame_equal(frame, api, check_exact=False, rtol=1e-5)
    assert list(frame.columns)[:3] == ["test_index", "test_head", "test_relation"]
    # other settings do not resume someone else's parts
    logs: list[str] = []
    with pytest.raises(Stop):
        write_scores(index, test, tmp_path / "c.parquet", settings, batch_size=8, progress=stop_after_three)
    write_scores(index, test, tmp_path / "c.parquet", index.settings(4), batch_size=8, log=logs.append)
    assert any("discarding" in msg for msg in logs)
    assert pd.read_parquet(tmp_path / "c.parquet")["rank"].max() == 4


def test_sampled_index_records_its_rows(conve_inverse: Trained, index: TracinIndex, tmp_path: Path) -> None:
    bundle = load_model(conve_inverse.directory)
    mapped = bundle.triples.mapped
    keep = sample_rows(mapped, 0.2, "relation", 3)
    assert np.array_equal(keep, sample_rows(mapped, 0.2, "relation", 3))
    rel = mapped[:, 1].numpy()
    for r in np.unique(rel):
        n_r = int((rel == r).sum())
        assert int((rel[keep] == r).sum()) == max(1, round(0.2 * n_r))
    config = BuildConfig(projection=ProjectionSpec("sparse", 512, 0), sample_rate=0.2, sample_seed=3)
    store = build_index(bundle, tmp_path / "s", checkpoints=conve_inverse.checkpoints, config=config)
    assert np.array_equal(np.asarray(store.array("train_index")[:]), keep)
    assert store.attrs["sample"] == {"rate": 0.2, "stratify": "relation", "seed": 3}
    assert store.attrs["num_train"] == len(mapped) and store.num_rows == len(keep)
    sampled = open_index(tmp_path / "s")
    test = conve_inverse.testing[:5]
    full = index.exact_influence(test)  # the full index's exact values, by training position
    for m, res in enumerate(sampled.query(test, k=5, candidates=len(keep))):
        top, _ = exact_ends(torch.where(torch.isin(torch.arange(len(mapped)), torch.from_numpy(keep)), full[m], 0.0), 5)
        assert _ids(res.proponents) == top
        for p in res.proponents:
            assert p.influence == pytest.approx(float(full[m, p.train_index]), rel=1e-5)
            assert (p.head_id, p.relation_id, p.tail_id) == tuple(mapped[p.train_index].tolist())
    r = CliRunner().invoke(main, ["build", "--model", str(conve_inverse.directory), "--out", str(tmp_path / "x"),
                                  "--sample-rate", "1.5"])
    assert r.exit_code == 2 and "--sample-rate 1.5 is out of range" in r.output


def test_cli_score_self_influence_and_frames(index: TracinIndex, nations_index: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    tsv = tmp_path / "test.tsv"
    tsv.write_text("brazil\tembassy\tuk\nusa\tintergovorgs\tuk\nbrazil\tcommonbloc1\tindia\n")
    out = tmp_path / "r.jsonl"
    res = runner.invoke(main, ["score", str(nations_index), "--test", str(tsv), "--out", str(out), "--top-k", "4",
                               "--mode", "abs", "--test-indices", "0,2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["test_index"] for r in rows} == {0, 2} and {r["kind"] for r in rows} == {"top"}
    api = index.query(["brazil embassy uk", "brazil commonbloc1 india"], k=4, mode="abs")
    assert [r["train_index"] for r in rows] == [i.train_index for res_ in api for i in res_.top]
    again = runner.invoke(main, ["score", str(nations_index), "--test", str(tsv), "--out", str(out)])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    agg = tmp_path / "agg.parquet"
    res = runner.invoke(main, ["score", str(nations_index), "--test", "pykeen:nations", "--out", str(agg), "--aggregate"])
    assert res.exit_code == 0, res.output
    frame = pd.read_parquet(agg)
    expected = index.aggregate("pykeen:nations", k=10).to_frame()
    pd.testing.assert_frame_equal(frame, expected, check_exact=False, rtol=1e-5)
    assert set(frame["kind"]) <= {"proponent", "opponent"} and len(frame) >= 10
    # self-influence: the stored exact values sorted by a plain argsort
    res = runner.invoke(main, ["self-influence", str(nations_index), "--top", "5", "--json"])
    assert res.exit_code == 0, res.output
    stored = np.asarray(index.store.array("self_influence")[:], dtype=np.float64)
    assert [x["train_index"] for x in json.loads(res.output)] == np.argsort(-stored, kind="stable")[:5].tolist()
    every = tmp_path / "all.jsonl"
    res = runner.invoke(main, ["self-influence", str(nations_index), "--out", str(every)])  # no --top: all rows written
    assert res.exit_code == 0, res.output
    assert len(every.read_text().splitlines()) == index.num_rows and "more (--top N" in res.output
    assert [json.loads(x)["train_index"] for x in every.read_text().splitlines()][:5] == \
        np.argsort(-stored, kind="stable")[:5].tolist()
    ranking = index.self_influence()
    assert len(ranking) == index.num_rows and ranking.to_frame()["influence"].is_monotonic_decreasing
    frame = index.query(["brazil embassy uk", "usa intergovorgs uk"], k=3).to_frame()
    assert set(frame["kind"]) == {"proponent", "opponent"} and frame["test_index"].tolist()[0] == 0
    assert frame.dtypes["influence"] == np.float64 and frame.dtypes["train_index"] == np.int64


@pytest.mark.parametrize(
    ("overrides", "extra", "message"),
    [
        ({}, ["--mode", "sum"], "Invalid value for '--mode'"),
        ({}, ["--relation", "embasy"], "closest known: embassy"),
        ({"--out": "r.csv"}, [], "use .parquet or .jsonl"),
        ({"--test": "missing.tsv"}, [], "not found"),
        ({"--test": "pykeen:nowhere"}, [], "pykeen has no dataset 'nowhere'"),
        ({}, ["--test-indices", "0,999"], "--test-indices 999: out of range"),
        ({}, ["--aggregate", "--neighbourhood"], "cannot be combined with --aggregate"),
        ({}, ["--candidates", "0"], "--candidates 0 must be at least 1"),
    ],
)
def test_score_errors_are_one_line(nations_index: Path, tmp_path: Path, overrides: dict[str, str], extra: list[str],
                                   message: str) -> None:
    (tmp_path / "t.tsv").write_text("brazil\tembassy\tuk\n")
    options = {"--test": "t.tsv", "--out": "r.jsonl", **overrides}
    paths = {k: v if v.startswith("pykeen:") else str(tmp_path / v) for k, v in options.items()}
    res = CliRunner().invoke(main, ["score", str(nations_index), *[x for kv in paths.items() for x in kv], *extra])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not list(tmp_path.glob("r.*")) and not list(tmp_path.glob(".r.*"))


def test_one_shot_run_with_the_earlier_tools_options(conve_inverse: Trained, tmp_path: Path) -> None:
    ref = load_model(conve_inverse.directory)
    ent, rel = ref.triples.entity_labels, ref.triples.relation_labels
    (tmp_path / "entity_to_id.tsv").write_text("".join(f"{e}\t{i}\n" for i, e in enumerate(ent)))
    (tmp_path / "relation_to_id.tsv").write_text("".join(f"{r}\t{i}\n" for i, r in enumerate(rel)))
    (tmp_path / "train.txt").write_text("".join(f"{ent[h]}\t{rel[r]}\t{ent[t]}\n" for h, r, t in ref.triples.mapped.tolist()))
    test = conve_inverse.testing[:4].tolist()
    (tmp_path / "test.txt").write_text("".join(f"{ent[h]}\t{rel[r]}\t{ent[t]}\n" for h, r, t in test))
    torch.save(ref.model, tmp_path / "trained_model.pt")
    args = ["run", "--model-path", str(tmp_path / "trained_model.pt"), "--train", str(tmp_path / "train.txt"),
            "--test", str(tmp_path / "test.txt"), "--entity-to-id", str(tmp_path / "entity_to_id.tsv"),
            "--relation-to-id", str(tmp_path / "relation_to_id.tsv"), "--output", str(tmp_path / "results.json"),
            "--use-last-layers-only", "--num-last-layers", "2", "--learning-rate", "0.01", "--mode", "single",
            "--test-indices", "1", "3", "--index", str(tmp_path / "kept")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [p["test_index"] for p in payload] == [1, 3]
    # the same answer from the two-phase API: build (model itself, lr 0.01), query
    bundle = load_model(tmp_path / "trained_model.pt", triples=tmp_path / "train.txt",
                        entity_to_id=tmp_path / "entity_to_id.tsv", relation_to_id=tmp_path / "relation_to_id.tsv")
    build_index(bundle, tmp_path / "api", checkpoints=[(str(tmp_path / "trained_model.pt"), 0.01)],
                config=BuildConfig(layers="last:2"))
    api = open_index(tmp_path / "api").query([test[1], test[3]], k=10)
    assert [{k: v for k, v in p.items() if k != "test_index"} for p in payload] == [r.to_dict() for r in api]
    # reusing the kept index (no rebuild), with names given the argparse way, and a mismatching layer choice refused
    again = CliRunner().invoke(main, [*args[:-2], "--index", str(tmp_path / "kept"), "--overwrite"])
    assert again.exit_code == 0, again.output
    names = ["--last-layer-names", "interaction.hr1d.0.weight", "interaction.hr1d.0.bias"]
    bad = CliRunner().invoke(main, [*args, *names, "--overwrite"])
    assert bad.exit_code == 2 and "layers: index tracks" in bad.output
    unknown = CliRunner().invoke(main, [*args[:-2], "--last-layer-names", "interaction.linear.weight",
                                        "--output", str(tmp_path / "x.json")])
    assert unknown.exit_code == 2 and "interaction.linear.weight" in unknown.output
    assert not (tmp_path / "x.json").exists()


def test_torch_search_backend_equals_faiss(nations_index: Path, index: TracinIndex, conve_inverse: Trained) -> None:
    """The default blocked scan gives FAISS's answers, with every option."""
    scan_index = index
    index = open_index(nations_index, search="faiss")
    assert scan_index.searcher.backend == "torch-cpu" and index.searcher.backend == "faiss-cpu"
    test = conve_inverse.testing[:12]
    for kwargs in ({}, {"rerank": False}, {"mode": "cosine"}, {"neighbourhood": True}):
        a = index.query(test, k=5, **kwargs)  # type: ignore[arg-type]
        b = scan_index.query(test, k=5, **kwargs)  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True):
            assert _ids(x.proponents) == _ids(y.proponents) and _ids(x.opponents) == _ids(y.opponents)
            for p, r in zip(x.proponents + x.opponents, y.proponents + y.opponents, strict=True):
                assert p.influence == pytest.approx(r.influence, rel=1e-4, abs=1e-7)
