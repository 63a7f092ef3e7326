"""Exact mode and exact re-rank equal the per-pair autograd loop (the earlier tool's method)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
from tracin_index.engine import Engine, describe_parameters
from tracin_index.forms import OuterGrad, SharedOuterGrad, densify
from tracin_index.layers import internal_rows, select_parameters
from tracin_index.losses import get_loss
from tracin_index.pairs import StoredActs
from tracin_index.plan import probe

from .conftest import Trained, exact_ends, reference_gradients

CASES = [
    ("conve_inverse", "last:2", "bce"),
    ("conve_inverse", "all", "bce"),
    ("conve_plain", "last:2", "bce"),
    ("conve_plain", "all", "score"),
    ("conve_inverse", "last:2", "ce"),
    ("distmult_inverse", "all", "bce"),
    ("distmult_plain", "all", "bce"),
    ("distmult_plain", "all", "ce"),  # 1-N scoring reads the whole entity table: the per-triple fallback
]


@pytest.mark.parametrize(("fixture", "layers", "loss"), CASES)
def test_exact_mode_equals_autograd_loop(fixture: str, layers: str, loss: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    trained: Trained = request.getfixturevalue(fixture)
    bundle = load_model(trained.directory)
    out = tmp_path / "idx"
    config = BuildConfig(layers=layers, loss=loss, projection=ProjectionSpec("none"), batch_size=97, unit_rows=500)
    store = build_index(bundle, out, checkpoints=trained.checkpoints, config=config)

    names = select_parameters(bundle.model, layers, bundle.triples.mapped[:2])
    states = [torch.load(p, weights_only=True) for p, _ in trained.checkpoints]
    lrs = [lr for _, lr in trained.checkpoints]
    rng = np.random.default_rng(0)
    train_idx = torch.from_numpy(np.sort(rng.choice(bundle.triples.mapped.shape[0], 40, replace=False)))
    test = trained.testing[:3]
    ref_train = reference_gradients(bundle.model, states, names, bundle.triples.mapped[train_idx], loss)
    ref_test = reference_gradients(bundle.model, states, names, test, loss)
    expected = sum(lr * (gt @ gr.T) for lr, gt, gr in zip(lrs, ref_test, ref_train, strict=True))
    assert isinstance(expected, torch.Tensor)
    scale = expected.abs().max()

    # 1. the stored rows (sqrt(lr)-scaled exact gradients) give TracInCP by one inner product
    index = open_index(out)
    q, _ = index.test_rows(test)
    stored = torch.from_numpy(np.asarray(store.array("grads")[train_idx.numpy()], dtype=np.float32))
    assert torch.allclose(torch.from_numpy(q) @ stored.T, expected, rtol=1e-4, atol=1e-4 * scale)
    # 2. the exact path used by re-ranking
    assert torch.allclose(index.exact_influence(test, train_idx), expected, rtol=1e-4, atol=1e-4 * scale)
    # 3. stored exact self-influence and per-checkpoint norms
    self_ref = sum(lr * (g * g).sum(1) for lr, g in zip(lrs, ref_train, strict=True))
    assert isinstance(self_ref, torch.Tensor)
    self_stored = torch.from_numpy(np.asarray(store.array("self_influence")[train_idx.numpy()]))
    assert torch.allclose(self_stored, self_ref, rtol=1e-4, atol=1e-6)
    norms = torch.from_numpy(np.asarray(store.array("norms")[train_idx.numpy()]))
    assert torch.allclose(norms[:, 1], ref_train[1].norm(dim=1), rtol=1e-4, atol=1e-6)
    # 4. the re-rank's pairs, through the build's stored Linear outputs where the first tracked layer is a Linear
    cacheable = fixture.startswith("conve") and layers == "last:2"
    cache = store.attrs["activation_cache"]
    assert (cache is not None) == cacheable and (index._acts is not None) == cacheable
    if cacheable:
        assert cache["module"] == "interaction.hr1d.0" and ("acts" in store.group)
        assert index._acts is not None and index._acts[1].shape == (store.num_rows, cache["width"])
    r = index.tracer.rows(test, keep_blocks=True)
    pair_train = torch.arange(len(train_idx)).repeat_interleave(3)  # sorted by training triple
    pair_test = torch.arange(3).repeat(len(train_idx))
    acts = None if index._acts is None else (index._acts[0], index._acts[1][train_idx])
    linear_calls = []
    original = torch.nn.Linear.forward

    def counting(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        linear_calls.append(self)
        return original(self, x)

    torch.nn.Linear.forward = counting  # type: ignore[method-assign]
    try:
        got = index.tracer.exact_pairs(r.blocks, bundle.triples.mapped[train_idx], pair_test, pair_train, batch_size=16,
                                       train_acts=acts)
    finally:
        torch.nn.Linear.forward = original  # type: ignore[method-assign]
    assert torch.allclose(got, expected[pair_test, pair_train], rtol=1e-4, atol=1e-4 * scale)
    # with the stored outputs, the encoder may hand the Linear's input over in oneDNN's channels-last order
    # (the test rows permuted to match); values as above
    reordered: set[str] = set()
    if acts is not None:
        run = index.tracer._train_gradients(bundle.triples.mapped[train_idx[:16]], 0, 0, (acts[0], acts[1][:16]), True)
        reordered = set(run.v_order)
    assert reordered == ({"interaction.hr1d.0"} if cacheable and torch.backends.mkldnn.is_available() else set())
    # ConvE's encoder runs folded (BatchNorms into the convolution) exactly when no tracked layer precedes it
    folded = fixture.startswith("conve") and layers == "last:2"
    plan = index.tracer.plan
    assert set(plan.folded) == ({"interaction.hr2d"} if folded else set())
    assert store.attrs["plan"] == plan.to_dict()
    # ... and, for projected rows (the build's, these stored ones), writes its output batch-innermost
    assert (plan.feeds_cache == "interaction.hr2d" and plan.batch_last) == folded
    # ... and runs it (and the Linear) once per distinct (head, relation) input: Nations' training rows share them
    assert plan.share_rows == folded
    if folded:
        v = index.tracer.gradients(test, 0, batch_last=True).blocks[0].v  # type: ignore[attr-defined]
        assert v.stride(-1) != 1 and v.permute(2, 0, 1).is_contiguous()  # memory (features, R, B)
        run = index.tracer.gradients(bundle.triples.mapped[:256], 0, batch_last=True)
        assert isinstance(run.blocks[0], SharedOuterGrad) and run.distinct < 0.75
    cached = dict(index.tracer.model.named_modules()).get("interaction.hr1d.0")
    if cached is not None:  # ConvE: the stored outputs stand in for the layer's matmul exactly when cached
        assert any(m is cached for m in linear_calls) == (not cacheable)


def test_query_values_are_exact_and_ranked(conve_inverse: Trained, tmp_path: Path) -> None:
    """Every reported influence equals brute force, proponents are the exact top-k (positive), opponents the bottom-k."""
    bundle = load_model(conve_inverse.directory)
    out = tmp_path / "idx"
    build_index(bundle, out, checkpoints=conve_inverse.checkpoints,
                config=BuildConfig(projection=ProjectionSpec("none"), unit_rows=700))
    index = open_index(out)
    test = conve_inverse.testing[:4]
    full = index.exact_influence(test)  # (4, N) brute force over every training triple
    results = index.query(test, k=10, candidates=index.num_rows)
    for m, res in enumerate(results):
        top, bottom = exact_ends(full[m], 10)
        assert [p.train_index for p in res.proponents] == top
        assert [o.train_index for o in res.opponents] == bottom
        for item in res.proponents + res.opponents:
            assert item.influence == pytest.approx(float(full[m, item.train_index]), rel=1e-5, abs=1e-9)
        h, r, t = index.triples[res.proponents[0].train_index].tolist()
        ent, rel = index.labels.entity_labels, index.labels.relation_labels
        assert (res.proponents[0].head, res.proponents[0].relation, res.proponents[0].tail) == (ent[h], rel[r], ent[t])


def test_reranked_queries_equal_with_and_without_the_activation_cache(conve_inverse: Trained, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from tracin_index.cli import main

    ckpts = [a for p, lr in conve_inverse.checkpoints for a in ("--checkpoint", str(p), "--lr", str(lr))]
    for name, flag in (("cached", "--cache-activations"), ("plain", "--no-cache-activations")):
        res = CliRunner().invoke(main, ["build", "--model", str(conve_inverse.directory), "--out", str(tmp_path / name),
                                        "--dim", "256", flag, *ckpts])
        assert res.exit_code == 0, res.output
    cached, plain = open_index(tmp_path / "cached"), open_index(tmp_path / "plain")
    assert "acts" in cached.store.group and cached._acts is not None
    assert "acts" not in plain.store.group and plain._acts is None and plain.store.attrs["activation_cache"] is None
    with monkeypatch.context() as m:  # too large for memory: the candidates' rows are read from the store per query
        m.setattr("tracin_index.query.available_memory", lambda: 2**20)
        read = open_index(tmp_path / "cached")
    assert read._acts is not None and isinstance(read._acts[1], StoredActs)
    test = conve_inverse.testing[:6]
    for a, b, c in zip(cached.query(test, k=10), plain.query(test, k=10), read.query(test, k=10), strict=True):
        for xs, ys, zs in ((a.proponents, b.proponents, c.proponents), (a.opponents, b.opponents, c.opponents)):
            assert [x.train_index for x in xs] == [y.train_index for y in ys] == [z.train_index for z in zs]
            assert [x.influence for x in xs] == pytest.approx([y.influence for y in ys], rel=1e-5, abs=1e-9)
            assert [x.influence for x in xs] == [z.influence for z in zs]


def test_rows_read_alone_equal_the_stored_rows(conve_inverse: Trained, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``Store.read_rows`` (one read per row from the chunk files; whole chunks where the layout is not plain
    bytes) returns what Zarr reads, in the asked order, repeats included."""
    import tracin_index.store as store_module
    from tracin_index.store import Store

    build_index(load_model(conve_inverse.directory), tmp_path / "idx", checkpoints=conve_inverse.checkpoints,
                config=BuildConfig(unit_rows=100))
    store = Store.open(tmp_path / "idx")
    rows = np.random.default_rng(0).integers(0, store.num_rows, 300)
    rows[:3] = [store.num_rows - 1, 0, rows[5]]  # the last (partial) chunk's last row, the first row, a repeat
    for name in ("acts", "grads", "norms", "triples"):
        want = store.read(name)[rows]
        assert np.array_equal(store.read_rows(name, rows), want)
        with monkeypatch.context() as m:
            m.setattr(store_module, "_raw_layout", lambda arr: False)
            assert np.array_equal(store.read_rows(name, rows), want)
    assert store.read_rows("acts", np.zeros(0, dtype=np.int64)).shape == (0, store.read("acts", 0, 1).shape[1])


