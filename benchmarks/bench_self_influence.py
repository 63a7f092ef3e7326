"""Mislabel detection: does self-influence find flipped training triples better than the model's own loss?

A dataset that ships with pykeen (``--dataset umls`` or ``kinships``): the tail of a seeded ``--noise``
fraction of the training triples is replaced by a random other entity (never an existing triple). The model
(``--model conve``: ConvE, LCWA, BCEAfterSigmoid, inverse triples; ``complex``: ComplEx, LCWA, BCEWithLogits;
both Adam with ExponentialLR) is trained on the noisy set with a TracinCheckpoint callback, then indexed.
Training triples are ranked by ``open_index(...).self_influence()``, plain (``sum_c lr_c ||g_c||^2``) and
following Adam's step (``optimizer="adam"``: ``sum_c lr_c <g_c, P_c g_c>``), and by two baselines: the final
model's BCE loss per triple (the usual mislabel-detection baseline) and that loss summed over the same
checkpoints with their learning rates (what TracInCP's checkpoint sum adds, without the gradient). Prints
markdown tables: ROC AUC and precision among the top ``--noise`` fraction. ``--settings all`` adds other
layers, losses and checkpoint choices.

    python benchmarks/bench_self_influence.py [--dataset umls] [--model conve] [--epochs E] [--dim D]
        [--noise 0.05] [--seed 0] [--checkpoints 4] [--lr LR] [--settings main|all] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.metrics import bce_loss_per_triple, flip_tails, precision_at, roc_auc


@dataclass
class Run:
    """A trained pykeen run: ``save_to_directory`` output, TracinCheckpoint files, test MRR, seconds."""

    directory: Path
    checkpoint_dir: Path
    mrr: float
    seconds: float


MODELS: dict[str, dict[str, Any]] = {
    "conve": {"model": "ConvE", "inverse": True, "loss": "BCEAfterSigmoid", "epochs": 100, "dim": 200, "lr": 0.005,
              "kwargs": {"output_channels": 32}, "batch_size": 128},
    "complex": {"model": "ComplEx", "inverse": False, "loss": "BCEWithLogits", "epochs": 50, "dim": 64, "lr": 0.05,
                "kwargs": {}, "batch_size": 256},
}


def train(kind: str, training: Any, dataset: Any, root: Path, *, epochs: int, dim: int, lr: float, checkpoints: int,
          seed: int) -> Run:
    """The model as it is normally trained (LCWA + BCE, Adam, ExponentialLR), with ``checkpoints`` evenly spaced
    saves."""
    from pykeen.pipeline import pipeline

    from tracin_index.callbacks import TracinCheckpoint

    spec = MODELS[kind]
    started = time.perf_counter()
    callback = TracinCheckpoint(root / "checkpoints", frequency=max(1, epochs // checkpoints))
    result = pipeline(
        training=training,
        testing=dataset.testing,
        validation=dataset.validation,  # no early stopping: only filters the evaluation
        model=spec["model"],
        model_kwargs={"embedding_dim": dim, **spec["kwargs"]},
        training_loop="LCWA",
        loss=spec["loss"],
        optimizer="Adam",
        optimizer_kwargs={"lr": lr},
        lr_scheduler="ExponentialLR",
        lr_scheduler_kwargs={"gamma": 0.99},
        training_kwargs={"num_epochs": epochs, "batch_size": spec["batch_size"], "use_tqdm": False,
                         "callbacks": [callback]},
        evaluation_kwargs={"batch_size": 512, "use_tqdm": False},
        random_seed=seed,
        device="cpu",
    )
    result.save_to_directory(root / "run")
    return Run(root / "run", root / "checkpoints", float(result.metric_results.get_metric("mrr")),
               time.perf_counter() - started)


def train_conve(training: Any, dataset: Any, root: Path, *, epochs: int, dim: int, lr: float, checkpoints: int,
                seed: int) -> Run:
    """ConvE as it is normally trained (LCWA + BCE, inverse triples); the other benchmarks' model."""
    return train("conve", training, dataset, root, epochs=epochs, dim=dim, lr=lr, checkpoints=checkpoints, seed=seed)


