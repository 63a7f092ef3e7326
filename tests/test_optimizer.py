"""Optimizer-aware influence (Adam): each checkpoint's test gradient preconditioned by its Adam state equals a plain
autograd loop that applies the same preconditioner, computed here from ``torch.optim.Adam``'s own state."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tracin_index import BuildConfig, InputError, ProjectionSpec, build_index, load_model, open_index
from tracin_index.callbacks import TracinCheckpoint, find_checkpoints
from tracin_index.cli import main
from tracin_index.forms import DenseGrad, DenseOuterGrad, OuterGrad, RowsGrad, inner_pairs
from tracin_index.model import load_checkpoints
from tracin_index.projection import make_projector
from tracin_index.query import TracinIndex

from .conftest import exact_ends, reference_gradients

EPOCHS = (2, 4)


@dataclass
class Run:
    """A PyKEEN run saved with ``save_to_directory``, its ``TracinCheckpoint`` files, the same states saved bare
    (no optimizer state), its training-loop checkpoint, and each saved epoch's optimizer state as the optimizer
    held it: ``{epoch: {name: (exp_avg_sq, step, beta2, eps)}}``."""

    directory: Path
    checkpoints: list[tuple[str, float]]
    bare: list[tuple[str, float]]
    loop: Path
    testing: torch.Tensor
    adam: dict[int, dict[str, tuple[torch.Tensor, float, float, float]]] = field(default_factory=dict)


def _train(root: Path, model: str, inverse: bool, model_kwargs: dict[str, Any], optimizer: str = "Adam") -> Run:
    from pykeen.datasets import Nations
    from pykeen.pipeline import pipeline
    from pykeen.training.callbacks import TrainingCallback

    out = root / model
    out.mkdir(parents=True)
    run = Run(out / "run", [], [], out / "loop" / "loop.pt", torch.empty(0))

    class Capture(TrainingCallback):
        """The model state without optimizer state, and the optimizer's own state, at the saved epochs."""

        def post_epoch(self, epoch: int, epoch_loss: float, **kwargs: Any) -> None:
            if epoch not in EPOCHS:
                return
            path = out / f"bare_{epoch}.pt"
            torch.save(self.model.state_dict(), path)
            run.bare.append((str(path), float(self.optimizer.param_groups[0]["lr"])))
            names = {id(p): n for n, p in self.model.named_parameters()}
            run.adam[epoch] = {
                names[id(p)]: (self.optimizer.state[p]["exp_avg_sq"].clone(), float(self.optimizer.state[p]["step"]),
                               float(g["betas"][1]), float(g["eps"]))
                for g in self.optimizer.param_groups for p in g["params"] if "exp_avg_sq" in self.optimizer.state[p]}

    result = pipeline(
        dataset="Nations",
        dataset_kwargs={"create_inverse_triples": inverse},
        model=model,
        model_kwargs=model_kwargs,
        training_loop="LCWA",
        loss="BCEAfterSigmoid" if model == "ConvE" else "BCEWithLogits",
        optimizer=optimizer,
        optimizer_kwargs={"lr": 0.01},
        lr_scheduler="StepLR",
        lr_scheduler_kwargs={"step_size": 1, "gamma": 0.8},
        training_kwargs={"num_epochs": max(EPOCHS), "batch_size": 256, "use_tqdm": False,
                         "callbacks": [TracinCheckpoint(out / "ckpts", epochs=EPOCHS), Capture()],
                         "checkpoint_name": run.loop.name, "checkpoint_directory": str(run.loop.parent),
                         "checkpoint_frequency": 0},
        evaluation_kwargs={"batch_size": 512, "use_tqdm": False},
        random_seed=0,
        device="cpu",
    )
    result.save_to_directory(run.directory)
    run.checkpoints = find_checkpoints(out / "ckpts")
    run.testing = Nations(create_inverse_triples=inverse).testing.mapped_triples.clone()
    assert [lr for _, lr in run.checkpoints] == [lr for _, lr in run.bare] and len({lr for _, lr in run.bare}) == 2
    return run


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adam")