class _ConvToy(torch.nn.Module):
    """A tiny conv encoder into a tracked Linear, fed through ``consume`` (how the model flattens the encoder's
    output): enough of a pykeen model (``score_hrt`` over raw rows) for ``GradientComputer``."""

    use_inverse_triples = False

    def __init__(self, consume: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.emb = torch.nn.Embedding(10, 16)
        self.enc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.lin = torch.nn.Linear(16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            bn = self.enc[1]
            bn.running_mean.copy_(torch.randn(4, generator=gen))  # type: ignore[operator]
            bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)  # type: ignore[operator]
        self.consume = consume

    def score_hrt(self, rows: torch.Tensor) -> torch.Tensor:
        x = (self.emb(rows[:, 0]) * self.emb(rows[:, 2])).view(-1, 1, 4, 4)
        z = self.enc(x)
        n = z.shape[0]
        if self.consume == "view":
            flat = z.view(n, -1)
        elif self.consume == "view all":  # only contiguous memory allows this view
            flat = z.view(-1).view(n, -1)
        elif self.consume == "rows":  # a row per internal row: the model's own batch size
            flat = z.reshape(rows.shape[0], -1)
        elif self.consume == "plus input":  # the encoder's output beside another per-row tensor
            flat = z.view(n, -1) + x.reshape(x.shape[0], -1)
        else:  # reads the memory as if it were contiguous: other values in another layout
            flat = z.as_strided((n, z[0].numel()), (z[0].numel(), 1))
        return self.lin(flat).sum(1, keepdim=True)


@pytest.mark.parametrize(("consume", "kept"), [("view", True), ("view all", False), ("as_strided", False)])
def test_batch_last_layout_is_kept_only_where_the_model_takes_it(consume: str, kept: bool) -> None:
    """The first checked run tries the batch-innermost encoder output on a few triples: kept when the model
    gives the same blocks with it, dropped when it cannot view it or reads other values. Either way the
    blocks equal a plain autograd loop."""
    model = _ConvToy(consume).eval()
    names = ["lin.weight", "lin.bias"]
    engine = Engine(model, describe_parameters(model, names), get_loss("bce"))
    # every row's encoder input distinct (emb(h) * emb(t): no pair {h, t} twice), so no row shares it
    triples = torch.tensor([[i, 0, (i + 1) % 10] for i in range(10)] + [[0, 0, 3], [1, 0, 4]])
    ref = []
    for row in triples:
        loss = torch.nn.functional.softplus(-model.score_hrt(row[None])).sum()
        grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
        ref.append(torch.cat([g.reshape(-1) for g in grads]))
    expected = torch.stack(ref)
    plan = probe(engine, triples).plan
    assert plan.folded == ("enc",) and plan.feeds_cache == "enc"
    assert plan.batch_last == kept
    later = engine.run(triples, plan, batch_last=True).blocks
    v = later[0].v  # type: ignore[attr-defined]
    assert (v.stride(-1) != 1) == kept  # batch innermost exactly when kept
    for blocks in (engine.run(triples, plan.plain()).blocks, later, engine.run(triples, plan).blocks):
        assert torch.allclose(densify(blocks), expected, rtol=1e-4, atol=1e-5)


def _autograd_rows(model: torch.nn.Module, triples: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Per-triple gradients of the bce loss over the triple's internal rows, one autograd call per triple."""
    params = dict(model.named_parameters())
    ref = []
    for row in triples:
        rows, _ = internal_rows(model, row[None])
        loss = torch.nn.functional.softplus(-model.score_hrt(rows)).sum()  # type: ignore[operator]
        ref.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [params[n] for n in names])]))
    return torch.stack(ref)


