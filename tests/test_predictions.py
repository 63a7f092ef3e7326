"""Explaining the model's own predictions (``h r ?``) and contrastive questions (``t`` rather than ``t2``),
against brute force: pykeen's scores of every completion, and a plain autograd loop for the margin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tracin_index import BuildConfig, InputError, ProjectionSpec, build_index, load_model, open_index, write_scores
from tracin_index.cli import main

from .conftest import Trained, exact_ends, reference_gradients


@pytest.fixture(scope="module")
def exact_index(conve_inverse: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No projection: the candidate search is exact, so every list must equal brute force."""
    out = tmp_path_factory.mktemp("predictions") / "idx"
    build_index(load_model(conve_inverse.directory), out, checkpoints=conve_inverse.checkpoints,
                config=BuildConfig(projection=ProjectionSpec("none")))
    return out


def _completions(model: Any, h: int | None, r: int, t: int | None, n_entities: int) -> torch.Tensor:
    """The trained model's score of every completion, one triple at a time, on its internal rows: a tail as
    ``(h, 2r, e)``; a head as PyKEEN predicts heads for a model trained with inverse triples, as the tail of
    the inverse triple ``(t, 2r+1, e)``."""
    assert model.use_inverse_triples
    rows = torch.tensor([[t, 2 * r + 1, e] if h is None else [h, 2 * r, e] for e in range(n_entities)])
    with torch.no_grad():
        return torch.cat([model.score_hrt(rows[i : i + 1]).reshape(-1) for i in range(len(rows))])


def test_predictions_are_the_models_filtered_ranking(conve_inverse: Trained, exact_index: Path) -> None:
    index = open_index(exact_index)
    index.query("brazil commonbloc1 india", k=3)  # the tracer now holds a checkpoint's state, not the model's
    model = load_model(conve_inverse.directory).model.eval()
    labels = index.labels
    e2i, r2i = labels.entity_to_id, labels.relation_to_id
    mapped = labels.mapped
    for question, (h, r, t) in (("brazil commonbloc1 ?", (e2i["brazil"], r2i["commonbloc1"], None)),
                                ("? embassy uk", (None, r2i["embassy"], e2i["uk"]))):
        scores = _completions(model, h, r, t, len(labels.entity_labels))
        unfiltered = torch.argsort(-scores, stable=True)[:5].tolist()
        if h is not None:
            known = mapped[(mapped[:, 0] == h) & (mapped[:, 1] == r), 2]
        else:
            known = mapped[(mapped[:, 2] == t) & (mapped[:, 1] == r), 0]
        kept = scores.clone()
        kept[known] = -torch.inf
        filtered = torch.argsort(-kept, stable=True)[:5].tolist()
        got = index.predict(question, n=5)
        assert [p["id"] for p in got] == filtered and [p["rank"] for p in got] == [1, 2, 3, 4, 5]
        assert np.allclose([p["score"] for p in got], scores[filtered].numpy(), rtol=1e-5, atol=1e-6)
        assert got[0]["target"] == ("tail" if h is not None else "head") and got[0]["question"] == question
        assert [p["id"] for p in index.predict(question, n=5, filtered=False)] == unfiltered
        assert len(known) and not set(filtered) & set(known.tolist())


def test_a_prediction_is_explained_as_its_full_triple(exact_index: Path) -> None:
    index = open_index(exact_index)
    results = index.explain_prediction("brazil commonbloc1 ?", predictions=2, k=4)
    preds = index.predict("brazil commonbloc1 ?", n=2)
    assert [r.prediction for r in results] == preds
    for res, p in zip(results, preds, strict=True):
        assert res.test == {"head": "brazil", "relation": "commonbloc1", "tail": p["label"]}
        [full] = index.query(f"brazil commonbloc1 {p['label']}", k=4)
        got, alone = res.proponents + res.opponents, full.proponents + full.opponents
        assert [i.train_index for i in got] == [i.train_index for i in alone]
        assert np.allclose([i.influence for i in got], [i.influence for i in alone], rtol=1e-5)
        assert res.to_dict()["prediction"] == p
    # questions and full triples mix in one call, in input order
    mixed = index.query(["brazil embassy uk", "? commonbloc1 india"], k=2, predictions=1)
    assert mixed[0].prediction is None and mixed[1].prediction is not None and mixed[1].test["tail"] == "india"
    with pytest.raises(InputError, match=r"^predictions=0 is out of range"):
        index.explain_prediction("brazil commonbloc1 ?", predictions=0)
    with pytest.raises(InputError, match=r"ask about the head or the tail, not both"):
        index.predict("? commonbloc1 ?")
    with pytest.raises(InputError, match=r"^question='brazil commonbloc1 india' is not"):
        index.predict("brazil commonbloc1 india")