def quiet() -> None:
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("pykeen")] + ["pykeen"]:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch_max_mem").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def scores_by_position(ranking: list[Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A self-influence ranking as (order of training positions, score per training position)."""
    order = np.array([item.train_index for item in ranking], dtype=np.int64)
    scores = np.full(n, np.nan)
    scores[order] = [item.influence for item in ranking]
    return order, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["umls", "kinships"], default="umls")
    parser.add_argument("--model", choices=sorted(MODELS), default="conve")
    parser.add_argument("--epochs", type=int, default=None, help="default: conve 100, complex 50")
    parser.add_argument("--dim", type=int, default=None, help="embedding_dim (default: conve 200 with 32 filters, "
                                                                   "complex 64)")
    parser.add_argument("--noise", type=float, default=0.05, help="fraction of training tails flipped")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips, the training and the random ranking")
    parser.add_argument("--checkpoints", type=int, default=4, help="evenly spaced TracinCheckpoint saves")
    parser.add_argument("--lr", type=float, default=None, help="Adam's initial lr, ExponentialLR gamma 0.99 (default: "
                                                                   "conve 0.005, complex 0.05)")
    parser.add_argument("--settings", choices=["main", "all"], default="main",
                        help="main: last:2 layers, all checkpoints, bce; all: also other layers, losses, checkpoints")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the run, checkpoints and indexes here")
    args = parser.parse_args()
    spec = MODELS[args.model]
    epochs, dim, lr = args.epochs or spec["epochs"], args.dim or spec["dim"], args.lr or spec["lr"]
    quiet()

    from pykeen.datasets import UMLS, Kinships
    from pykeen.triples import TriplesFactory

    from tracin_index import BuildConfig, InputError, build_index, load_model, open_index
    from tracin_index.callbacks import find_checkpoints
    from tracin_index.model import load_checkpoints
    from tracin_index.runtime import configure_threads

    quiet()  # again: pykeen's modules are imported now
    configure_threads(args.threads, tune_allocator=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds = (UMLS if args.dataset == "umls" else Kinships)(create_inverse_triples=spec["inverse"])
        clean = ds.training
        assert ds.validation is not None
        known = torch.cat([ds.validation.mapped_triples, ds.testing.mapped_triples])
        noisy, flipped = flip_tails(clean.mapped_triples, args.noise, clean.num_entities, args.seed, forbidden=known)
        training = TriplesFactory(mapped_triples=noisy, entity_to_id=clean.entity_to_id,
                                  relation_to_id=clean.relation_to_id, create_inverse_triples=spec["inverse"])
        run = train(args.model, training, ds, root, epochs=epochs, dim=dim, lr=lr, checkpoints=args.checkpoints,
                    seed=args.seed)
        bundle = load_model(run.directory)
        mapped = bundle.triples.mapped
        # label by content, not position: the saved training triples need not keep the given order
        bad = {tuple(row) for row in noisy[torch.from_numpy(flipped)].tolist()}
        labels = np.array([tuple(row) in bad for row in mapped.tolist()])
        n = len(labels)
        assert labels.sum() == len(flipped)
        ckpts = find_checkpoints(run.checkpoint_dir)

        def measure(scores: np.ndarray, order: np.ndarray | None = None) -> tuple[float, float]:
            order = np.argsort(-scores, kind="stable") if order is None else order
            return roc_auc(scores, labels), precision_at(order, labels, args.noise)

        rows: list[tuple[str, str, str, str, float, float, float | None]] = []
        rng = np.random.default_rng(args.seed)
        rows.append(("random ranking (seeded)", "-", "-", "-", *measure(rng.random(n)), None))
        final_loss = bce_loss_per_triple(bundle.model, mapped)
        rows.append(("loss baseline: final model", "-", f"epoch {epochs}", "bce", *measure(final_loss), None))
        states = load_checkpoints(copy.deepcopy(bundle.model), ckpts)
        per_ckpt_loss = []
        model = copy.deepcopy(bundle.model)
        for state in states:
            model.load_state_dict(state.state)
            per_ckpt_loss.append(bce_loss_per_triple(model, mapped))
        summed = sum(state.lr * loss for state, loss in zip(states, per_ckpt_loss, strict=True))
        rows.append(("loss summed over checkpoints (lr-weighted)", "-", f"{len(ckpts)} ckpts", "bce",
                     *measure(np.asarray(summed)), None))

        settings = [("last:2", "all", "bce")]
        if args.settings == "all":
            settings += [("last:2", "last", "bce"), ("last:2", "last", "ce"), ("last:2", "all", "ce"),
                         ("last:2", "all", "score"), ("all", "last", "bce"), ("all", "all", "bce"), ("all", "last", "ce")]
        norms_by_ckpt: np.ndarray | None = None
        for layers, which, loss in settings:
            chosen = ckpts[-1:] if which == "last" else ckpts
            label = f"epoch {epochs}" if which == "last" else f"{len(ckpts)} ckpts"
            out = root / f"idx_{layers.replace(':', '')}_{which}_{loss}"
            t0 = time.perf_counter()
            try:
                build_index(bundle, out, checkpoints=chosen, config=BuildConfig(layers=layers, loss=loss), force=True)
            except InputError as exc:
                rows.append((f"TracIn: refused ({str(exc).split(':')[0]})", layers, label, loss, float("nan"),
                             float("nan"), time.perf_counter() - t0))
                continue
            seconds = time.perf_counter() - t0
            index = open_index(out)
            order, scores = scores_by_position(index.self_influence(), n)
            rows.append(("TracIn self-influence", layers, label, loss, *measure(scores, order), seconds))
            if which == "all":  # following Adam's step: the model's own optimizer
                t0 = time.perf_counter()
                order, scores = scores_by_position(index.self_influence(optimizer="adam"), n)
                rows.append(("TracIn self-influence, Adam's step", layers, label, loss, *measure(scores, order),
                             time.perf_counter() - t0))
            if (layers, which, loss) == ("last:2", "all", "bce"):
                norms = np.asarray(index.store.array("norms")[:], dtype=np.float64)  # (N, C) exact ||g_c||
                norms_by_ckpt = np.empty_like(norms)
                norms_by_ckpt[index.train_index] = norms
        total = time.perf_counter() - started

    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    shape = f"d={dim}" + (", 32 filters" if args.model == "conve" else "")
    print(f"workload: {args.dataset}, {n:,} training triples, {len(flipped)} tails flipped ({args.noise:.0%}, seed "
          f"{args.seed}); {spec['model']} {shape}, LCWA + {spec['loss']}{', inverse triples' if spec['inverse'] else ''}, "
          f"Adam lr {lr} (ExponentialLR 0.99), {epochs} epochs, filtered test MRR {run.mrr:.3f}, trained in "
          f"{run.seconds:.0f} s")
    print(f"checkpoints: epochs {', '.join(Path(p).stem.split('_')[-1].lstrip('0') for p, _ in ckpts)}; "
          f"sparse k=1024 (self-influence itself is exact); total {total:.0f} s\n")
    print(f"| ranking | layers | checkpoints | loss | ROC AUC | P@{args.noise:.0%} | build s |")
    print("|---|---|---|---|---|---|---|")
    for name, layers, label, loss, auc, prec, secs in rows:
        cells = "refused | refused" if np.isnan(auc) else f"{auc:.3f} | {prec:.3f}"
        print(f"| {name} | {layers} | {label} | {loss} | {cells} | {'-' if secs is None else f'{secs:.1f}'} |")

    if norms_by_ckpt is not None:
        print("\nTraining length: each checkpoint alone (TracIn last:2 bce = lr_c ||g_c||^2 from the stored norms; "
              "loss = that checkpoint's BCE)\n")
        print(f"| epoch | lr | loss AUC | loss P@{args.noise:.0%} | TracIn AUC | TracIn P@{args.noise:.0%} |")
        print("|---|---|---|---|---|---|")
        for c, (path, lr) in enumerate(ckpts):
            tracin = measure(lr * norms_by_ckpt[:, c] ** 2)
            loss_m = measure(per_ckpt_loss[c])
            epoch = Path(path).stem.split("_")[-1].lstrip("0")
            print(f"| {epoch} | {lr:.2e} | {loss_m[0]:.3f} | {loss_m[1]:.3f} | {tracin[0]:.3f} | {tracin[1]:.3f} |")


if __name__ == "__main__":
    main()
