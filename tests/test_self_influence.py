"""Self-influence finds mislabelled triples: UMLS with 5% of training tails flipped, a small ConvE.

The full-size study (more settings, the loss baseline) is ``benchmarks/bench_self_influence.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tracin_index import BuildConfig, build_index, load_model, open_index
from tracin_index.callbacks import TracinCheckpoint, find_checkpoints
from tracin_index.cli import main

from .metrics import flip_tails, precision_at, roc_auc

EPOCHS = 8


@dataclass
class Noisy:
    index: Path
    flipped: np.ndarray  # (N,) bool by training position: the tail was flipped


@pytest.fixture(scope="module")
def noisy_umls(tmp_path_factory: pytest.TempPathFactory) -> Noisy:
    from pykeen.datasets import UMLS
    from pykeen.pipeline import pipeline
    from pykeen.triples import TriplesFactory

    root = tmp_path_factory.mktemp("noisy_umls")
    ds = UMLS(create_inverse_triples=True)
    clean = ds.training
    assert ds.validation is not None
    known = torch.cat([ds.validation.mapped_triples, ds.testing.mapped_triples])
    noisy, flipped = flip_tails(clean.mapped_triples, 0.05, clean.num_entities, seed=0, forbidden=known)
    existing = {tuple(row) for row in torch.cat([clean.mapped_triples, known]).tolist()}
    changed = noisy[torch.from_numpy(flipped)].tolist()
    assert len(flipped) == 261 and len({tuple(row) for row in changed}) == 261
    assert not existing & {tuple(row) for row in changed}
    assert torch.equal(torch.from_numpy(np.delete(noisy.numpy(), flipped, 0)),
                       torch.from_numpy(np.delete(clean.mapped_triples.numpy(), flipped, 0)))
    training = TriplesFactory(mapped_triples=noisy, entity_to_id=clean.entity_to_id,
                              relation_to_id=clean.relation_to_id, create_inverse_triples=True)
    result = pipeline(
        training=training,
        testing=ds.testing.clone_and_exchange_triples(ds.testing.mapped_triples[:100]),  # evaluation is not under test
        model="ConvE",
        model_kwargs={"embedding_dim": 32, "output_channels": 4},
        training_loop="LCWA",
        loss="BCEAfterSigmoid",
        optimizer="Adam",
        optimizer_kwargs={"lr": 0.02},
        lr_scheduler="ExponentialLR",
        lr_scheduler_kwargs={"gamma": 0.95},
        training_kwargs={"num_epochs": EPOCHS, "batch_size": 128, "use_tqdm": False,
                         "callbacks": [TracinCheckpoint(root / "ckpt", frequency=EPOCHS // 2)]},
        evaluation_kwargs={"batch_size": 512, "use_tqdm": False},
        random_seed=0,
        device="cpu",
    )
    result.save_to_directory(root / "run")
    bundle = load_model(root / "run")
    # the saved training triples keep the order they were given in
    assert torch.equal(bundle.triples.mapped, noisy)
    ckpts = find_checkpoints(root / "ckpt")
    assert [Path(p).name for p, _ in ckpts] == [f"epoch_{EPOCHS // 2:05d}.pt", f"epoch_{EPOCHS:05d}.pt"]
    build_index(bundle, root / "idx", checkpoints=ckpts[-1:], config=BuildConfig(layers="last:2", loss="bce"))
    labels = np.zeros(len(noisy), dtype=bool)
    labels[flipped] = True
    return Noisy(root / "idx", labels)


def test_roc_auc_matches_pairwise_count() -> None:
    """The rank-based AUC equals the definition: P(score_pos > score_neg) + P(tie) / 2, counted over all pairs."""
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(scores, labels) == pytest.approx(pairs, abs=1e-12)
    assert roc_auc(np.arange(4.0), np.array([False, False, True, True])) == 1.0
    assert roc_auc(np.ones(4), np.array([False, True, False, True])) == 0.5


def test_self_influence_detects_flipped_tails(noisy_umls: Noisy) -> None:
    ranking = open_index(noisy_umls.index).self_influence()
    order = np.array([item.train_index for item in ranking])
    assert sorted(order.tolist()) == list(range(len(noisy_umls.flipped)))
    scores = np.empty(len(order))
    scores[order] = [item.influence for item in ranking]
    auc = roc_auc(scores, noisy_umls.flipped)
    precision = precision_at(order, noisy_umls.flipped, 0.05)
    random_auc = roc_auc(np.random.default_rng(0).random(len(order)), noisy_umls.flipped)
    print(f"\nself-influence AUC {auc:.3f}, P@5% {precision:.3f} (random ranking: AUC {random_auc:.3f})")
    # thresholds well above chance (AUC 0.5, P@5% 0.05) with a margin for run-to-run differences in training
    assert auc > 0.7
    assert precision > 0.10
    assert abs(random_auc - 0.5) < 0.05


def test_ranking_is_brute_force_sort_of_stored_values(noisy_umls: Noisy) -> None:
    import zarr

    from tracin_index.store import resolve

    build = resolve(noisy_umls.index)  # the published build directory (read here with zarr directly)
    values = np.asarray(zarr.open_array(build / "self_influence", mode="r")[:], dtype=np.float64)
    train_index = np.asarray(zarr.open_array(build / "train_index", mode="r")[:], dtype=np.int64)
    ranking = open_index(noisy_umls.index).self_influence()
    got = np.array([item.influence for item in ranking])
    assert np.all(np.diff(got) <= 0)
    expected = np.argsort(-values, kind="stable")  # rows are stored by training position: ties stay in that order
    assert [item.train_index for item in ranking] == train_index[expected].tolist()
    np.testing.assert_array_equal(got, values[expected])
    assert [item.rank for item in ranking] == list(range(1, len(values) + 1))


def test_self_influence_is_exact_influence_on_itself(noisy_umls: Noisy) -> None:
    index = open_index(noisy_umls.index)
    ranking = index.self_influence()
    rows = [ranking[0].train_index, ranking[1].train_index, int(np.flatnonzero(noisy_umls.flipped)[0]),
            ranking[len(ranking) // 2].train_index, ranking[-1].train_index]
    stored = {item.train_index: item.influence for item in ranking}
    triples = index.triples[torch.tensor(rows)]
    # a full (unsampled) index: row position == training position
    exact = index.exact_influence(triples, rows=np.array(rows)).double().numpy()  # (5, 5) test x train
    np.testing.assert_allclose(np.diag(exact), [stored[r] for r in rows], rtol=1e-4)


def test_cli_self_influence_top5_equals_api(noisy_umls: Noisy) -> None:
    res = CliRunner().invoke(main, ["self-influence", str(noisy_umls.index), "--top", "5", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    api = open_index(noisy_umls.index).self_influence(top=5)
    assert [p["train_index"] for p in payload] == [item.train_index for item in api]
    assert [p["influence"] for p in payload] == [item.influence for item in api]
    assert [p["rank"] for p in payload] == [1, 2, 3, 4, 5]
    assert [(p["head"], p["relation"], p["tail"]) for p in payload] == [(i.head, i.relation, i.tail) for i in api]
