"""Query at default settings against brute force; CLI behaviour; inputs a PyKEEN user already has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tracin_index import BuildConfig, IndexMismatchError, InputError, ProjectionSpec, build_index, load_model, open_index
from tracin_index.cli import main

from .conftest import Trained, exact_ends


@pytest.fixture(scope="module")
def demo_index(conve_demo: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "idx"
    build_index(load_model(conve_demo.directory), out, checkpoints=conve_demo.checkpoints, config=BuildConfig())
    return out


@pytest.mark.slow
def test_default_settings_recover_exact_top10(conve_demo: Trained, demo_index: Path) -> None:
    """Defaults (sparse k=1024, re-rank): top-10 proponents equal brute force for >= 95% of Nations' test set."""
    index = open_index(demo_index)
    test = conve_demo.testing
    full = index.exact_influence(test)  # (201, 1592) brute force
    results = index.query(test, k=10)
    pro_hits, opp_hits = [], []
    for m, res in enumerate(results):
        top, bottom = exact_ends(full[m], 10)
        pro_hits.append([p.train_index for p in res.proponents] == top)
        opp_hits.append([o.train_index for o in res.opponents] == bottom)
    pro, opp = float(np.mean(pro_hits)), float(np.mean(opp_hits))
    print(f"\nNations ConvE d=200, sparse k=1024, re-rank: exact top-10 proponents {pro:.3f}, opponents {opp:.3f}")
    assert pro >= 0.95
    assert opp >= 0.80