@pytest.fixture(scope="module")
def conve(root: Path) -> Run:
    return _train(root, "ConvE", True, {"embedding_dim": 32, "output_channels": 4})


@pytest.fixture(scope="module")
def distmult(root: Path) -> Run:
    return _train(root, "DistMult", False, {"embedding_dim": 16})


@pytest.fixture(scope="module")
def sketched(conve: Run, root: Path) -> Path:
    """ConvE indexed with the default projection (sparse, 1024 per checkpoint) and layers (last:2), half of its
    training triples."""
    out = root / "sketched"
    build_index(load_model(conve.directory), out, checkpoints=conve.checkpoints, config=BuildConfig(sample_rate=0.5))
    return out


def _factors(run: Run, names: list[str]) -> list[torch.Tensor]:
    """Adam's preconditioner per checkpoint, flat in ``names``' order: ``1 / (sqrt(v / (1 - beta2^t)) + eps)``."""
    out = []
    for epoch in EPOCHS:
        parts = []
        for n in names:
            v, step, beta2, eps = run.adam[epoch][n]
            parts.append((1.0 / (torch.sqrt(v / (1.0 - beta2**step)) + eps)).reshape(-1))
        out.append(torch.cat(parts))
    return out


@dataclass
class Expected:
    dot: torch.Tensor  # (M, N) sum_c lr_c <P_c g_test, g_train>
    cosine: torch.Tensor  # (M, N) sum_c lr_c cos(P_c g_test, g_train) / sum_c lr_c
    plain: torch.Tensor  # (M, N) TracIn without the preconditioner


class Reference:
    """The plain autograd loop over every indexed training triple at each checkpoint, and Adam's preconditioner
    from the optimizer's own state."""

    def __init__(self, run: Run, index: TracinIndex) -> None:
        self.model = load_model(run.directory).model
        self.names = [p.name for p in index.tracer.tracked]
        self.states = [torch.load(p, weights_only=True) for p, _ in run.bare]
        self.lrs = [lr for _, lr in run.bare]
        self.factors = _factors(run, self.names)
        self.train = reference_gradients(self.model, self.states, self.names, index.triples)
        self.positions = torch.from_numpy(index.train_index)
        self.size = int(index.labels.mapped.shape[0])

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """Values of the index's rows ``(M, n)`` at their training positions ``(M, N)``; 0 for triples the sample
        left out (0 is neither a proponent's nor an opponent's value)."""
        out = torch.zeros(values.shape[0], self.size, dtype=values.dtype)
        out[:, self.positions] = values
        return out

    def __call__(self, test: torch.Tensor, loss: str = "bce") -> Expected:
        g_test = reference_gradients(self.model, self.states, self.names, test, loss)
        pre = [f[None, :] * g for f, g in zip(self.factors, g_test, strict=True)]
        norm = torch.nn.functional.normalize
        terms = zip(self.lrs, pre, g_test, self.train, strict=True)
        dot, cos, plain = (sum(parts) for parts in zip(*[(lr * (p @ g.T), lr * (norm(p, dim=1) @ norm(g, dim=1).T),
                                                          lr * (t @ g.T)) for lr, p, t, g in terms], strict=True))
        assert isinstance(dot, torch.Tensor) and isinstance(cos, torch.Tensor) and isinstance(plain, torch.Tensor)
        return Expected(dot, cos / sum(self.lrs), plain)


def _ids(items: list[Any]) -> list[int]:
    return [i.train_index for i in items]


def _exact_lists(res: Any, full: torch.Tensor, k: int, rel: float = 1e-4, atol: float = 1e-7) -> None:
    """Proponents and opponents are the brute-force ends of ``full (N,)``: each listed value is the loop's value
    of its training triple, and the values are the top-``k`` (training triples with equal gradients tie, such as
    ``(h, r, t)`` and ``(t, r, h)`` in DistMult, in either order)."""
    top, bottom = exact_ends(full, k)
    for items, ends in ((res.proponents, top), (res.opponents, bottom)):
        assert [i.influence for i in items] == pytest.approx([float(full[i]) for i in ends], rel=rel, abs=atol)
        assert [i.influence for i in items] == pytest.approx([float(full[i.train_index]) for i in items], rel=rel, abs=atol)


