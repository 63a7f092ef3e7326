"""pipelines/evaluate.py on a tiny run: the mechanics (files, removals, targets, ranges, resuming), not the verdict."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "pipelines" / "evaluate.py"
CONFIG = {"metadata": {"title": "tiny"}, "pipeline": {
    "dataset": "Nations", "model": "DistMult", "model_kwargs": {"embedding_dim": 16},
    "training_loop": "LCWA", "loss": "BCEWithLogitsLoss", "optimizer": "Adam", "optimizer_kwargs": {"lr": 0.05},
    "training_kwargs": {"num_epochs": 4, "batch_size": 256}, "evaluation_kwargs": {"batch_size": 512},
    "random_seed": 7}}
KEYS = ("tracin-1-0", "random-1-0", "noise-0-0")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_pipeline", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three invocations on one directory: a fresh run, a rerun, and a rerun after a simulated kill (final files
    and one run record gone)."""
    evaluate = load_script()
    root = tmp_path_factory.mktemp("evaluate")
    config = root / "config.json"
    config.write_text(json.dumps(CONFIG))
    out = root / "out"
    argv = [str(config), "--out", str(out), "--targets", "3", "--budget", "1", "--seeds", "0",
            "--methods", "tracin,random", "--checkpoints", "2", "--threads", "2"]
    first = evaluate.main(argv)
    records = {key: json.loads((out / "runs" / f"{key}.json").read_text()) for key in KEYS}
    second = evaluate.main(argv)
    for name in ("results.json", "results.md", "results.png"):
        (out / name).unlink()
    (out / "runs" / "random-1-0.json").unlink()
    third = evaluate.main(argv)
    return {"module": evaluate, "out": out, "first": first, "second": second, "third": third, "records": records}


def test_files_are_written(runs: dict[str, Any]) -> None:
    out = runs["out"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == ["| tracin", "| random", "| noise floor (other seed, nothing removed)"]
    assert "lost rank-1 | relative MRR drop | probability fell | top-1 changed" in table
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["summary"]) == ["tracin-1", "random-1", "noise-0"]
    assert saved["settings"]["methods"] == ["tracin", "random"] and saved["settings"]["seeds"] == [0]
    assert (out / "seed-0" / "model" / "trained_model.pkl").is_file()
    assert len(list((out / "seed-0" / "checkpoints").glob("*.pt"))) == 2
    assert not list((out / "runs").glob(".*"))  # no temporary file left behind


def test_removed_facts_are_absent_from_the_retrain(runs: dict[str, Any]) -> None:
    from pykeen.datasets import Nations

    training = Nations().training.mapped_triples
    bases = runs["first"]["bases"][0]
    for key in ("tracin-1-0", "random-1-0"):
        record = runs["records"][key]
        positions = [r["position"] for r in record["removed"]]
        assert positions and positions == sorted({p for chosen in record["removed_per_target"] for p in chosen})
        assert all(len(chosen) == 1 for chosen in record["removed_per_target"])  # budget 1 per target
        assert record["removed_per_target"] == bases["selections"][key.rsplit("-", 1)[0]]
        for r in record["removed"]:  # each removed fact is the training triple at its position
            assert training[r["position"]].tolist() == r["ids"]
        keep = torch.ones(len(training), dtype=torch.bool)
        keep[positions] = False
        kept = training[keep]
        assert record["training_triples"] == len(training) - len(positions)
        assert record["training_sha256"] == hashlib.sha256(kept.numpy().astype("<i8").tobytes()).hexdigest()
        assert record["removed_absent"] is True
        assert record["train_seed"] == 0
    noise = runs["records"]["noise-0-0"]
    assert noise["removed"] == [] and noise["training_triples"] == len(training) and noise["train_seed"] == 1000


def test_targets_were_ranked_first(runs: dict[str, Any]) -> None:
    from pykeen.datasets import Nations

    testing = Nations().testing.mapped_triples
    base = runs["first"]["bases"][0]
    assert len(base["targets"]) == 3 and base["before"]["rank"] == [1.0, 1.0, 1.0]
    for target, position in zip(base["targets"], base["target_test_positions"], strict=True):
        assert testing[position].tolist() == target["ids"]
    # the ranks again, from the saved model: filtered tail rank 1 among all entities
    from tracin_index import load_model

    evaluate = runs["module"]
    model = load_model(runs["out"] / "seed-0" / "model").model
    dataset = Nations()
    known = torch.cat([dataset.training.mapped_triples, dataset.validation.mapped_triples, testing])
    targets = torch.tensor([t["ids"] for t in base["targets"]])
    scores = evaluate.tail_scores(model, targets[:, :2])
    for i, (h, r, t) in enumerate(targets.tolist()):
        others = known[(known[:, 0] == h) & (known[:, 1] == r) & (known[:, 2] != t)][:, 2]
        candidates = torch.ones(scores.shape[1], dtype=torch.bool)
        candidates[others] = False
        candidates[t] = False
        assert bool((scores[i, candidates] < scores[i, t]).all())
    for record in runs["records"].values():
        assert record["before"]["rank"] == [1.0, 1.0, 1.0]


def test_metrics_are_shares(runs: dict[str, Any]) -> None:
    summary = runs["first"]["summary"]
    for entry in summary.values():
        for name in ("lost_rank1", "mrr_drop", "prob_fell", "top1_changed", "prob_sigmoid_fell"):
            assert 0.0 <= entry[name]["mean"] <= 1.0 and entry[name]["sd"] == 0.0
    for record in runs["records"].values():
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
        assert all(r >= 1 for r in record["after"]["rank"])
        assert all(0.0 < p < 1.0 for p in record["after"]["p_softmax"])
        # lost rank-1 and the MRR drop follow from the ranks as defined
        ranks = np.array(record["after"]["rank"])
        assert record["metrics"]["lost_rank1"] == pytest.approx(float((ranks > 1).mean()))
        assert record["metrics"]["mrr_drop"] == pytest.approx(1 - float((1 / ranks).mean()))


def test_a_second_invocation_retrains_nothing(runs: dict[str, Any]) -> None:
    assert runs["first"]["invocation"] | {"wall_seconds": 0} == {
        "base_trainings": 1, "retrains": 3, "reused": 0, "wall_seconds": 0}
    second = runs["second"]["invocation"]
    assert (second["base_trainings"], second["retrains"], second["reused"]) == (0, 0, 3)
    assert runs["second"]["summary"] == runs["first"]["summary"]


def test_a_killed_run_completes(runs: dict[str, Any]) -> None:
    third = runs["third"]["invocation"]
    assert (third["base_trainings"], third["retrains"], third["reused"]) == (0, 1, 2)
    out = runs["out"]
    assert all((out / name).is_file() for name in ("results.json", "results.md", "results.png"))
    redone = json.loads((out / "runs" / "random-1-0.json").read_text())
    assert redone["hash"] == runs["records"]["random-1-0"]["hash"]
    assert redone["after"] == runs["records"]["random-1-0"]["after"]  # a CPU retrain with the same seed is repeatable
    assert runs["third"]["summary"] == runs["first"]["summary"]


def test_unknown_method_is_refused(runs: dict[str, Any]) -> None:
    with pytest.raises(SystemExit):
        runs["module"].main(["nations-distmult", "--methods", "tracin,shapley"])