def test_cli_query_json_and_table(conve_demo: Trained, demo_index: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["query", str(demo_index), "--triple", "brazil intergovorgs usa", "--top-k", "5", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["test"] == {"head": "brazil", "relation": "intergovorgs", "tail": "usa"}
    assert [p["rank"] for p in payload["proponents"]] == [1, 2, 3, 4, 5]
    index = open_index(demo_index)
    [api] = index.query("brazil intergovorgs usa", k=5)
    assert payload == api.to_dict()
    infl = [p["influence"] for p in payload["proponents"]]
    assert infl == sorted(infl, reverse=True) and all(isinstance(x, float) and x > 0 for x in infl)
    assert all(isinstance(p["head"], str) for p in payload["proponents"] + payload["opponents"])
    table = runner.invoke(main, ["query", str(demo_index), "--triple", "brazil intergovorgs usa", "--top-k", "3"])
    assert table.exit_code == 0 and "proponents" in table.output and "opponents" in table.output
    info = runner.invoke(main, ["info", str(demo_index)])
    assert info.exit_code == 0 and "interaction.hr1d.0.weight" in info.output and "interaction.hr1d.2.weight" in info.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--triple", "brazil intergovorgs atlantis"], "unknown entity 'atlantis'"),
        (["--triple", "brazil intergovorg usa"], "closest known: intergovorgs"),
        (["--triple", "brazil usa"], "has 2 parts"),
        (["--triple", "brazil intergovorgs usa", "--top-k", "0"], "--top-k 0 is out of range"),
        (["--triple", "brazil intergovorgs usa", "--loss", "ce"], "loss: index 'bce', query 'ce'"),
        (["--triple", "brazil intergovorgs usa", "--layers", "last:1"], "layers: index tracks"),
    ],
)
def test_cli_errors_are_one_line(demo_index: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(main, ["query", str(demo_index), *args])
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_python_errors_name_python_arguments(demo_index: Path) -> None:
    """The same mistakes from Python name the keyword argument, from the command line the option."""
    index = open_index(demo_index)
    with pytest.raises(InputError, match=r"^k=0 is out of range; choose 1\.\.1592 "):
        index.query("brazil intergovorgs usa", k=0)
    with pytest.raises(InputError, match=r"^opponent_candidates=0 must be at least 1$"):
        index.query("brazil intergovorgs usa", opponent_candidates=0)
    with pytest.raises(InputError, match=r"^mode='max' is unknown; choose one of dot, cosine, abs$"):
        index.query("brazil intergovorgs usa", mode="max")
    with pytest.raises(InputError, match=r"^relations='friendof' is not a relation of this index"):
        index.query("brazil intergovorgs usa", relations=["friendof"])
    res = CliRunner().invoke(main, ["query", str(demo_index), "--triple", "brazil intergovorgs usa", "--relation", "friendof"])
    assert res.exit_code == 2 and res.output.startswith("Error: --relation friendof is not a relation of this index")


def test_output_cut_short_by_its_reader_is_not_an_error(demo_index: Path) -> None:
    """``tracin-index self-influence IDX | head -1``: more output than a pipe holds, its reader gone after a line."""
    proc = subprocess.Popen([sys.executable, "-m", "tracin_index.cli", "self-influence", str(demo_index), "--top", "1592"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip().startswith("1  ")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0 and proc.stderr.read() == ""


def test_default_query_path_does_not_import_faiss(demo_index: Path) -> None:
    code = ("import sys\nfrom tracin_index import open_index\n"
            f"open_index({str(demo_index)!r}).query('brazil intergovorgs usa', k=3)\n"
            "print('faiss' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("fast", [True, False])
def test_auto_search_takes_the_int8_prefilter_only_where_int8_products_are_fast(
        demo_index: Path, fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` keeps int8 codes for the prefilter where oneDNN's int8 GEMM serves them, else scans the float32
    rows alone (``full``); the answers are the same."""
    import tracin_index.search as search
    from tracin_index import backend
    from tracin_index.int8 import fast_int8

    monkeypatch.setattr(search, "INT8_MIN_ROWS", 1)  # the demo index is below it
    monkeypatch.setattr(search, "fast_int8", lambda: fast)
    index = open_index(demo_index)
    assert index.searcher.prefilter == fast
    [got] = index.query("brazil intergovorgs usa", k=5)
    [want] = open_index(demo_index, search="full").query("brazil intergovorgs usa", k=5)
    assert [p.train_index for p in got.proponents] == [p.train_index for p in want.proponents]
    assert [o.train_index for o in got.opponents] == [o.train_index for o in want.opponents]
    backend.use("plain")
    try:
        assert not fast_int8()  # the plain backend packs nothing, so int8 products stay on int_mm
    finally:
        backend.use(None)


def test_changed_checkpoint_is_refused(conve_inverse: Trained, tmp_path: Path) -> None:
    bundle = load_model(conve_inverse.directory)
    out = tmp_path / "idx"
    build_index(bundle, out, checkpoints=conve_inverse.checkpoints, config=BuildConfig(projection=ProjectionSpec("sparse", 64)))
    path, lr = conve_inverse.checkpoints[0]
    state = torch.load(path, weights_only=True)
    state["interaction.hr1d.0.bias"] += 1e-3
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    with pytest.raises(IndexMismatchError, match="differs from the indexed one"):
        open_index(out, checkpoints=[(str(changed), lr), conve_inverse.checkpoints[1]])
    with pytest.raises(IndexMismatchError, match="projection"):
        open_index(out, projection=ProjectionSpec("gaussian", 64))
    same = [x for p, lr_ in conve_inverse.checkpoints for x in ("--checkpoint", p, "--lr", repr(lr_))]
    res = CliRunner().invoke(main, ["build", "--model", str(conve_inverse.directory), "--out", str(out), "--dim", "64", *same])
    assert res.exit_code == 0 and "is up to date" in res.output  # same inputs and settings: nothing to do
    res = CliRunner().invoke(main, ["build", "--model", str(conve_inverse.directory), "--out", str(tmp_path / "x"), "--dim", "0"])
    assert res.exit_code == 2 and "--dim 0 is out of range" in res.output and not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]


def test_auto_dimension_follows_the_rows_indexed(conve_inverse: Trained, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``dim`` unset (``--dim auto``): 1024 below ``ANN_MIN_ROWS`` indexed rows, 2048 from there, recorded in the
    store; the build equals one asked for that dimension, and an auto query projection matches it."""
    import tracin_index.projection as projection

    bundle = load_model(conve_inverse.directory)
    rows = len(bundle.triples.mapped)
    assert ProjectionSpec().for_rows(rows).dim == 1024 and ProjectionSpec(dim=64).for_rows(10**7).dim == 64
    monkeypatch.setattr(projection, "ANN_MIN_ROWS", rows // 2)  # the sample below is under it, the whole set over
    config = BuildConfig(unit_rows=400, faiss=None)
    big = build_index(bundle, tmp_path / "big", config=config)
    small = build_index(bundle, tmp_path / "small", config=BuildConfig(unit_rows=400, faiss=None, sample_rate=0.3))
    assert big.attrs["projection"]["dim"] == 2048 and small.attrs["projection"]["dim"] == 1024
    twin = build_index(bundle, tmp_path / "twin", config=BuildConfig(projection=ProjectionSpec(dim=2048), unit_rows=400,
                                                                     faiss=None))
    assert np.array_equal(np.asarray(big.array("grads")[:]), np.asarray(twin.array("grads")[:]))
    assert open_index(tmp_path / "big", model=bundle, projection=ProjectionSpec()).num_rows == rows  # auto matches 2048
    res = CliRunner().invoke(main, ["build", "--model", str(conve_inverse.directory), "--out", str(tmp_path / "x"),
                                    "--dim", "big"])
    assert res.exit_code == 2 and "'big' is not an integer or auto" in res.output and not (tmp_path / "x").exists()


def test_model_file_state_dict_and_label_tsv_inputs(conve_inverse: Trained, tmp_path: Path) -> None:
    """torch.save'd model + label TSV, and class + state dict, index exactly like the results directory."""
    ref = load_model(conve_inverse.directory)
    ent, rel = ref.triples.entity_labels, ref.triples.relation_labels
    (tmp_path / "entity_to_id.tsv").write_text("id\tlabel\n" + "".join(f"{i}\t{e}\n" for i, e in enumerate(ent)))
    (tmp_path / "relation_to_id.tsv").write_text("".join(f"{r}\t{i}\n" for i, r in enumerate(rel)))
    (tmp_path / "train.tsv").write_text(
        "".join(f"{ent[h]}\t{rel[r]}\t{ent[t]}\n" for h, r, t in ref.triples.mapped.tolist()))
    torch.save(ref.model, tmp_path / "model.pt")
    torch.save(ref.model.state_dict(), tmp_path / "state.pt")
    maps = {"triples": tmp_path / "train.tsv", "entity_to_id": tmp_path / "entity_to_id.tsv",
            "relation_to_id": tmp_path / "relation_to_id.tsv"}
    config = BuildConfig(projection=ProjectionSpec("sparse", 128, 1))
    stores = [
        build_index(ref, tmp_path / "a", config=config),
        build_index(load_model(tmp_path / "model.pt", **maps), tmp_path / "b", config=config),
        build_index(load_model(tmp_path / "state.pt", model_class="ConvE", inverse_triples=True,
                               model_kwargs={"embedding_dim": 32, "output_channels": 4}, **maps), tmp_path / "c", config=config),
    ]
    first = np.asarray(stores[0].array("grads")[:])
    for s in stores[1:]:
        assert np.array_equal(np.asarray(s.array("grads")[:]), first)
    [res] = open_index(tmp_path / "c").query("brazil intergovorgs usa", k=3)
    assert len(res.proponents) == 3
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{ent[0]}\t{rel[0]}\n")
    r = CliRunner().invoke(main, ["build", "--model", str(tmp_path / "model.pt"), "--triples", str(bad), "--entity-to-id",
                                  str(maps["entity_to_id"]), "--relation-to-id", str(maps["relation_to_id"]), "--out",
                                  str(tmp_path / "d")])
    assert r.exit_code == 2 and "line 1: expected 3 tab-separated fields" in r.output


def test_forward_order_layers_on_default_conve(conve_demo: Trained) -> None:
    from tracin_index.layers import select_parameters

    bundle = load_model(conve_demo.directory)
    names = select_parameters(bundle.model, "last:2", bundle.triples.mapped[:2])
    assert names == ["interaction.hr1d.0.weight", "interaction.hr1d.0.bias",
                     "interaction.hr1d.2.weight", "interaction.hr1d.2.bias"]