@pytest.mark.parametrize(("fixture", "layers"), [("conve", "last:2"), ("conve", "all"), ("distmult", "all")])
def test_adam_equals_preconditioned_autograd_loop(fixture: str, layers: str, request: pytest.FixtureRequest,
                                                 tmp_path: Path) -> None:
    """Exact search (no projection): lists and values, dot and cosine, the query rows, brute force and a
    contrastive question, each against the loop; the results record the optimizer."""
    run: Run = request.getfixturevalue(fixture)
    out = tmp_path / "idx"
    store = build_index(load_model(run.directory), out, checkpoints=run.checkpoints,  # a quarter: the loop is slow
                        config=BuildConfig(layers=layers, projection=ProjectionSpec("none"), sample_rate=0.25))
    index = open_index(out, optimizer="adam")
    test = run.testing[:3]
    reference = Reference(run, index)
    exp = reference(test)
    scale = float(exp.dot.abs().max())
    assert not torch.allclose(exp.dot, exp.plain, rtol=0.1), "Adam's preconditioner must change the influences"

    assert torch.allclose(index.exact_influence(test), exp.dot, rtol=1e-4, atol=1e-4 * scale)
    q, _ = index.test_rows(test)  # the rows of P g_test: here the exact preconditioned gradients, sqrt(lr)-scaled
    stored = torch.from_numpy(np.asarray(store.array("grads")[:], dtype=np.float32))
    assert torch.allclose(torch.from_numpy(q) @ stored.T, exp.dot, rtol=1e-4, atol=1e-4 * scale)
    for res, full in zip(index.query(test, k=5), reference.spread(exp.dot), strict=True):
        assert res.optimizer == "adam" and res.to_dict()["optimizer"] == "adam" and res.proponents and res.opponents
        _exact_lists(res, full, 5, atol=1e-6 * scale)
    # plain TracIn on the same index, asked per query
    for res, full in zip(index.query(test, k=5, optimizer="sgd"), reference.spread(exp.plain), strict=True):
        assert res.optimizer == "sgd" and "optimizer" not in res.to_dict()
        _exact_lists(res, full, 5, atol=1e-6 * float(exp.plain.abs().max()))

    assert torch.allclose(index.exact_influence(test, mode="cosine"), exp.cosine, atol=2e-4)
    for res, full in zip(index.query(test, k=5, mode="cosine"), reference.spread(exp.cosine), strict=True):
        _exact_lists(res, full, 5, rel=0, atol=2e-4)

    # contrastive: the margin's gradient, preconditioned as any test gradient
    versus = test[:1].clone()
    versus[0, 2] = (versus[0, 2] + 1) % len(index.labels.entity_labels)
    first, second = reference(test[:1], "score"), reference(versus, "score")
    [res] = index.query(test[:1], k=5, versus=versus)
    margin = reference.spread(first.dot - second.dot)[0]
    assert res.proponents and res.optimizer == "adam"
    for item in res.proponents + res.opponents:
        assert item.influence == pytest.approx(float(margin[item.train_index]), rel=1e-4, abs=1e-4 * float(margin.abs().max()))