def test_contrastive_influence_is_the_margins_autograd_truth(conve_inverse: Trained, exact_index: Path) -> None:
    """Influence on s(t) - s(t2): sum_c lr_c <grad bce(train), grad -(s(t) - s(t2))>, by a plain loop."""
    index = open_index(exact_index)
    names = [p["name"] for p in index.info()["tracked"]]
    states = [torch.load(p, weights_only=True) for p, _ in conve_inverse.checkpoints]
    lrs = [lr for _, lr in conve_inverse.checkpoints]
    model = load_model(conve_inverse.directory).model
    pair = index.parse(["brazil commonbloc1 india", "brazil commonbloc1 egypt"])
    train = reference_gradients(model, states, names, index.triples)
    test = reference_gradients(model, states, names, pair, loss="score")
    truth = sum(lr * (g @ (t[0] - t[1])) for lr, g, t in zip(lrs, train, test, strict=True))
    assert isinstance(truth, torch.Tensor)
    [res] = index.query("brazil commonbloc1 india", k=5, versus="brazil commonbloc1 egypt")
    top, bottom = exact_ends(truth, 5)
    assert [p.train_index for p in res.proponents] == top
    assert [o.train_index for o in res.opponents] == bottom
    got = np.array([i.influence for i in res.proponents + res.opponents])
    assert np.allclose(got, truth[top + bottom].numpy(), rtol=1e-3, atol=1e-7)
    assert res.versus == {"head": "brazil", "relation": "commonbloc1", "tail": "egypt"}
    with pytest.raises(InputError, match=r"^mode='cosine' has no contrastive form"):
        index.query("brazil commonbloc1 india", mode="cosine", versus="brazil commonbloc1 egypt")
    with pytest.raises(InputError, match=r"^versus holds 2 triples for 3 test triples"):
        index.query(["brazil commonbloc1 india"] * 3, versus=["brazil commonbloc1 egypt"] * 2)
    assert index.tracer.engine.loss.name == "bce"  # the index's own loss is back for the next query


def test_questions_in_a_test_file_and_on_the_command_line(exact_index: Path, tmp_path: Path) -> None:
    index = open_index(exact_index)
    test = tmp_path / "questions.tsv"
    test.write_text("brazil\tcommonbloc1\t?\nbrazil\tembassy\tuk\n?\tembassy\tuk\n")
    out = write_scores(index, test, tmp_path / "s.parquet", index.settings(3, predictions=2))
    frame = pd.read_parquet(out)
    assert list(frame.columns[8:11]) == ["question", "prediction_score", "prediction_rank"]
    first = frame[frame.test_index == 0]
    preds = index.predict("brazil commonbloc1 ?", n=2)
    assert sorted(set(first.test_tail)) == sorted(p["label"] for p in preds)
    assert set(first.question) == {"brazil commonbloc1 ?"} and set(first.prediction_rank) == {1, 2}
    assert frame[frame.test_index == 1].question.isna().all()
    assert set(frame[frame.test_index == 2].question) == {"? embassy uk"}
    assert frame.equals(index.score(test, index.settings(3, predictions=2)).to_frame()
                        .assign(prediction_rank=lambda f: f.prediction_rank.astype("float64")))

    runner = CliRunner()
    res = runner.invoke(main, ["query", str(exact_index), "--triple", "brazil commonbloc1 ?", "--top-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["prediction"]["label"] == preds[0]["label"] and payload["test"]["tail"] == preds[0]["label"]
    res = runner.invoke(main, ["query", str(exact_index), "--triple", "brazil commonbloc1 india", "--versus",
                               "brazil commonbloc1 egypt", "--top-k", "2"])
    assert res.exit_code == 0 and "versus brazil  commonbloc1  egypt" in res.output
    res = runner.invoke(main, ["query", str(exact_index), "--triple", "brazil commonbloc1 ?", "--predictions", "0"])
    assert res.exit_code == 2 and res.output.startswith("Error: --predictions 0 is out of range")


def test_results_render_as_html_tables(exact_index: Path) -> None:
    index = open_index(exact_index)
    results = index.explain_prediction("brazil commonbloc1 ?", k=2)
    html = results._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == 1 + 1 + len(results[0].proponents + results[0].opponents)
    assert "prediction 1 for brazil commonbloc1 ?" in html and results[0].proponents[0].head in html
    assert "<table" in index.self_influence(top=3)._repr_html_()


def test_a_build_hands_the_model_back_with_its_own_state(conve_inverse: Trained, exact_index: Path) -> None:
    """A build loads every checkpoint into the model; built or skipped, the caller's model keeps its state, so
    ``open_index(model=bundle)`` predicts with the trained model."""
    bundle = load_model(conve_inverse.directory)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    store = build_index(bundle, exact_index, checkpoints=conve_inverse.checkpoints,
                        config=BuildConfig(projection=ProjectionSpec("none")))
    assert store.build_report is not None and store.build_report["skipped"]
    after = bundle.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert open_index(exact_index, model=bundle).predict("brazil commonbloc1 ?", n=3) == \
        open_index(exact_index).predict("brazil commonbloc1 ?", n=3)
