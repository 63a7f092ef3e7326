"""Against the peers: Captum's TracIn (printed as target 5) and the earlier tool's per-pair loop (target 6).

Workload: UMLS (ships with pykeen; nothing is downloaded), ConvE trained as in ``bench_self_influence.py``
(d=200, 32 filters, LCWA + BCEAfterSigmoid, inverse triples, Adam with ExponentialLR), one TracinCheckpoint
(the final epoch, with its learning rate), the layer ``interaction.hr1d.0`` (the 10368->200 Linear), projection
dimension k, ``--queries`` seeded test triples, top-10 at both ends.

**Target 5, Captum 0.9.** The quantity ours computes (Q): per training triple, the gradient of the bce loss
``softplus(-s(h, r, t))`` summed over the triple's two internal rows ``(h, 2r, t)`` and ``(t, 2r+1, h)`` (inverse
triples), restricted to ``interaction.hr1d.0`` (weight and bias); the same for the test triple; the lr-weighted
inner product. Ground truth = brute force over every row (``index.exact_influence``).

- ``TracInCP`` (exact) computes Q itself: the model handed to Captum maps a raw triple to its two row scores
  (``hr1d.0`` runs twice per example, and Captum's per-sample gradient hooks add the two calls up), the loss is
  ``softplus(-out)`` summed, ``layers=["conve.interaction.hr1d.0"]``, ``sample_wise_grads_per_batch=True``. It has
  no build step: every ``influence`` call recomputes every training gradient. Checked against the ground truth.
- ``TracInCPFastRandProj`` cannot compute Q. It keeps one ``(dL/d out) x (layer input)`` outer product per example,
  with ``out`` the model's output and the hooked layer required to produce it; a triple with inverse rows passes
  through ``hr1d.0`` twice, a rank-2 gradient that this factorisation cannot hold (and the hook keeps only the last
  call's input). It runs in the 1-N LCWA setting: one example per internal ``(h, r)`` pair (both directions) with the
  multi-hot label vector of all its training tails; the model is ConvE up to ``hr1d.0``'s output (so that Linear is
  ``final_fc_layer`` and produces the model's output) and ``loss_fn`` is the rest of the network (dropout off,
  BatchNorm1d on running statistics, ReLU, tail-embedding product + entity bias) followed by BCE with logits over all
  tails, ``reduction="sum"``. That is the LCWA training objective; only ``hr1d.0``'s weight is tracked (Captum's
  fast variants drop the bias). Test examples: the test triple's forward row ``(h, 2r)``, label one-hot on ``t``.
  ``projection_dim=k`` becomes a 32x32 Kronecker Gaussian for k=1024 (``sqrt(k)`` per factor), i.e. k numbers per
  row; the default search is Annoy (approximate). Its recall is measured against its own exact quantity
  (``TracInCPFast``, no projection, brute force), since its units and loss differ from Q.
- Ours: ``build_index`` (sparse, k, ``layers="interaction.hr1d.0"``) + ``open_index(...).query`` for the same test
  triples (default candidates, exact re-rank), and the projected lists without re-rank.

**Target 6, the earlier ``run_tracin.py``.** Per (test, train) pair: ``model.zero_grad()``, one forward of the
training triple, ``loss.backward()`` over the whole model, the tracked gradients copied out and dotted with the
cached test gradient, times the checkpoint's lr. Timed on a slice (``--pair-tests`` x ``--pair-train`` pairs) of the
UMLS model and of a random-initialised FB15k-237-shaped ConvE (14,541 entities, 237 relations), checked against
ours on the slice, and extrapolated to full queries. Ours: measured one-query latency and bulk scoring on UMLS.

Every timed part runs after a warm-up on a small subset, ``--repeats`` times for ours and Captum's fast variants (the
fastest is reported: on a shared VM timings vary between runs, for every method; recall is
deterministic); ours and ``TracInCPFastRandProj`` alternate round by round, so that both see the same phases of the
machine, and the per-round ratios are printed too. Captum's exact TracInCP (no build step, so the slowest) runs once.

    python benchmarks/bench_peers.py [--epochs 30] [--queries 100] [--dim 1024] [--seed 0] [--threads 2] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import log, machine
from bench_build import synthetic_bundle
from bench_sampling import exact_ends, mean, overlap
from bench_self_influence import quiet, train_conve

LAYER = "interaction.hr1d.0"
FB_TRAIN, FB_TEST = 272_115, 20_466  # FB15k-237 training / test triples
UMLS_LAYER_NOTE = f"`{LAYER}` (Linear 10368->200)"


def require_captum() -> None:
    try:
        import annoy  # noqa: F401  (captum's default search in TracInCPFastRandProj)
        import captum  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f'bench_peers.py needs captum and annoy ({exc.name} is missing): pip install -e ".[bench]"') from None


# ------------------------------------------------------------------------------- models as Captum sees them


def internal_pair(triples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3)`` raw ids -> forward rows ``(h, 2r, t)`` and inverse rows ``(t, 2r+1, h)``, each ``(B, 3)``."""
    h, r, t = triples.unbind(dim=1)
    return torch.stack([h, 2 * r, t], dim=1), torch.stack([t, 2 * r + 1, h], dim=1)