def test_adam_rerank_is_exact_through_the_sketch(conve: Run, sketched: Path) -> None:
    """With the default sparse projection, every listed value is the loop's exact preconditioned influence, in
    dot and cosine mode; the search finds the exact top proponents."""
    index = open_index(sketched, optimizer="adam")
    test = conve.testing[:4]
    reference = Reference(conve, index)
    exp = reference(test)
    dot, cosine = reference.spread(exp.dot), reference.spread(exp.cosine)
    scale = float(exp.dot.abs().max())
    for res, full in zip(index.query(test, k=10), dot, strict=True):
        assert len(res.proponents) == 10 and res.opponents
        assert _ids(res.proponents)[:3] == exact_ends(full, 3)[0]
        for item in res.proponents + res.opponents:
            assert item.influence == pytest.approx(float(full[item.train_index]), rel=1e-4, abs=1e-6 * scale)
    for res, full in zip(index.query(test, k=10, mode="cosine"), cosine, strict=True):
        for item in res.proponents + res.opponents:
            assert item.influence == pytest.approx(float(full[item.train_index]), abs=2e-4)
    # the projected rows of P g_test estimate the same influences
    projected = index.query(test, k=10, rerank=False)
    for res, full in zip(projected, dot, strict=True):
        assert len(set(_ids(res.proponents)) & set(exact_ends(full, 10)[0])) >= 6


