"""Every model family of PyKEEN's resolver against the plain autograd loop (conftest's ``reference_gradients``).

Each family that trains on Nations is trained once per session (tiny dims, 1 epoch, LCWA + BCEWithLogits) and built
with ``--layers last:2`` (sparse projection) and ``all`` (sparse, and ``none`` where the flat gradient is at most
200k numbers); exact influences (``exact_influence`` and the re-ranked query values) must equal the loop at 1e-4
relative (of the larger of the product and 1% of ``|g_test| |g_train|``: float32 cancellation is relative to the
norms). ``EXPECTED`` says what each (family, layers) gives: exact values, or a one-line refusal naming the reason.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tracin_index import BuildConfig, ProjectionSpec, TracinError, build_index, load_model, open_index
from tracin_index.layers import select_parameters
from tracin_index.model import ModelBundle

from .conftest import reference_gradients

# families that cannot be trained on Nations (the test below checks this plus the tested ones cover the resolver)
SKIPPED: dict[str, str] = {
    "complexliteral": "LiteralModel: needs numeric literals (TriplesNumericLiteralsFactory); Nations has none",
    "distmultliteral": "LiteralModel: needs numeric literals (TriplesNumericLiteralsFactory); Nations has none",
    "distmultliteralgated": "LiteralModel: needs numeric literals (TriplesNumericLiteralsFactory); Nations has none",
    "inductivenodepiece": "inductive: needs a separate inference_factory graph; Nations is transductive",
    "inductivenodepiecegnn": "inductive: needs a separate inference_factory graph; Nations is transductive",
    "fixed": "FixedModel: no parameter enters the score (only a dummy for the optimizer); nothing to attribute",
}

KWARGS: dict[str, dict[str, Any]] = {
    "conve": {"embedding_dim": 16, "output_channels": 2},
    "convkb": {"embedding_dim": 8, "num_filters": 2},
    "cp": {"embedding_dim": 8, "rank": 4},
    "ermlp": {"embedding_dim": 8, "hidden_dim": 8},
    "ermlpe": {"embedding_dim": 8, "hidden_dim": 8},
    "ntn": {"embedding_dim": 8, "num_slices": 2},
    "transd": {"embedding_dim": 8, "relation_dim": 8},
    "transr": {"embedding_dim": 8, "relation_dim": 8},
    "tucker": {"embedding_dim": 8, "relation_dim": 8},
    "rgcn": {"embedding_dim": 8, "num_layers": 1},
}
INVERSE = {"compgcn", "nodepiece"}  # pykeen requires inverse triples for these
LOSS = {"rescal": "score"}  # RESCAL's BCE saturates (scores >100 at larger dims): sigmoid(-s) underflows to 0
TRAIN_ROWS = 160  # index the first rows of Nations' training set only (the model is trained on all of them)
N_TEST = 2
NONE_LIMIT = 200_000

from pykeen.models import model_resolver  # noqa: E402

FAMILIES = sorted(n for n in model_resolver.lookup_dict if n not in SKIPPED)

# TARGET behaviour. "exact" wherever hooks or a per-triple torch.func fallback can compute the gradient (modules
# called with kwargs or several times per forward, parameters used outside a per-row forward, GNN encoders with an
# eval-mode representation cache); "refused: <substring>" where the package must raise a one-line TracinError.
EXPECTED: dict[tuple[str, str], str] = {(f, layers): "exact" for f in FAMILIES for layers in ("last:2", "all")}
EXPECTED.update({
    ("um", "last:2"): "refused: between 1 and 1",  # one parameterised layer (the entity table)
    ("nodepiece", "last:2"): "refused: between 1 and 1",  # one parameterised layer (the token vocabulary)
})

def _uncached(model: Any) -> Any:
    """A copy whose GNN encoders (RGCN, CompGCN) recompute their representations on every call, with gradients."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "enriched_embeddings"):  # RGCNRepresentation
            mod.enriched_embeddings = None
            mod.cache = False
        if hasattr(mod, "enriched_representations"):  # CombinedCompGCNRepresentations

            def clear(module: Any, _args: Any) -> None:
                module.enriched_representations = None

            mod.enriched_representations = None
            mod.register_forward_pre_hook(clear)
    return m


