"""The engine's guarantees beyond exactness: batches sized to a memory budget, silent zeros named, refusals in one line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
from tracin_index import engine as engine_module
from tracin_index.cli import main
from tracin_index.engine import Engine, describe_parameters
from tracin_index.errors import InputError
from tracin_index.layers import select_parameters
from tracin_index.losses import get_loss
from tracin_index.model import ModelBundle, load_checkpoints
from tracin_index.plan import probe
from tracin_index.tracer import Tracer

from .conftest import Trained


def _tracer(trained: Trained, layers: str, memory: int) -> Tracer:
    bundle = load_model(trained.directory)
    names = select_parameters(bundle.model, layers, bundle.triples.mapped[:2])
    return Tracer(bundle, load_checkpoints(bundle.model, []), names, "bce", ProjectionSpec("sparse", 64, 0),
                  torch.device("cpu"), memory=memory)


def test_batches_shrink_to_the_memory_budget_and_give_the_same_rows(distmult_plain: Trained,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    roomy = _tracer(distmult_plain, "all", 1 << 30)
    per_triple = roomy.prepare().bytes_per_triple
    assert per_triple > 0
    tight = _tracer(distmult_plain, "all", 10 * per_triple)
    assert tight.fit(1024) == 10 and roomy.fit(1024) == 1024
    sizes: list[int] = []
    original = tight.gradients

    def spy(t: torch.Tensor, c: int, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(t))
        return original(t, c, *args, **kwargs)

    monkeypatch.setattr(tight, "gradients", spy)
    triples = tight.bundle.triples.mapped[:95]
    small, big = tight.rows(triples), roomy.rows(triples)
    assert max(sizes) == 10 and sum(sizes) == 95
    assert torch.allclose(small.rows, big.rows, rtol=1e-5, atol=1e-6) and torch.allclose(small.sq_norms, big.sq_norms)


def test_a_triple_larger_than_the_budget_is_refused_in_one_line(distmult_plain: Trained, tmp_path: Path) -> None:
    bundle = load_model(distmult_plain.directory)
    with pytest.raises(InputError) as info:
        build_index(bundle, tmp_path / "idx", config=BuildConfig(layers="all", gradient_memory=64))
    message = str(info.value)
    assert "\n" not in message and "64 bytes budget" in message and "gradient_memory" in message
    assert "entity_representations.0._embeddings.weight" in message  # the layer that takes most
    assert not (tmp_path / "idx").exists(), "nothing is left behind"
    res = CliRunner().invoke(main, ["build", "--model", str(distmult_plain.directory), "--out", str(tmp_path / "cli"),
                                    "--layers", "all", "--gradient-memory", "64B"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "budget" in res.output


def _saturated(trained: Trained, root: Path) -> Path:
    """A copy of a DistMult run whose every score is far beyond bce's range (all embeddings 3: scores 27 d)."""
    bundle = load_model(trained.directory)
    model = copy.deepcopy(bundle.model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    out = root / "saturated"
    out.mkdir()
    torch.save(model, out / "trained_model.pkl")
    import shutil

    shutil.copytree(trained.directory / "training_triples", out / "training_triples")
    return out


def test_silent_zeros_are_named_with_their_cause_and_recorded(distmult_plain: Trained, tmp_path: Path) -> None:
    path = _saturated(distmult_plain, tmp_path)
    said: list[str] = []
    store = build_index(load_model(path), tmp_path / "idx", config=BuildConfig(layers="all"), log=said.append)
    warnings = store.attrs["warnings"]
    assert len(warnings) == 2 and all("saturate bce; try --loss score" in w for w in warnings)
    assert [f"warning: {w}" for w in warnings] == said
    shown = CliRunner().invoke(main, ["info", str(tmp_path / "idx")])
    assert shown.exit_code == 0 and shown.output.count("saturate bce") == 2
    assert "plan:         plain (no speed-up applies)" in shown.output
    # the fix the warning names: the raw score's gradient is not saturated
    fixed = build_index(load_model(path), tmp_path / "score", config=BuildConfig(layers="all", loss="score"))
    assert fixed.attrs["warnings"] == []


class _Unused(torch.nn.Module):
    """Scores through ``emb`` only; ``spare`` is a parameterised layer the score never reaches."""

    use_inverse_triples = False

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.spare = torch.nn.Linear(4, 4)

    def score_hrt(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.emb(rows[:, 0]) * self.emb(rows[:, 2])).sum(1, keepdim=True)


def test_a_layer_outside_the_loss_is_named() -> None:
    model = _Unused().eval()
    engine = Engine(model, describe_parameters(model, ["emb.weight", "spare.weight"]), get_loss("bce"))
    found = probe(engine, torch.tensor([[0, 0, 1], [2, 0, 3], [4, 0, 5]]))
    assert len(found.warnings) == 1 and found.warnings[0].startswith("spare.weight: gradient vanishes")
    assert "takes no part in the loss" in found.warnings[0]


def test_a_fallback_that_cannot_be_computed_is_refused_in_one_line(distmult_plain: Trained,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ce reads the whole entity table (1-N scoring): per-triple fallback; where even one triple's backward fails,
    the refusal names the parameter."""
    bundle = load_model(distmult_plain.directory)
    names = select_parameters(bundle.model, "all", bundle.triples.mapped[:2])
    engine = Engine(bundle.model, describe_parameters(bundle.model, names), get_loss("ce"))
    plan = probe(engine, bundle.triples.mapped[:4]).plan
    assert "entity_representations.0._embeddings.weight" in plan.per_triple
    real = torch.autograd.grad

    def failing(outputs: Any, inputs: Any, **kwargs: Any) -> Any:
        per_triple = all(isinstance(t, torch.nn.Parameter) for t in inputs)  # the fallback asks for parameters
        if kwargs.get("is_grads_batched") or per_triple:
            raise RuntimeError("no kernel for this\nsecond line")
        return real(outputs, inputs, **kwargs)

    monkeypatch.setattr(engine_module.torch.autograd, "grad", failing)
    with pytest.raises(InputError) as info:
        engine.run(bundle.triples.mapped[:3], plan)
    message = str(info.value)
    assert "\n" not in message and "no kernel for this" in message
    assert "entity_representations.0._embeddings.weight" in message and "layers" in message


def test_the_plan_and_its_plain_twin_give_the_same_index(conve_inverse: Trained, tmp_path: Path) -> None:
    """Every speed-up of ConvE's plan switched off (the plain twin) stores the same rows up to float rounding."""
    bundle: ModelBundle = load_model(conve_inverse.directory)
    config = BuildConfig(projection=ProjectionSpec("sparse", 256, 0), unit_rows=800)
    fast = build_index(bundle, tmp_path / "fast", config=config)
    assert fast.attrs["plan"]["share_rows"] and fast.attrs["plan"]["folded"] == ["interaction.hr2d"]
    index = open_index(tmp_path / "fast")
    tracer = index.tracer
    plain = tracer.prepare().plan.plain()
    triples = index.triples[:300]
    got = torch.cat([tracer.projector(tracer.engine.run(triples[s : s + 100], plain).blocks) for s in (0, 100, 200)])
    stored = torch.from_numpy(np.asarray(fast.array("grads")[:300], dtype=np.float32))
    assert torch.allclose(got.to(torch.float16).float(), stored, rtol=2e-3, atol=2e-3 * float(stored.abs().max()))