def test_dense_outer_blocks_project_and_multiply_as_outer_products(sketched: Path) -> None:
    """A Linear weight's gradient held dense is sketched (TensorSketch, Gaussian) and multiplied (inner, pairs,
    permuted inputs) exactly as its outer-product form; dense rows multiply with an embedding's rows."""
    from tracin_index.projection import ProjectionSpec as Spec

    index = open_index(sketched)
    tracer = index.tracer
    test = tracer.gradients(index.triples[:6], 1).blocks
    train = tracer.gradients(index.triples[6:70], 1).blocks
    gaussian = make_projector(Spec("gaussian", 64, 3), tracer.tracked, tracer.device)
    checked = 0
    for j, (a, b) in enumerate(zip(test, train, strict=True)):
        if not isinstance(a, OuterGrad):
            continue
        dense = DenseOuterGrad(a.densify(), int(a.u.shape[-1]))
        sketch = a.countsketch(tracer.projector, j)
        assert torch.allclose(dense.countsketch(tracer.projector, j), sketch, atol=1e-5 * float(sketch.abs().max()))
        assert torch.allclose(dense.gaussian(gaussian, j), a.gaussian(gaussian, j), rtol=1e-4, atol=1e-6)
        want = a.inner(b)
        assert torch.allclose(dense.inner(b), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
        ia, ib = torch.tensor([0, 0, 3, 5, 5, 2]), torch.tensor([7, 1, 1, 63, 0, 7])
        pairs = inner_pairs([dense], [b], ia, ib)
        assert torch.allclose(pairs, want[ia, ib], rtol=1e-4, atol=1e-6 * float(want.abs().max()))
        perm = torch.randperm(a.v.shape[-1], generator=torch.Generator().manual_seed(0))
        assert torch.allclose(dense.reordered(perm).inner(b.reordered(perm)), want, rtol=1e-4,
                              atol=1e-6 * float(want.abs().max()))
        checked += 1
    assert checked == 1
    # an embedding's rows (repeated rows add up) against dense rows of the same table
    gen = torch.Generator().manual_seed(1)
    rows = RowsGrad(torch.randint(0, 5, (9, 3), generator=gen), torch.randn(9, 3, 4, generator=gen), 5)
    x = torch.randn(4, 20, generator=gen)
    want = x @ rows.densify().T
    assert torch.allclose(DenseGrad(x).inner(rows), want, atol=1e-5)
    ia, ib = torch.tensor([0, 1, 1, 3]), torch.tensor([8, 0, 2, 2])
    assert torch.allclose(inner_pairs([DenseGrad(x)], [rows], ia, ib), want[ia, ib], atol=1e-5)


def test_pykeen_training_loop_checkpoint_is_named(conve: Run, sketched: Path) -> None:
    """PyKEEN's training-loop checkpoint numbers the optimizer's parameters by position: read by name, it holds
    the optimizer's own state, and queries through it equal those through the TracinCheckpoint file."""
    bundle = load_model(conve.directory)
    names = [n for n, _ in bundle.model.named_parameters()]
    lr = conve.checkpoints[-1][1]
    [ckpt] = load_checkpoints(bundle.model, [(str(conve.loop), lr)], optimizer_params=names)
    assert ckpt.optimizer is not None and ckpt.optimizer.kind == "Adam" and ckpt.optimizer.problem is None
    assert sorted(ckpt.optimizer.params) == sorted(names)
    for name, (v, step, beta2, eps) in conve.adam[max(EPOCHS)].items():
        entry = ckpt.optimizer.params[name]
        assert torch.equal(entry["exp_avg_sq"], v) and (entry["step"], entry["beta2"], entry["eps"]) == (step, beta2, eps)
    test = conve.testing[:3]
    a = open_index(sketched, optimizer="adam").query(test, k=5)
    b = open_index(sketched, optimizer="adam", checkpoints=[conve.checkpoints[0], (str(conve.loop), lr)]).query(test, k=5)
    for x, y in zip(a, b, strict=True):
        assert _ids(x.proponents) == _ids(y.proponents) and _ids(x.opponents) == _ids(y.opponents)
        assert [i.influence for i in x.proponents] == pytest.approx([i.influence for i in y.proponents], rel=1e-6)


def test_refused_without_adam_state(conve: Run, sketched: Path, root: Path) -> None:
    """Checkpoints without optimizer state, the model itself and an SGD run are refused in one line, in Python
    and on the command line; plain TracIn works for all of them."""
    bare = open_index(sketched, checkpoints=conve.bare)  # the same states, saved without the optimizer's
    with pytest.raises(InputError) as info:
        bare.query(conve.testing[:1], k=3, optimizer="adam")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint {Path(conve.bare[0][0]).resolve()} holds no optimizer state")
    assert message.endswith("train with TracinCheckpoint (it saves the optimizer state with each checkpoint) or use "
                            "optimizer='sgd'")
    with pytest.raises(InputError, match="holds no optimizer state"):
        open_index(sketched, checkpoints=conve.bare, optimizer="adam")
    assert bare.query(conve.testing[:1], k=3)[0].proponents

    sgd = _train(root / "sgd", "DistMult", False, {"embedding_dim": 8}, optimizer="SGD")
    out = root / "sgd" / "idx"
    build_index(load_model(sgd.directory), out, checkpoints=sgd.checkpoints)
    for checkpoints in (None, [sgd.checkpoints[0], (str(sgd.loop), sgd.checkpoints[1][1])]):
        with pytest.raises(InputError, match=r"^checkpoint \S+ was trained with SGD, not Adam, whose steps have no "
                                             r"per-coordinate preconditioner; use optimizer='sgd'$"):
            open_index(out, checkpoints=checkpoints, optimizer="adam")
    res = CliRunner().invoke(main, ["query", str(out), "--triple", "brazil embassy uk", "--optimizer", "adam"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert res.output.startswith("Error: checkpoint ") and res.output.endswith("use --optimizer sgd\n")

    itself = root / "sgd" / "itself"
    build_index(load_model(sgd.directory), itself)
    with pytest.raises(InputError, match=r"^the model itself \(no checkpoints\) holds no optimizer state; train with "):
        open_index(itself, optimizer="adam")


def test_cli_and_results_record_the_optimizer(conve: Run, sketched: Path, tmp_path: Path) -> None:
    """``--optimizer adam`` on query, score and run gives the Python API's values; JSON, the text header and the
    restartable run's manifest name the optimizer."""
    index = open_index(sketched, optimizer="adam")
    [want] = index.query("brazil embassy uk", k=5)
    runner = CliRunner()
    res = runner.invoke(main, ["query", str(sketched), "--triple", "brazil embassy uk", "--top-k", "5", "--optimizer",
                               "adam", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["optimizer"] == "adam"
    assert [p["influence"] for p in got["proponents"]] == pytest.approx([p.influence for p in want.proponents], rel=1e-5)
    res = runner.invoke(main, ["query", str(sketched), "--triple", "brazil embassy uk", "--optimizer", "adam",
                               "--mode", "cosine"])
    assert res.exit_code == 0 and res.output.splitlines()[0].endswith("[cosine, adam]"), res.output
    res = runner.invoke(main, ["query", str(sketched), "--triple", "brazil embassy uk", "--json"])
    assert res.exit_code == 0 and "optimizer" not in json.loads(res.output)

    test = tmp_path / "test.tsv"
    test.write_text("brazil\tembassy\tuk\nusa\tintergovorgs\tuk\n")
    scores = tmp_path / "scores.jsonl"
    res = runner.invoke(main, ["score", str(sketched), "--test", str(test), "--out", str(scores), "--top-k", "5",
                               "--optimizer", "adam"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    expected = index.score(test, k=5).to_frame()
    assert [r["train_index"] for r in rows] == expected.train_index.tolist()
    assert [r["influence"] for r in rows] == pytest.approx(expected.influence.tolist(), rel=1e-5)

    aggregate = index.aggregate(test, k=5)
    assert aggregate.optimizer == "adam" and aggregate.to_dict()["optimizer"] == "adam" and aggregate.proponents
    settings = index.settings(5)
    assert settings.optimizer == "adam" and settings.to_dict()["optimizer"] == "adam"

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop

    from tracin_index import write_scores

    out = tmp_path / "killed.parquet"
    with pytest.raises(Stop):
        write_scores(index, test, out, settings, progress=stop)
    manifest = json.loads((tmp_path / ".killed.parquet.parts" / "manifest.json").read_text())
    assert manifest["settings"]["optimizer"] == "adam"

    output = tmp_path / "run.json"
    res = runner.invoke(main, ["run", "--model-path", str(conve.directory), "--test", "pykeen:nations",
                               "--test-indices", "0", "1", "--use-last-layers-only", "--optimizer", "adam",
                               "--checkpoints", str(Path(conve.checkpoints[0][0]).parent), "--output", str(output),
                               "--index", str(sketched)])
    assert res.exit_code == 0, res.output
    objects = json.loads(output.read_text())
    assert [o["optimizer"] for o in objects] == ["adam", "adam"]
    direct = index.query(conve.testing[:2], k=10)
    assert [p["influence"] for p in objects[1]["proponents"]] == pytest.approx(
        [p.influence for p in direct[1].proponents], rel=1e-5)


def test_adam_self_influence_equals_the_loop(conve: Run, sketched: Path) -> None:
    """Self-influence following Adam's step, ``sum_c lr_c <g_c, P_c g_c>``, is the loop's value for every indexed
    triple, ranked largest first; plain SGD's stays the stored ``sum_c lr_c ||g_c||^2``; the CLI gives the same."""
    index = open_index(sketched, optimizer="adam")
    reference = Reference(conve, index)
    terms = zip(reference.lrs, reference.factors, reference.train, strict=True)
    adam = sum(lr * ((f[None, :] * g) * g).sum(1) for lr, f, g in terms)
    plain = sum(lr * (g * g).sum(1) for lr, g in zip(reference.lrs, reference.train, strict=True))
    assert isinstance(adam, torch.Tensor) and isinstance(plain, torch.Tensor)
    row_of = {int(p): i for i, p in enumerate(index.train_index)}
    for ranking, expected in ((index.self_influence(), adam), (index.self_influence(optimizer="sgd"), plain)):
        assert len(ranking) == index.num_rows
        got = np.array([item.influence for item in ranking])
        want = expected.numpy()[[row_of[item.train_index] for item in ranking]]
        assert got == pytest.approx(want, rel=1e-4)
        assert np.all(np.diff(got) <= 0)
    assert not np.allclose(np.argsort(-adam.numpy())[:20], np.argsort(-plain.numpy())[:20])

    res = CliRunner().invoke(main, ["self-influence", str(sketched), "--optimizer", "adam", "--top", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert [i["influence"] for i in json.loads(res.output)] == pytest.approx(
        [i.influence for i in index.self_influence(3)], rel=1e-6)