def _twins(inverse: bool) -> torch.Tensor:
    """18 triples whose rows have 6 distinct encoder inputs (the toy's input is emb(h) * emb(t), so (h, t) and
    (t, h) give the same one), each three times."""
    base = [[i, 0, (i + 1) % 10] for i in range(6)]
    return torch.tensor(base + [[t, 1 if inverse else 0, h] for h, _, t in base] + base)


@pytest.mark.parametrize(("consume", "kept"), [("view", True), ("as_strided", True), ("rows", False), ("plus input", False)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rows_share_their_encoder_input_only_where_the_model_takes_it(consume: str, kept: bool, inverse: bool) -> None:
    """The first checked run tries sharing rows with the same encoder input (each twice): kept when the model
    takes the encoder's distinct rows and gives the same blocks, dropped when it needs a row per internal row.
    Either way, in either layout, the blocks equal a plain autograd loop."""
    model = _ConvToy(consume).eval()
    model.use_inverse_triples = inverse
    names = ["lin.weight", "lin.bias"]
    engine = Engine(model, describe_parameters(model, names), get_loss("bce"))
    triples = _twins(inverse)
    expected = _autograd_rows(model, triples, names)
    plan = probe(engine, triples).plan
    assert plan.share_rows == kept
    for batch_last in (True, False):
        run = engine.run(triples, plan, batch_last=batch_last)
        blk = run.blocks[0]
        assert isinstance(blk, OuterGrad) and isinstance(blk, SharedOuterGrad) == kept
        if isinstance(blk, SharedOuterGrad):
            assert blk.v.shape[0] == 6 and blk.index.shape == (2 if inverse else 1, 18)
            assert run.distinct == pytest.approx(6 / (36 if inverse else 18))
        assert torch.allclose(densify(run.blocks), expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(densify(engine.run(triples, plan.plain()).blocks), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inverse", [False, True])
def test_shared_rows_give_the_same_products_norms_and_projections(inverse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every consumer of blocks with shared ``v`` rows (inner products, pair products on both paths, norms,
    both projections, concat, select) equals the same blocks with a row each, against float64 truth."""
    import tracin_index.forms as G
    from tracin_index.forms import concat, inner, inner_pairs, select, sq_norms
    from tracin_index.projection import ProjectionSpec, make_projector

    model = _ConvToy("view").eval()
    model.use_inverse_triples = inverse
    tracked = describe_parameters(model, ["lin.weight", "lin.bias"])
    engine = Engine(model, tracked, get_loss("bce"))
    triples = _twins(inverse)
    shared = engine.run(triples, probe(engine, triples).plan).blocks
    assert isinstance(shared[0], SharedOuterGrad)
    plain = [OuterGrad(b.u, b.full_v()) if isinstance(b, SharedOuterGrad) else b for b in shared]
    dense = densify(plain).double()
    assert torch.allclose(densify(shared).double(), dense)
    assert torch.allclose(sq_norms(shared).double(), (dense * dense).sum(1), rtol=1e-5)
    gram = dense @ dense.T
    for a, b in ((shared, shared), (plain, shared), (shared, plain)):
        assert torch.allclose(inner(a, b).double(), gram, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))
    gen = torch.Generator().manual_seed(6)
    ia, ib = torch.randint(18, (40,), generator=gen), torch.randint(18, (40,), generator=gen)
    for dense_pairs in (1 << 20, 0):  # every pair matrix dense / every one sampled
        monkeypatch.setattr(G, "DENSE_PAIRS", dense_pairs)
        for a, b in ((shared, shared), (plain, shared), (shared, plain), (plain, plain)):
            got = inner_pairs(a, b, ia, ib).double()
            assert torch.allclose(got, gram[ia, ib], rtol=1e-5, atol=1e-6 * float(gram.abs().max()))
    for kind in ("sparse", "gaussian"):
        projector = make_projector(ProjectionSpec(kind=kind, dim=64, seed=3), tracked, torch.device("cpu"))
        assert torch.allclose(projector(shared), projector(plain), rtol=1e-5, atol=1e-5)
    both = concat([shared, plain, shared])
    assert torch.allclose(densify(both).double(), torch.cat([dense, dense, dense]))
    pick = torch.tensor([17, 0, 5, 5])
    assert torch.allclose(densify(select(shared, pick)).double(), dense[pick])


def test_distinct_rows_groups_equal_rows_and_never_merges_different_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal rows are grouped (checked against ``torch.unique(dim=0)``); a batch with too few repeats, rows that are
    not one per internal row, a NaN, or two different rows with equal keys make it decline."""
    import tracin_index.plan as G

    gen = torch.Generator().manual_seed(7)
    distinct = torch.randn(4, 2, 3, generator=gen)
    pick = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3])
    x = distinct[pick]
    found = G._distinct_rows(x, 8)
    assert found is not None
    rows, index = found
    assert torch.equal(rows[index], x) and rows.shape == (4, 2, 3)
    assert rows.shape[0] == torch.unique(x.reshape(8, -1), dim=0).shape[0]
    assert G._distinct_rows(x, 9) is None  # not the model's rows
    assert G._distinct_rows(distinct[torch.tensor([0, 1, 2, 3, 0])], 5) is None  # 4 of 5 distinct: not worth it
    with_nan = x.clone()
    with_nan[0, 0, 0] = with_nan[2, 0, 0] = float("nan")
    assert G._distinct_rows(with_nan, 8) is None
    monkeypatch.setitem(G._KEY_WEIGHTS, (6, x.device), torch.zeros(6, 2))  # every key equal
    assert G._distinct_rows(x, 8) is None


def test_batches_grow_while_rows_share_inputs_and_give_the_same_rows(conve_inverse: Trained,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Nations' rows share (head, relation) inputs: batches grow past ``batch_size`` while their distinct inputs stay
    within 1.5x a plain batch's rows, and the rows, norms and pair products equal those of fixed batches."""
    import tracin_index.tracer as T
    from tracin_index.model import load_checkpoints
    from tracin_index.tracer import Tracer

    bundle = load_model(conve_inverse.directory)
    names = select_parameters(bundle.model, "last:2", bundle.triples.mapped[:2])
    tracer = Tracer(bundle, load_checkpoints(bundle.model, conve_inverse.checkpoints), names, "bce",
                    ProjectionSpec("sparse", 256, 0), torch.device("cpu"))
    triples = bundle.triples.mapped[:700]
    batches: list[torch.Tensor] = []
    original = tracer.gradients

    def spy(t: torch.Tensor, c: int, *args: object, **kwargs: object) -> object:
        batches.append(t)
        return original(t, c, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tracer, "gradients", spy)
    grown = tracer.rows(triples, batch_size=32)
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 2 * len(triples) and max(sizes) > 32  # two checkpoints
    for b in batches:  # the budget: distinct inputs of a batch within 1.5x a plain batch's rows
        if len(b) > 32:
            rows, _ = internal_rows(bundle.model, b)
            assert torch.unique(rows[:, :2], dim=0).shape[0] <= 1.5 * 32 * 2
    test = conve_inverse.testing[:4]
    tests = tracer.rows(test, keep_blocks=True).blocks
    pair_test, pair_train = torch.arange(4).repeat(len(triples)), torch.arange(len(triples)).repeat_interleave(4)
    grown_pairs = tracer.exact_pairs(tests, triples, pair_test, pair_train, batch_size=32)
    batches.clear()
    monkeypatch.setattr(T, "SHARED_GROWTH", 1)
    plain = tracer.rows(triples, batch_size=32)
    assert max(len(b) for b in batches) == 32
    assert torch.allclose(grown.rows, plain.rows, rtol=1e-4, atol=1e-4 * float(plain.rows.abs().max()))
    assert torch.allclose(grown.sq_norms, plain.sq_norms, rtol=1e-4)
    plain_pairs = tracer.exact_pairs(tests, triples, pair_test, pair_train, batch_size=32)
    assert torch.allclose(grown_pairs, plain_pairs, rtol=1e-4, atol=1e-4 * float(plain_pairs.abs().max()))


@pytest.mark.parametrize(("r", "b", "f"), [(1, 5, 300), (2, 7, 600), (3, 4, 256), (2, 1, 10)])
def test_norms_of_batch_innermost_rows_equal_the_plain_sum(r: int, b: int, f: int) -> None:
    """Squared gradient norms from ``v`` laid out batch-innermost (feature blocks of GRAM_CHUNK and a partial
    last block) equal those of the per-triple gradient itself, in float64."""
    from tracin_index.forms import sq_norms

    gen = torch.Generator().manual_seed(5)
    u = torch.randn(r, b, 3, generator=gen)
    memory = torch.randn(f, r, b, generator=gen)  # features outermost, batch innermost
    v = memory.permute(1, 2, 0)  # (R, B, f) view
    assert v.stride(-1) != 1 or b == 1
    got = sq_norms([OuterGrad(u=u, v=v)])
    g = torch.einsum("rbo,rbi->boi", u.double(), v.double()).reshape(b, -1)  # the per-triple gradient itself
    assert torch.allclose(got.double(), (g * g).sum(1), rtol=1e-5)
    # the same rows shared (two internal rows per distinct input), in either layout of the distinct rows
    distinct = torch.randn(f, 3, generator=gen)  # 3 distinct rows, batch innermost
    index = torch.randint(3, (r, b), generator=gen)
    for rows in (distinct.T, distinct.T.contiguous()):
        got = sq_norms([SharedOuterGrad(u=u, v=rows, index=index)])
        g = torch.einsum("rbo,rbi->boi", u.double(), rows.double()[index]).reshape(b, -1)
        assert torch.allclose(got.double(), (g * g).sum(1), rtol=1e-5)