def _train(name: str, root: Path) -> tuple[ModelBundle, torch.Tensor]:
    from pykeen.datasets import Nations
    from pykeen.training import LCWATrainingLoop
    from pykeen.triples import TriplesFactory

    ds = Nations(create_inverse_triples=name in INVERSE)
    tf = ds.training
    kwargs = {"embedding_dim": 8, **KWARGS.get(name, {}), "loss": "BCEWithLogits"}
    torch.manual_seed(0)
    model = model_resolver.make(name, kwargs, triples_factory=tf, random_seed=0)
    loop = LCWATrainingLoop(model=model, triples_factory=tf, optimizer="Adam", optimizer_kwargs={"lr": 0.01})
    loop.train(triples_factory=tf, num_epochs=1, batch_size=256, use_tqdm=False)
    # saved as a pykeen results directory (the index reopens the model from it), with the first TRAIN_ROWS
    # training triples as the indexed set
    out = root / name
    out.mkdir(parents=True)
    torch.save(model, out / "trained_model.pkl")
    TriplesFactory(mapped_triples=tf.mapped_triples[:TRAIN_ROWS], entity_to_id=tf.entity_to_id,
                   relation_to_id=tf.relation_to_id,
                   create_inverse_triples=name in INVERSE).to_path_binary(out / "training_triples")
    return load_model(out), ds.testing.mapped_triples[:N_TEST].clone()


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"root": tmp_path_factory.mktemp("families")}


def test_skipped_and_tested_cover_the_resolver() -> None:
    names = set(model_resolver.lookup_dict)
    assert set(SKIPPED) <= names, sorted(set(SKIPPED) - names)
    assert set(FAMILIES) | set(SKIPPED) == names
    assert {f for f, _ in EXPECTED} == set(FAMILIES)


def _cases() -> list[Any]:
    out = []
    for f in FAMILIES:
        for layers in ("last:2", "all"):
            out.append(pytest.param(f, layers, id=f"{f}-{layers}"))
    return out


@pytest.mark.parametrize(("family", "layers"), _cases())
def test_family(family: str, layers: str, family_models: dict[str, Any], tmp_path: Path) -> None:
    if family not in family_models:
        family_models[family] = _train(family, family_models["root"])
    bundle, test = family_models[family]
    model = bundle.model
    loss = LOSS.get(family, "bce")
    expected = EXPECTED[(family, layers)]
    projections = ["sparse"]
    if expected.startswith("refused: "):
        with pytest.raises(TracinError) as info:
            build_index(bundle, tmp_path / "refused", config=BuildConfig(layers=layers, loss=loss))
        message = str(info.value)
        assert "\n" not in message and expected.removeprefix("refused: ") in message
        return
    names = select_parameters(_uncached(model), layers, bundle.triples.mapped[:2])
    ref_model = _uncached(model)
    size = sum(dict(model.named_parameters())[n].numel() for n in names)
    if layers == "all" and size <= NONE_LIMIT:
        projections.append("none")
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(np.sort(rng.choice(TRAIN_ROWS, 6, replace=False)))
    ref_test = reference_gradients(ref_model, [model.state_dict()], names, test, loss)[0]
    assert ref_test.abs().max() > 0, "the reference gradient is zero: the test says nothing"
    ref_rows: dict[int, torch.Tensor] = {}

    def ref_train(idx: torch.Tensor) -> torch.Tensor:
        todo = [int(i) for i in idx if int(i) not in ref_rows]
        if todo:
            got = reference_gradients(ref_model, [model.state_dict()], names, bundle.triples.mapped[todo], loss)[0]
            ref_rows.update(zip(todo, got, strict=True))
        return torch.stack([ref_rows[int(i)] for i in idx])

    for kind in projections:
        out = tmp_path / kind
        build_index(bundle, out, config=BuildConfig(layers=layers, loss=loss, projection=ProjectionSpec(kind, dim=64),
                                                    batch_size=64, unit_rows=512))
        index = open_index(out)
        want = ref_test @ ref_train(sample).T
        # float32 cancellation is relative to |g_test| |g_train| (Cauchy-Schwarz), not to the (possibly tiny) products
        bound = float(ref_test.norm(dim=1).max() * ref_train(sample).norm(dim=1).max())
        scale = max(float(want.abs().max()), 1e-2 * bound)
        got = index.exact_influence(test, sample)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale), (kind, float((got - want).abs().max()), scale)
        for m, res in enumerate(index.query(test, k=2, candidates=8)):
            items = res.proponents + res.opponents
            assert items, "a query found nothing"
            idx = torch.tensor([it.train_index for it in items])
            truth = ref_test[m] @ ref_train(idx).T
            values = torch.tensor([it.influence for it in items])
            assert torch.allclose(values, truth, rtol=1e-4, atol=1e-4 * scale), (kind, values, truth)