class TripleScores(nn.Module):
    """Q for Captum's ``TracInCP``: raw-id triples ``(B, 3)`` -> ``(B, 2)`` scores of their two internal rows.

    ``hr1d.0`` runs once per direction, so Captum's per-sample gradient hooks sum the two rows' gradients. The
    model's other parameters are frozen, so Captum's hook on the Linear's input (which needs a tensor that requires
    grad) gets it from a pre-hook registered here: a leaf copy of the input, the parameter gradients unchanged.
    ``close()`` removes it.
    """

    def __init__(self, conve: Any) -> None:
        super().__init__()
        self.conve = conve

        def leaf_input(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (args[0].detach().requires_grad_(True), *args[1:])

        self.handle = conve.interaction.hr1d[0].register_forward_pre_hook(leaf_input)

    def close(self) -> None:
        self.handle.remove()

    def forward(self, triples: torch.Tensor) -> torch.Tensor:
        fwd, inv = internal_pair(triples)
        return torch.stack([self.conve.score_hrt(fwd).view(-1), self.conve.score_hrt(inv).view(-1)], dim=1)


class SoftplusSum(nn.Module):
    """bce with label 1 on scores, ``softplus(-s)``, summed over the batch (Captum needs sum or mean)."""

    reduction = "sum"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.softplus(-out).sum()


class UpToHr1d(nn.Module):
    """ConvE up to ``interaction.hr1d.0``: internal ``(B, 2)`` (h, r) ids -> the Linear's output ``(B, d)``."""

    def __init__(self, conve: Any) -> None:
        super().__init__()
        self.conve = conve

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        inter, s = self.conve.interaction, self.conve.interaction.shape_info
        h = self.conve.entity_representations[0](indices=hr[:, 0])
        r = self.conve.relation_representations[0](indices=hr[:, 1])
        shape = (-1, s.input_channels, s.image_height, s.image_width)
        x = inter.hr2d(torch.cat([h.view(shape), r.view(shape)], dim=-2))
        result: torch.Tensor = inter.hr1d[0](x.view(-1, s.num_in_features))
        return result


class HeadBCE(nn.Module):
    """The rest of ConvE after ``hr1d.0`` (dropout, BatchNorm1d, ReLU, tail product + bias), then BCE with
    logits against a ``(B, E)`` label matrix over all tails, summed: the LCWA objective as a function of
    ``hr1d.0``'s output."""

    reduction = "sum"

    def __init__(self, conve: Any) -> None:
        super().__init__()
        self.conve = conve

    def scores(self, y: torch.Tensor) -> torch.Tensor:
        x = self.conve.interaction.hr1d[1:](y)
        emb = self.conve.entity_representations[0](indices=None)
        bias = self.conve.entity_representations[1](indices=None)
        return x @ emb.T + bias.view(1, -1)

    def forward(self, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.scores(y), labels, reduction="sum")


def lcwa_instances(mapped: torch.Tensor, num_entities: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal ``(h, r)`` pairs ``(P, 2) int64`` of the training triples (both directions), and their multi-hot
    tail labels ``(P, E) float32`` (pykeen's LCWA instances, built here)."""
    rows = torch.cat(internal_pair(mapped), dim=0)
    pairs, inverse = torch.unique(rows[:, :2], dim=0, return_inverse=True)
    labels = torch.zeros(len(pairs), num_entities)
    labels[inverse, rows[:, 2]] = 1.0
    return pairs, labels


class ExactNN:
    """Captum ``NearestNeighbors`` interface, brute-force inner products (to separate Annoy's loss from the
    projection's)."""

    def setup(self, data: torch.Tensor) -> None:
        self.data = data.reshape(len(data), -1)

    def get_nearest_neighbors(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = query.reshape(len(query), -1) @ self.data.T
        values, indices = scores.topk(k, dim=1)
        return indices, values


# ------------------------------------------------------------------------------- measurement helpers


@dataclass
class Row:
    method: str
    quantity: str
    build_s: float | None
    query_s: float
    recall: tuple[float, float]

    @property
    def total(self) -> float:
        return (self.build_s or 0.0) + self.query_s


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def best(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``fn``'s last result and its fastest of ``repeats`` runs (timings on a shared VM vary between runs,
    for every method alike; the minimum is the least disturbed)."""
    runs = [timed(fn) for _ in range(max(1, repeats))]
    return runs[-1][0], min(t for _, t in runs)


def recall_lists(got: list[tuple[list[int], list[int]]], truth: list[tuple[list[int], list[int]]]) -> tuple[float, float]:
    """Mean top-k recall per end (test triples whose exact list at that end is empty not counted)."""
    return (mean([overlap(g[0], t[0]) for g, t in zip(got, truth, strict=True)]),
            mean([overlap(g[1], t[1]) for g, t in zip(got, truth, strict=True)]))


def truth_from(matrix: np.ndarray, k: int) -> list[tuple[list[int], list[int]]]:
    positions = np.arange(matrix.shape[1])
    return [exact_ends(matrix[m], positions, k) for m in range(matrix.shape[0])]


def captum_lists(tracin: Any, inputs: tuple[torch.Tensor, ...], k: int,
                 scores: list[torch.Tensor] | None = None) -> list[tuple[list[int], list[int]]]:
    """Top-``k`` proponents and opponents from Captum's ``influence(..., k=k, proponents=True/False)``; the
    influence scores of both calls are appended to ``scores`` when given."""
    pro = tracin.influence(inputs, k=k, proponents=True)
    opp = tracin.influence(inputs, k=k, proponents=False)
    if scores is not None:
        scores.extend([pro.indices, pro.influence_scores, opp.indices, opp.influence_scores])
    return [(pro.indices[m].tolist(), opp.indices[m].tolist()) for m in range(len(inputs[0]))]


def index_lists(results: Any) -> list[tuple[list[int], list[int]]]:
    return [([p.train_index for p in r.proponents], [o.train_index for o in r.opponents]) for r in results]


# ------------------------------------------------------------------------------- the earlier tool


class PairLoop:
    """The earlier ``run_tracin.py`` (``TracInAnalyzer``): per (test, train) pair, ``zero_grad``, one forward of the
    training triple, ``backward`` over the whole model, copy the tracked gradients, dot with the cached test gradient.
    bce with label 1 on ``score_hrt``, summed over the triple's internal rows (inverse triples), as ours."""

    def __init__(self, model: Any, tracked: list[str]) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)
        self.params = {n: p for n, p in model.named_parameters() if n in tracked}

    def gradient(self, triple: torch.Tensor) -> dict[str, torch.Tensor]:
        self.model.zero_grad()
        fwd, inv = internal_pair(triple.view(1, 3))
        scores = self.model.score_hrt(torch.cat([fwd, inv]))
        F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores), reduction="sum").backward()
        return {n: p.grad.detach().clone() for n, p in self.params.items() if p.grad is not None}

    def influences(self, test: torch.Tensor, train: torch.Tensor, lrs: list[float],
                   states: list[dict[str, torch.Tensor]]) -> np.ndarray:
        """``(len(test), len(train))`` TracInCP, one training gradient recomputed per pair and checkpoint."""
        out = np.zeros((len(test), len(train)))
        for lr, state in zip(lrs, states, strict=True):
            self.model.load_state_dict(state)
            for m in range(len(test)):
                g_test = self.gradient(test[m])  # cached per test triple, as the earlier tool does
                for n in range(len(train)):
                    g = self.gradient(train[n])
                    out[m, n] += lr * sum(float(torch.dot(g[k].flatten(), g_test[k].flatten())) for k in g)
        return out


def fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


# ------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.005, help="Adam's initial lr (ExponentialLR, gamma 0.99)")
    parser.add_argument("--queries", type=int, default=100, help="seeded UMLS test triples")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1024, help="projection dimension k (ours and Captum's projection_dim)")
    parser.add_argument("--batch-size", type=int, default=64, help="Captum's training batch size")
    parser.add_argument("--pair-tests", type=int, default=1, help="test triples of the per-pair slice")
    parser.add_argument("--pair-train", type=int, default=200, help="training triples of the per-pair slice")
    parser.add_argument("--pair-threads", type=int, default=1,
                        help="torch threads for the per-pair loop (its ops are too small to gain from more)")
    parser.add_argument("--latency-queries", type=int, default=10, help="single-triple queries timed for ours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the run and the index here")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each timed part of ours and of Captum's fast variants; the fastest is reported")
    args = parser.parse_args()
    require_captum()
    command = shlex.join(["python", *sys.argv])
    quiet()

    from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj
    from pykeen.datasets import UMLS
    from torch.utils.data import TensorDataset

    from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
    from tracin_index.callbacks import find_checkpoints
    from tracin_index.model import load_checkpoints
    from tracin_index.query import default_candidates
    from tracin_index.runtime import configure_threads

    quiet()
    threads = configure_threads(args.threads, tune_allocator=True)
    torch.manual_seed(args.seed)
    top, k = args.top_k, args.dim
    started = time.perf_counter()
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds = UMLS(create_inverse_triples=True)
        log(f"training ConvE on UMLS for {args.epochs} epochs ...")
        run = train_conve(ds.training, ds, root, epochs=args.epochs, dim=200, lr=args.lr, checkpoints=1, seed=args.seed)
        trained = (f"ConvE d=200, 32 filters, LCWA + BCEAfterSigmoid, inverse triples, Adam lr {args.lr} "
                   f"(ExponentialLR 0.99), {args.epochs} epochs, filtered test MRR {run.mrr:.3f} "
                   f"(trained in {run.seconds:.0f} s)")
        bundle = load_model(run.directory)
        ckpts = find_checkpoints(run.checkpoint_dir)
        states = load_checkpoints(bundle.model, ckpts)
        ckpt_lr = {c.name: c.lr for c in states}
        ckpt_state = {c.name: c.state for c in states}
        mapped = bundle.triples.mapped
        n_train = int(mapped.shape[0])
        rng = np.random.default_rng(args.seed)
        testing = ds.testing.mapped_triples
        test = testing[torch.from_numpy(np.sort(rng.choice(len(testing), size=args.queries, replace=False)))]
        conve: Any = bundle.model.eval()
        conve.load_state_dict(states[-1].state)

        def load_ckpt(model: nn.Module, path: str) -> float:  # Captum's checkpoints_load_func
            model.conve.load_state_dict(ckpt_state[path])  # type: ignore[union-attr, operator]
            return ckpt_lr[path]

        names = [c.name for c in states]

        # ---------------------------------------------------------------- ours
        def ours_build(out: Path, rate: float = 1.0) -> float:
            config = BuildConfig(layers=LAYER, projection=ProjectionSpec(kind="sparse", dim=k, seed=args.seed),
                                 sample_rate=rate, stratify="none", sample_seed=args.seed)
            return timed(lambda: build_index(bundle, out, checkpoints=ckpts, config=config, force=True))[1]

        log("warm-up: ours on a 5% sample ...")
        ours_build(root / "warm", 0.05)
        open_index(root / "warm", model=bundle).query(test[:2], k=top)
        log("ours: build ...")
        ours_build(root / "idx")

        def cold(**kw: Any) -> tuple[float, Any, Any]:
            """A fresh ``open_index`` and its first query: seconds, the index, the results."""
            t0 = time.perf_counter()
            opened = open_index(root / "idx", model=bundle)
            got = opened.query(test, k=top, **kw)
            return time.perf_counter() - t0, opened, got

        plain = {"candidates": top, "opponent_candidates": top, "rerank": False}
        _, index, res = cold()
        exact_q = index.exact_influence(test).double().numpy()  # brute force over every row: Q's ground truth
        truth_q = [exact_ends(exact_q[m], index.train_index, top) for m in range(len(test))]
        recall_rerank = recall_lists(index_lists(res), truth_q)
        recall_plain = recall_lists(index_lists(cold(**plain)[2]), truth_q)

        # ---------------------------------------------------------------- Captum TracInCP, exact, on Q
        triple_model = TripleScores(conve).eval()
        train_ds = TensorDataset(mapped, torch.ones(n_train, 2))
        test_in = (test, torch.ones(len(test), 2))

        def tracincp(dataset: TensorDataset) -> Any:
            return TracInCP(triple_model, dataset, names, checkpoints_load_func=load_ckpt, layers=[f"conve.{LAYER}"],
                            loss_fn=SoftplusSum(), batch_size=args.batch_size, sample_wise_grads_per_batch=True)

        log("warm-up: Captum TracInCP on 256 rows ...")
        captum_lists(tracincp(TensorDataset(mapped[:256], torch.ones(256, 2))), (test[:2], test_in[1][:2]), top)
        log("Captum TracInCP (exact): k-most-influential at both ends ...")
        cp, cp_build = timed(lambda: tracincp(train_ds))
        returned: list[torch.Tensor] = []
        got, cp_q = timed(lambda: captum_lists(cp, test_in, top, returned))
        diff = max(float(np.abs(vals.double().numpy() - np.take_along_axis(exact_q, idx.numpy(), axis=1)).max())
                   for idx, vals in (returned[0:2], returned[2:4]))
        notes.append(f"Captum `TracInCP` vs our brute force on Q: its returned top-{top} influences (both ends, all "
                     f"tests) differ by at most {diff / np.abs(exact_q).max():.1e} of max |influence|")
        rows.append(Row("Captum TracInCP (exact), sample_wise_grads_per_batch", "Q", cp_build, cp_q,
                        recall_lists(got, truth_q)))
        triple_model.close()

        # ---------------------------------------------------------------- Captum fast variants, 1-N LCWA
        pairs, labels = lcwa_instances(mapped, conve.num_entities)
        up, head = UpToHr1d(conve).eval(), HeadBCE(conve)
        with torch.no_grad():
            check = (head.scores(up(pairs[:64])) - conve.score_t(pairs[:64])).abs().max().item()
        assert check < 1e-4, f"ConvE split at hr1d.0 does not reproduce score_t ({check})"
        fwd_rows = internal_pair(test)[0]
        test_hr = (fwd_rows[:, :2], F.one_hot(fwd_rows[:, 2], conve.num_entities).float())
        lcwa_ds = TensorDataset(pairs, labels)

        def fast(cls: Any, dataset: TensorDataset, **kw: Any) -> Any:
            return cls(up, f"conve.{LAYER}", dataset, names, checkpoints_load_func=load_ckpt, loss_fn=head,
                       batch_size=args.batch_size, **kw)

        exact_fast = fast(TracInCPFast, lcwa_ds)
        matrix_f = exact_fast.influence(test_hr).double().numpy()
        truth_f = truth_from(matrix_f, top)
        log("warm-up: Captum TracInCPFastRandProj on 256 rows ...")
        small = TensorDataset(pairs[:256], labels[:256])
        captum_lists(fast(TracInCPFastRandProj, small, projection_dim=k, seed=args.seed),
                     (test_hr[0][:2], test_hr[1][:2]), top)
        log(f"ours and Captum TracInCPFastRandProj, {args.repeats} interleaved rounds of build + queries ...")
        timing: dict[str, list[float]] = {"ob": [], "oq": [], "on": [], "cb": [], "cq": []}
        for _ in range(max(1, args.repeats)):  # side by side, so that both see the same phase of this VM
            timing["ob"].append(ours_build(root / "idx"))
            timing["oq"].append(cold()[0])
            timing["on"].append(cold(**plain)[0])
            frp, cb = timed(lambda: fast(TracInCPFastRandProj, lcwa_ds, projection_dim=k, seed=args.seed))
            got, cq = timed(functools.partial(captum_lists, frp, test_hr, top))
            timing["cb"].append(cb)
            timing["cq"].append(cq)
        build_s = min(timing["ob"])
        rows.insert(0, Row(f"ours: sparse k={k}, re-rank (default candidates {default_candidates(top)})", "Q", build_s,
                           min(timing["oq"]), recall_rerank))
        rows.insert(1, Row(f"ours: sparse k={k}, projected top-{top}, no re-rank", "Q", build_s, min(timing["on"]),
                           recall_plain))
        frp_build, frp_q = min(timing["cb"]), min(timing["cq"])
        for name, q in (("re-rank", "oq"), ("no re-rank", "on")):
            ratios = sorted((b + c) / (o + t) for b, c, o, t in
                            zip(timing["cb"], timing["cq"], timing["ob"], timing[q], strict=True))
            notes.append(f"Ours ({name}) against TracInCPFastRandProj (Annoy) end to end, round by round: "
                         f"{', '.join(f'{r:.2f}x' for r in ratios)} (median {float(np.median(ratios)):.2f}x)")
        stored = int(frp.src_intermediate_quantities.shape[1])
        rows.append(Row(f"Captum TracInCPFastRandProj, projection_dim={k} ({stored} numbers/row), Annoy (default)",
                        "LCWA 1-N", frp_build, frp_q, recall_lists(got, truth_f)))
        nn_search = ExactNN()
        nn_s = timed(lambda: nn_search.setup(frp.src_intermediate_quantities))[1]
        frp.nearest_neighbors = nn_search
        got, q2 = best(lambda: captum_lists(frp, test_hr, top), args.repeats)
        rows.append(Row(f"Captum TracInCPFastRandProj, projection_dim={k}, exact search", "LCWA 1-N",
                        frp_build, q2 + nn_s, recall_lists(got, truth_f)))
        got, fq = best(lambda: captum_lists(exact_fast, test_hr, top), args.repeats)
        rows.append(Row("Captum TracInCPFast (exact, no projection)", "LCWA 1-N",
                        best(lambda: fast(TracInCPFast, lcwa_ds), args.repeats)[1], fq, recall_lists(got, truth_f)))
        # How far apart the two quantities are: Q's top-10 (triples) vs LCWA 1-N's (h, r) instances that hold them.
        pair_id = {tuple(p): i for i, p in enumerate(pairs.tolist())}
        owner = [pair_id[(int(h), 2 * int(r))] for h, r, _ in mapped.tolist()]
        agree = mean([sum(owner[i] in set(truth_f[m][0]) for i in truth_q[m][0]) / len(truth_q[m][0])
                      if truth_q[m][0] else None for m in range(len(test))])
        notes.append(f"Captum's fast variants rank {len(pairs):,} LCWA (h, r) instances (both directions), ours "
                     f"{n_train:,} triples. Mapping each of Q's exact top-{top} proponents to its forward (h, 2r) "
                     f"instance, {agree:.2f} of them (mean over tests) are among the LCWA 1-N exact top-{top} "
                     f"proponents: the two quantities rank different things")

        # ---------------------------------------------------------------- target 6: the per-pair loop
        log("per-pair loop (earlier run_tracin.py) on UMLS ...")
        torch.set_num_threads(args.pair_threads)
        loop = PairLoop(conve, [f"{LAYER}.weight", f"{LAYER}.bias"])
        lrs, sd = [c.lr for c in states], [c.state for c in states]
        pair_test, pair_train = test[: args.pair_tests], mapped[: args.pair_train]
        loop.influences(pair_test, mapped[:5], lrs, sd)  # warm-up
        vals, loop_s = timed(lambda: loop.influences(pair_test, pair_train, lrs, sd))
        ref = exact_q[: args.pair_tests, : args.pair_train]
        loop_rel = float(np.abs(vals - ref).max() / np.abs(ref).max())
        per_pair = loop_s / (len(pair_test) * len(pair_train) * len(states))
        conve.eval()
        for p in conve.parameters():
            p.requires_grad_(False)

        log("per-pair loop on an FB15k-237-shaped ConvE ...")
        fb = synthetic_bundle(2000, 14541, 237, root)
        fb_loop = PairLoop(fb.model.eval(), [f"{LAYER}.weight", f"{LAYER}.bias"])
        fb_state = [{n: v.detach().clone() for n, v in fb.model.state_dict().items()}]
        fb_loop.influences(fb.triples.mapped[:1], fb.triples.mapped[:5], [1.0], fb_state)  # warm-up
        fb_s = timed(lambda: fb_loop.influences(fb.triples.mapped[:1], fb.triples.mapped[1 : 1 + args.pair_train],
                                                [1.0], fb_state))[1]
        fb_pair = fb_s / args.pair_train
        torch.set_num_threads(threads)

        log("ours: single-triple latency and bulk scoring of the UMLS test set ...")
        lat = []
        for m in range(min(args.latency_queries, len(test))):
            t0 = time.perf_counter()
            index.query(test[m : m + 1], k=top)
            lat.append(time.perf_counter() - t0)
        bulk_res, bulk_s = timed(lambda: index.score(testing, k=top))
        assert len(bulk_res) == len(testing)
        total = time.perf_counter() - started

    # ---------------------------------------------------------------- tables
    ref_row = next(r for r in rows if r.method.startswith("Captum TracInCPFastRandProj") and "Annoy" in r.method)
    cp_row = next(r for r in rows if r.method.startswith("Captum TracInCP ("))
    print(f"\nmachine: {machine()}; torch {torch.__version__}, {threads} threads; captum 0.9; "
          f"date {datetime.date.today().isoformat()}; total {total:.0f} s")
    print(f"workload: UMLS, {n_train:,} training triples; {trained}; {len(states)} checkpoint (lr {states[0].lr:.3g}); "
          f"layer {UMLS_LAYER_NOTE}; k={k}; {len(test)} seeded test triples (seed {args.seed}); top-{top}. Each timed part "
          f"of ours and of Captum's fast variants: the fastest of {args.repeats} runs after a warm-up, ours and "
          f"TracInCPFastRandProj in interleaved rounds (ours: open + first query together, a fresh open each run); "
          f"Captum TracInCP (exact): one run.")
    print(f"command: `{command}`\n")
    print("Target 5. Q = ours (triple, both inverse rows, bce, hr1d.0 weight+bias); LCWA 1-N = Captum's fast variants "
          "((h, r) instance, BCE over all tails, hr1d.0 weight). Recall against the exact top-10 of the method's own "
          "quantity. Query = both ends for all tests (ours: `open_index` + one `query` call; Captum: "
          "`influence(k=10, proponents=True)` + `(..., proponents=False)`).\n")
    print("| method | quantity | build s | query s (all tests) | end-to-end s | pro recall@10 | opp recall@10 "
          "| speedup vs FastRandProj | speedup vs TracInCP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = "-" if r.build_s is None else f"{r.build_s:.2f}"
        print(f"| {r.method} | {r.quantity} | {b} | {r.query_s:.2f} | {r.total:.2f} | {r.recall[0]:.3f} "
              f"| {r.recall[1]:.3f} | {ref_row.total / r.total:.2f}x | {cp_row.total / r.total:.2f}x |")
    print("\n" + "\n".join(f"- {n}" for n in notes))

    ours_row = rows[0]
    print(f"\nTarget 6. The earlier tool's per-pair loop: {args.pair_tests} test x {args.pair_train} training triples "
          f"x {len(states)} checkpoint, {args.pair_threads} torch thread(s); agrees with ours on the slice to "
          f"{loop_rel:.1e} (max relative). Extrapolated = "
          f"pairs x measured seconds per pair, per checkpoint (multiply by the number of checkpoints).\n")
    print("| workload | earlier per-pair loop | ours |")
    print("|---|---|---|")
    print(f"| seconds per (test, train) pair, UMLS model (measured) | {per_pair * 1e3:.2f} ms | - |")
    print(f"| seconds per pair, FB15k-237-shaped ConvE, 14,541 entities (measured) | {fb_pair * 1e3:.2f} ms | - |")
    lat_ms = 1e3 * np.asarray(lat)
    print(f"| one query, all {n_train:,} UMLS training triples | {fmt_s(per_pair * n_train)} (extrapolated) "
          f"| {np.median(lat_ms):.0f} ms p50 over {len(lat)} queries (measured; index built once in {ours_row.build_s:.1f} s) |")
    print(f"| whole UMLS test set ({len(testing)} tests) | {fmt_s(per_pair * n_train * len(testing))} (extrapolated) "
          f"| {bulk_s:.1f} s bulk `score` (measured) + {ours_row.build_s:.1f} s build |")
    print(f"| one query, FB15k-237 ({FB_TRAIN:,} training triples) | {fmt_s(fb_pair * FB_TRAIN)} (extrapolated) "
          f"| see RESULTS.md (bench_query.py at 272k rows) |")
    print(f"| whole FB15k-237 test set ({FB_TEST:,} tests) | {fmt_s(fb_pair * FB_TRAIN * FB_TEST)} (extrapolated) "
          f"| see RESULTS.md (bench_query.py --bulk) |")


if __name__ == "__main__":
    main()
