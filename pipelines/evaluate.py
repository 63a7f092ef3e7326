"""Faithfulness evaluation: remove the facts an explanation names, retrain, and see whether the prediction goes.

    python pipelines/evaluate.py CONFIG [--out DIR] [--targets N] [--budget B ...] [--seeds S ...]
        [--methods tracin,cosine,tracin-adam,cosine-adam,embedding,random] [--neighbourhood] [--per-target] [--checkpoints C]

CONFIG is a PyKEEN pipeline configuration, the JSON ``pykeen.pipeline.pipeline_from_config`` reads
(``{"metadata": {...}, "pipeline": {"dataset": "Nations", "model": "DistMult", ...}}``), or the name of a
built-in one (``nations-distmult``, ``umls-conve``, ``kinships-complex``; ``--print-config NAME`` prints it).

For every seed S (the configuration's ``random_seed`` is replaced by S throughout):

1. train the model with ``TracinCheckpoint`` among its training callbacks (C checkpoints, evenly spread),
   ``save_to_directory`` it and build a TracIn index over those checkpoints (``DIR/seed-S/``);
2. pick N test triples the model ranks first (filtered tail rank 1 among all entities), seeded by S;
3. for each method and budget B, take each target's top-B facts to remove (``tracin``: the TracIn
   proponents, ``index.query(targets, k=B)``; ``cosine``: the same in cosine mode; ``embedding``: the
   training triples whose concatenated head/relation/tail embeddings are nearest to the target's by cosine;
   ``random``: random training triples that share an entity with the target);
4. retrain with the same configuration and seed, without the union of all targets' facts (one retrain per
   method, budget and seed; ``--per-target``: one retrain per target), and measure each target on the
   retrained model; beside them the noise floor: a retrain with seed S + ``--noise-offset`` and nothing removed.

Metrics (defined in docs/faithfulness.md): the share of targets that lost rank 1, the relative drop of the
MRR over the targets, the share whose softmax probability p(t | h, r) fell, and the share whose top-1 answer
to (h, r, ?) changed. Writes ``DIR/results.json``, ``DIR/results.md`` and ``DIR/results.png``.

A killed run resumes: every retrain's record goes to ``DIR/runs/<method>-<budget>-<seed>.json`` (written to a
temporary file, then renamed) as soon as it finishes, and a record with the same configuration hash is
reused instead of retrained. Trained base models are reused the same way (``DIR/seed-S/base.json``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: bump when the meaning of a saved record changes: records of another schema are recomputed
SCHEMA = 1
#: keys of a pipeline configuration that name the data; the rest are passed to ``pipeline`` for every training
DATA_KEYS = ("dataset", "dataset_kwargs", "training", "testing", "validation")
METRICS = ("lost_rank1", "mrr_drop", "prob_fell", "top1_changed")
METRIC_LABELS = {
    "lost_rank1": "lost rank-1",
    "mrr_drop": "relative MRR drop",
    "prob_fell": "probability fell",
    "top1_changed": "top-1 changed",
}

# ------------------------------------------------------------------------------------- built-in settings

_EVAL = {"batch_size": 512, "use_tqdm": False}

#: the configurations of the published table (docs/faithfulness.md); each trains in seconds on a 2-core CPU
PRESETS: dict[str, dict[str, Any]] = {
    "nations-distmult": {"metadata": {"title": "DistMult on Nations (the Gradient Rollback setting)"}, "pipeline": {
        "dataset": "Nations", "model": "DistMult", "model_kwargs": {"embedding_dim": 64},
        "training_loop": "LCWA", "loss": "BCEWithLogitsLoss", "optimizer": "Adam", "optimizer_kwargs": {"lr": 0.05},
        "training_kwargs": {"num_epochs": 50, "batch_size": 256}, "evaluation_kwargs": _EVAL,
        "random_seed": 0, "device": "cpu"}},
    "umls-conve": {"metadata": {"title": "ConvE on UMLS"}, "pipeline": {
        "dataset": "UMLS", "dataset_kwargs": {"create_inverse_triples": True},
        "model": "ConvE", "model_kwargs": {"embedding_dim": 200, "output_channels": 32},
        "training_loop": "LCWA", "loss": "BCEAfterSigmoid", "optimizer": "Adam", "optimizer_kwargs": {"lr": 0.003},
        "training_kwargs": {"num_epochs": 10, "batch_size": 128}, "evaluation_kwargs": _EVAL,
        "random_seed": 0, "device": "cpu"}},
    "kinships-complex": {"metadata": {"title": "ComplEx on Kinships"}, "pipeline": {
        "dataset": "Kinships", "model": "ComplEx", "model_kwargs": {"embedding_dim": 64},
        "training_loop": "LCWA", "loss": "BCEWithLogitsLoss", "optimizer": "Adam", "optimizer_kwargs": {"lr": 0.05},
        "training_kwargs": {"num_epochs": 50, "batch_size": 256}, "evaluation_kwargs": _EVAL,
        "random_seed": 0, "device": "cpu"}},
}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} evaluate {message}", file=sys.stderr, flush=True)


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def triples_sha256(mapped: torch.Tensor) -> str:
    """sha256 of ``(N, 3)`` ids as little-endian int64, in their order."""
    return hashlib.sha256(np.ascontiguousarray(mapped.cpu().numpy().astype("<i8")).tobytes()).hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    from tracin_index.atomic import replacing

    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_config(spec: str) -> dict[str, Any]:
    """A configuration file's contents (``{"pipeline": {...}}``, or the pipeline keywords alone) or a preset."""
    path = Path(spec)
    if path.is_file():
        config = json.loads(path.read_text())
    elif spec in PRESETS:
        config = copy.deepcopy(PRESETS[spec])
    else:
        raise SystemExit(f"evaluate: {spec} is neither a configuration file nor a preset ({', '.join(PRESETS)})")
    if "pipeline" not in config:
        config = {"metadata": {}, "pipeline": config}
    config.setdefault("metadata", {})
    pipe = config["pipeline"]
    if not isinstance(pipe, dict) or not any(pipe.get(k) for k in ("dataset", "training")):
        raise SystemExit(f"evaluate: {spec}: the pipeline configuration names no dataset (or training triples)")
    return config


# ------------------------------------------------------------------------------------- settings and state


@dataclass(frozen=True)
class Settings:
    """One evaluation's settings: everything but the PyKEEN configuration."""

    targets: int = 20
    budgets: tuple[int, ...] = (1, 10)
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("tracin", "cosine", "tracin-adam", "cosine-adam", "embedding", "random")
    neighbourhood: bool = False
    per_target: bool = False
    checkpoints: int = 5
    layers: str = "last:2"
    loss: str = "auto"
    dim: int = 1024
    noise_offset: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class Base:
    """One seed's trained model, its data, its index and its targets with their values before any removal."""

    seed: int
    directory: Path
    config: dict[str, Any]  # the configuration with this seed
    dataset: Any  # pykeen Dataset: training / testing / validation factories
    model: Any  # the trained model, loaded back from save_to_directory, eval mode
    index: Any  # TracinIndex
    training: torch.Tensor  # (N, 3) raw ids of the training triples, in the model's order
    targets: torch.Tensor  # (M, 3) raw ids
    target_positions: list[int]  # positions in the test split
    filter_mask: torch.Tensor  # (M, E) True where a tail completes another known triple of (h, r)
    before: dict[str, list[Any]]  # per-target values on the trained model (see measure)
    candidates: int  # test triples ranked first
    test_metrics: dict[str, float]
    hash: str
    selections: dict[tuple[str, int], list[list[int]]] = field(default_factory=dict)


@dataclass
class Counter:
    base_trainings: int = 0
    retrains: int = 0
    reused: int = 0


# ------------------------------------------------------------------------------------- training


def checkpoint_epochs(pipe: dict[str, Any], count: int) -> list[int] | None:
    """``count`` epochs spread evenly over the run, the last one included (None: the length is not known)."""
    epochs = (pipe.get("training_kwargs") or {}).get("num_epochs", pipe.get("epochs"))
    if not isinstance(epochs, int) or epochs < 1:
        return None
    count = max(1, min(count, epochs))
    return sorted({max(1, round(epochs * (i + 1) / count)) for i in range(count)})


def load_dataset(pipe: dict[str, Any]) -> Any:
    from pykeen.datasets import get_dataset

    return get_dataset(dataset=pipe.get("dataset"), dataset_kwargs=pipe.get("dataset_kwargs"),
                       training=pipe.get("training"), testing=pipe.get("testing"), validation=pipe.get("validation"))


def train(config: dict[str, Any], dataset: Any, training: Any, seed: int, callback: Any = None) -> Any:
    """``pipeline`` with the configuration's settings on the given training factory, with ``random_seed=seed``.

    The data keys are replaced by the factories themselves, so that a retrain differs from the base training
    only in the training triples (and the seed where asked)."""
    from pykeen.pipeline import pipeline

    kwargs = {k: copy.deepcopy(v) for k, v in config["pipeline"].items() if k not in DATA_KEYS}
    kwargs["random_seed"] = seed
    kwargs.setdefault("device", "cpu")
    training_kwargs = dict(kwargs.get("training_kwargs") or {})
    training_kwargs.setdefault("use_tqdm", False)
    if callback is not None:
        existing = training_kwargs.get("callbacks")
        callbacks = [] if existing is None else list(existing) if isinstance(existing, list | tuple) else [existing]
        training_kwargs["callbacks"] = [*callbacks, callback]
        if "callback_kwargs" in training_kwargs:
            extra = training_kwargs["callback_kwargs"]
            extra = list(extra) if isinstance(extra, list | tuple) else [extra]
            training_kwargs["callback_kwargs"] = [*extra, None]
    kwargs["training_kwargs"] = training_kwargs
    evaluation_kwargs = dict(kwargs.get("evaluation_kwargs") or {})
    evaluation_kwargs.setdefault("use_tqdm", False)
    kwargs["evaluation_kwargs"] = evaluation_kwargs
    return pipeline(training=training, testing=dataset.testing, validation=dataset.validation,
                    metadata=config.get("metadata") or None, **kwargs)


def split_metrics(result: Any) -> dict[str, float]:
    metrics = result.metric_results
    return {"mrr": float(metrics.get_metric("both.realistic.inverse_harmonic_mean_rank")),
            "hits_at_1": float(metrics.get_metric("both.realistic.hits_at_1")),
            "hits_at_10": float(metrics.get_metric("both.realistic.hits_at_10"))}


def index_loss(config: dict[str, Any], settings: Settings) -> str:
    """The per-triple loss of the index: ``ce`` for a softmax cross-entropy objective, ``bce`` otherwise."""
    if settings.loss != "auto":
        return settings.loss
    loss = config["pipeline"].get("loss")
    name = (loss if isinstance(loss, str) else "").lower().replace("_", "").removesuffix("loss")
    return "ce" if name in {"crossentropy", "softmaxcrossentropy", "ce"} else "bce"


# ------------------------------------------------------------------------------------- measuring


def tail_scores(model: Any, hr: torch.Tensor) -> torch.Tensor:
    """Raw scores ``(M, E)`` of every tail for ``(M, 2)`` raw ``(h, r)`` ids (PyKEEN's ``predict_t`` without sigmoid)."""
    was = getattr(model, "predict_with_sigmoid", False)
    model.predict_with_sigmoid = False
    try:
        with torch.inference_mode():
            return model.predict_t(hr.to(next(model.parameters()).device)).float().cpu()
    finally:
        model.predict_with_sigmoid = was
        model.eval()


def known_tails(known: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """The tails of every known ``(h, r)`` pair."""
    order = torch.argsort(known[:, 0] * (int(known[:, 1].max()) + 1) + known[:, 1], stable=True)
    rows = known[order]
    pairs, counts = torch.unique_consecutive(rows[:, :2], dim=0, return_counts=True)
    tails = torch.split(rows[:, 2], counts.tolist())
    return {(int(h), int(r)): t for (h, r), t in zip(pairs.tolist(), tails, strict=True)}


def known_mask(targets: torch.Tensor, known: dict[tuple[int, int], torch.Tensor], num_entities: int) -> torch.Tensor:
    """``(M, E)``: True where ``(h, r, e)`` is a known triple of any split and ``e`` is not the target's tail."""
    mask = torch.zeros(len(targets), num_entities, dtype=torch.bool)
    for i, (h, r, t) in enumerate(targets.tolist()):
        tails = known.get((h, r))
        if tails is not None:
            mask[i, tails] = True
        mask[i, t] = False
    return mask


def measure(model: Any, targets: torch.Tensor, mask: torch.Tensor | dict[tuple[int, int], torch.Tensor],
            batch: int = 512) -> dict[str, list[Any]]:
    """Per target: the filtered realistic rank of its tail, the unfiltered rank, the softmax probability
    p(t | h, r) over all tails, sigmoid(score), and the unfiltered top-1 tail. ``mask`` is the ``(M, E)`` filter,
    or the known tails to build it from, batch by batch."""
    out: dict[str, list[Any]] = {k: [] for k in ("rank", "unfiltered_rank", "p_softmax", "p_sigmoid", "top1")}
    for start in range(0, len(targets), batch):
        part = targets[start:start + batch]
        scores = tail_scores(model, part[:, :2])
        drop = known_mask(part, mask, scores.shape[1]) if isinstance(mask, dict) else mask[start:start + batch]
        idx = torch.arange(len(part))
        own = scores[idx, part[:, 2]].unsqueeze(1)
        filtered = scores.masked_fill(drop, float("-inf"))
        rank = 1 + (filtered > own).sum(1) + ((filtered == own).sum(1) - 1) / 2
        raw_rank = 1 + (scores > own).sum(1) + ((scores == own).sum(1) - 1) / 2
        out["rank"] += rank.double().tolist()
        out["unfiltered_rank"] += raw_rank.double().tolist()
        out["p_softmax"] += torch.softmax(scores.double(), dim=1)[idx, part[:, 2]].tolist()
        out["p_sigmoid"] += torch.sigmoid(own.squeeze(1).double()).tolist()
        out["top1"] += scores.argmax(1).tolist()
    return out


def metrics_of(before: dict[str, list[Any]], after: dict[str, list[Any]], positions: Sequence[int]) -> dict[str, float]:
    """The four shares over the targets at ``positions`` (all four in [0, 1])."""
    n = len(positions)
    rb = [before["rank"][i] for i in positions]
    ra = [after["rank"][i] for i in positions]
    return {
        "lost_rank1": sum(r > 1 for r in ra) / n,
        "mrr_drop": 1 - (sum(1 / r for r in ra) / n) / (sum(1 / r for r in rb) / n),
        "prob_fell": sum(after["p_softmax"][i] < before["p_softmax"][i] for i in positions) / n,
        "top1_changed": sum(after["top1"][i] != before["top1"][i] for i in positions) / n,
        "prob_sigmoid_fell": sum(after["p_sigmoid"][i] < before["p_sigmoid"][i] for i in positions) / n,
    }


# ------------------------------------------------------------------------------------- methods
#
# A method turns the targets into the facts to remove: for each target, training positions, most important
# first. Rows of the table are built from METHODS in the order --methods names them; a new row (for example
# TracIn with an optimizer-aware step, ``query(..., optimizer=...)``) is one more Method here.

Selector = Callable[[Base, int, Settings], list[list[int]]]


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    select: Selector


def influence_selector(**query_options: Any) -> Selector:
    """Each target's top-B proponents from the index, ``index.query(targets, k=B, **query_options)``."""

    def select(base: Base, budget: int, settings: Settings) -> list[list[int]]:
        results = base.index.query(base.targets, k=budget, neighbourhood=settings.neighbourhood, **query_options)
        return [[int(p.train_index) for p in result.proponents[:budget]] for result in results]

    return select


def flat_rows(rep: torch.Tensor) -> torch.Tensor:
    rep = rep.detach().cpu()
    if rep.is_complex():
        rep = torch.view_as_real(rep)
    return rep.reshape(rep.shape[0], -1).float()


def neighbours(training: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Training positions of the facts that share an entity with the target."""
    h, _, t = target
    ends = torch.tensor([h, t])
    return torch.nonzero(torch.isin(training[:, 0], ends) | torch.isin(training[:, 2], ends)).flatten()


def select_embedding(base: Base, budget: int, settings: Settings) -> list[list[int]]:
    """The B training triples nearest to the target by the cosine of their concatenated (head, relation, tail)
    embeddings: the model's first entity and first relation representation (complex numbers as real pairs)."""
    model = base.model
    with torch.inference_mode():
        entities = flat_rows(model.entity_representations[0](indices=None))
        relations = flat_rows(model.relation_representations[0](indices=None))

    def features(triples: torch.Tensor) -> torch.Tensor:
        r = triples[:, 1] * 2 if getattr(model, "use_inverse_triples", False) else triples[:, 1]
        feats = torch.cat([entities[triples[:, 0]], relations[r], entities[triples[:, 2]]], dim=1)
        return torch.nn.functional.normalize(feats, dim=1)

    train_feats = features(base.training)
    similarity = features(base.targets) @ train_feats.T
    out = []
    for i, target in enumerate(base.targets.tolist()):
        row = similarity[i]
        if settings.neighbourhood:
            allowed = torch.full_like(row, float("-inf"))
            near = neighbours(base.training, target)
            allowed[near] = row[near]
            row = allowed
        order = torch.argsort(row, descending=True, stable=True)
        out.append([int(j) for j in order[:budget] if math.isfinite(float(row[j]))])
    return out


def select_random(base: Base, budget: int, settings: Settings) -> list[list[int]]:
    """B training triples drawn uniformly, without replacement, from those sharing an entity with the target."""
    out = []
    for i, target in enumerate(base.targets.tolist()):
        pool = neighbours(base.training, target).numpy()
        rng = np.random.default_rng([base.seed, budget, base.target_positions[i]])
        out.append([int(j) for j in rng.choice(pool, size=min(budget, len(pool)), replace=False)])
    return out


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("tracin", "TracIn proponents (index.query, mode dot)", influence_selector(mode="dot")),
    Method("cosine", "TracIn proponents in cosine mode (gradient norms removed)", influence_selector(mode="cosine")),
    Method("tracin-adam", "TracIn proponents following Adam's step (index.query, optimizer adam)",
           influence_selector(mode="dot", optimizer="adam")),
    Method("cosine-adam", "cosine mode following Adam's step (optimizer adam)",
           influence_selector(mode="cosine", optimizer="adam")),
    Method("embedding", "nearest training triples by cosine of concatenated h/r/t embeddings (no gradients)",
           select_embedding),
    Method("random", "random training triples sharing an entity with the target", select_random),
]}
NOISE = "noise"


# ------------------------------------------------------------------------------------- the base model


def prepare_base(config: dict[str, Any], seed: int, out: Path, settings: Settings, counter: Counter) -> Base:
    """Train (or reuse) the model of one seed, build (or reuse) its index, and pick its targets."""
    from tracin_index import BuildConfig, ProjectionSpec, build_index, find_checkpoints, load_model, open_index
    from tracin_index.callbacks import TracinCheckpoint

    seeded = copy.deepcopy(config)
    seeded["pipeline"]["random_seed"] = seed
    directory = out / f"seed-{seed}"
    epochs = checkpoint_epochs(seeded["pipeline"], settings.checkpoints)
    base_hash = digest({"schema": SCHEMA, "config": seeded, "checkpoint_epochs": epochs})
    dataset = load_dataset(seeded["pipeline"])
    record_path = directory / "base.json"
    record = read_json(record_path)
    if record is not None and record.get("hash") == base_hash and (directory / "model").is_dir():
        log(f"seed {seed}: trained model reused ({directory / 'model'})")
        metrics = record["test_metrics"]
    else:
        started = time.perf_counter()
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        if epochs is None or seeded["pipeline"].get("stopper"):
            # an early stopper may end training before the planned epochs (and PyKEEN then skips the callback's
            # last-epoch save): save at a fixed frequency as well
            every = max(1, epochs[-1] // settings.checkpoints) if epochs else 10
            callback = TracinCheckpoint(directory / "checkpoints", frequency=every, epochs=epochs)
        else:
            callback = TracinCheckpoint(directory / "checkpoints", epochs=epochs)
        result = train(seeded, dataset, dataset.training, seed, callback)
        result.save_to_directory(directory / "model")
        metrics = split_metrics(result)
        counter.base_trainings += 1
        write_json_atomic(record_path, {"schema": SCHEMA, "hash": base_hash, "seed": seed, "config": seeded,
                                        "checkpoint_epochs": epochs, "test_metrics": metrics,
                                        "seconds": time.perf_counter() - started})
        log(f"seed {seed}: trained in {time.perf_counter() - started:.1f}s, test MRR {metrics['mrr']:.3f}")

    # build_index loads checkpoint states into the bundle's model (and a skipped build leaves one there), so the
    # build, the index and the measurements each get their own copy of the trained model
    started = time.perf_counter()
    build = BuildConfig(layers=settings.layers, loss=index_loss(config, settings), projection=ProjectionSpec(dim=settings.dim))
    build_index(load_model(directory / "model"), directory / "index", checkpoints=find_checkpoints(directory / "checkpoints"),
                config=build)
    index = open_index(directory / "index", model=load_model(directory / "model"))
    bundle = load_model(directory / "model")
    training = bundle.triples.mapped
    if not torch.equal(training, dataset.training.mapped_triples):
        raise SystemExit(f"evaluate: {directory / 'model'} holds other training triples than the configuration's")
    log(f"seed {seed}: index ready in {time.perf_counter() - started:.1f}s ({index.num_rows} rows, "
        f"{index.num_checkpoints} checkpoints, loss {build.loss})")

    # targets: test triples whose filtered tail rank is 1, a seeded choice of N of them, in test order
    testing = dataset.testing.mapped_triples
    known = known_tails(torch.cat([f.mapped_triples for f in (dataset.training, dataset.validation, dataset.testing)
                                   if f is not None]))
    num_entities = dataset.training.num_entities
    ranks = measure(bundle.model, testing, known)["rank"]
    first = [i for i, r in enumerate(ranks) if r == 1]
    if not first:
        raise SystemExit(f"evaluate: seed {seed}: the model ranks no test triple first; train it longer")
    chosen = sorted(np.random.default_rng(seed).choice(first, size=min(settings.targets, len(first)), replace=False).tolist())
    if len(chosen) < settings.targets:
        log(f"seed {seed}: only {len(first)} test triples are ranked first; using all of them")
    targets = testing[chosen]
    mask = known_mask(targets, known, num_entities)
    before = measure(bundle.model, targets, mask)
    assert all(r == 1 for r in before["rank"])
    base = Base(seed=seed, directory=directory, config=seeded, dataset=dataset, model=bundle.model, index=index,
                training=training, targets=targets, target_positions=[int(c) for c in chosen], filter_mask=mask,
                before=before, candidates=len(first), test_metrics=metrics, hash=base_hash)
    for name in settings.methods:
        for budget in settings.budgets:
            base.selections[name, budget] = METHODS[name].select(base, budget, settings)
    return base


# ------------------------------------------------------------------------------------- retraining


def labelled(base: Base, triples: torch.Tensor, positions: Sequence[int] | None = None) -> list[dict[str, Any]]:
    ent, rel = base.dataset.training.entity_id_to_label, base.dataset.training.relation_id_to_label
    rows = []
    for j, (h, r, t) in enumerate(triples.tolist()):
        row = {"head": ent[h], "relation": rel[r], "tail": ent[t], "ids": [h, r, t]}
        if positions is not None:
            row = {"position": int(positions[j]), **row}
        rows.append(row)
    return rows


def run_once(base: Base, name: str, budget: int, settings: Settings, runs: Path, counter: Counter,
             which: Sequence[int] | None = None) -> dict[str, Any]:
    """One retrain: without the union of the selected facts of the targets at ``which`` (all by default), or, for
    the noise floor, with another seed and nothing removed. Reused when its record has the same hash."""
    positions = list(range(len(base.targets))) if which is None else list(which)
    if name == NOISE:
        per_target: list[list[int]] = [[] for _ in positions]
        seed = base.seed + settings.noise_offset
    else:
        selection = base.selections[name, budget]
        per_target = [selection[i] for i in positions]
        seed = base.seed
    chosen_rows = sorted({p for chosen in per_target for p in chosen})
    # a fact is removed with every copy of it the training set may hold
    removed = torch.nonzero(torch.isin(_keys(base.training), _keys(base.training[chosen_rows]))).flatten().tolist()
    key = f"{name}-{budget}-{base.seed}" + (f"-t{base.target_positions[positions[0]]}" if which is not None else "")
    run_hash = digest({"schema": SCHEMA, "base": base.hash, "train_seed": seed, "removed": removed,
                       "targets": base.targets[positions].tolist()})
    path = runs / f"{key}.json"
    record = read_json(path)
    if record is not None and record.get("hash") == run_hash:
        counter.reused += 1
        log(f"{key}: reused (same configuration)")
        return dict(record)

    started = time.perf_counter()
    keep = torch.ones(len(base.training), dtype=torch.bool)
    keep[removed] = False
    training = base.dataset.training.clone_and_exchange_triples(base.training[keep])
    result = train(base.config, base.dataset, training, seed)
    trained_on = result.training.mapped_triples  # what the pipeline trained on
    absent = not bool(torch.isin(_keys(base.training[removed]), _keys(trained_on)).any()) if removed else True
    if not absent or len(trained_on) != len(base.training) - len(removed):
        raise RuntimeError(f"{key}: the retrain's training triples still hold removed facts")
    after = measure(result.model.eval(), base.targets[positions], base.filter_mask[positions])
    before = {k: [v[i] for i in positions] for k, v in base.before.items()}
    counter.retrains += 1
    record = {
        "schema": SCHEMA, "key": key, "hash": run_hash, "method": name, "budget": budget if name != NOISE else 0,
        "seed": base.seed, "train_seed": seed, "targets": labelled(base, base.targets[positions]),
        "target_test_positions": [base.target_positions[i] for i in positions],
        "removed_per_target": per_target, "removed": labelled(base, base.training[removed], removed),
        "training_triples": len(trained_on), "training_sha256": triples_sha256(trained_on),
        "removed_absent": absent, "before": before, "after": after, "metrics": metrics_of(before, after, range(len(positions))),
        "test_metrics": split_metrics(result), "seconds": time.perf_counter() - started,
    }
    write_json_atomic(path, record)
    m = record["metrics"]
    log(f"{key}: retrained without {len(removed)} facts in {record['seconds']:.1f}s: lost rank-1 {m['lost_rank1']:.2f}, "
        f"MRR drop {m['mrr_drop']:.2f}, p fell {m['prob_fell']:.2f}, top-1 changed {m['top1_changed']:.2f}")
    return record


def _keys(triples: torch.Tensor) -> torch.Tensor:
    t = triples.long()
    return (t[:, 0] * (1 << 21) + t[:, 1]) * (1 << 21) + t[:, 2]


def row_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's row from its run records (one, or one per target): the metrics over all its targets."""
    before: dict[str, list[Any]] = {k: [] for k in ("rank", "p_softmax", "p_sigmoid", "top1")}
    after: dict[str, list[Any]] = {k: [] for k in before}
    removed_per_target: list[int] = []
    for record in records:
        for k in before:
            before[k] += record["before"][k]
            after[k] += record["after"][k]
        removed_per_target += [len(r) for r in record["removed_per_target"]]
    n = len(before["rank"])
    return {"metrics": metrics_of(before, after, range(n)), "targets": n,
            "removed_per_target": sum(removed_per_target) / max(1, len(removed_per_target)),
            "removed_total": sum(len(r["removed"]) for r in records), "retrains": len(records),
            "test_mrr": float(np.mean([r["test_metrics"]["mrr"] for r in records]))}


# ------------------------------------------------------------------------------------- reporting


def summarise(rows: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and spread (sample standard deviation; 0 with one seed) over seeds of every row's numbers."""
    out = {}
    for key, by_seed in rows.items():
        values = list(by_seed.values())
        entry: dict[str, Any] = {"method": values[0]["method"], "budget": values[0]["budget"], "seeds": sorted(by_seed)}
        for name in (*METRICS, "prob_sigmoid_fell"):
            xs = np.array([v["metrics"][name] for v in values], dtype=float)
            entry[name] = {"mean": float(xs.mean()), "sd": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0,
                           "per_seed": xs.tolist()}
        for name in ("removed_per_target", "removed_total", "test_mrr"):
            entry[name] = float(np.mean([v[name] for v in values]))
        out[key] = entry
    return out


def fmt(stat: dict[str, Any], seeds: int) -> str:
    return f"{stat['mean']:.2f} ± {stat['sd']:.2f}" if seeds > 1 else f"{stat['mean']:.2f}"


def markdown(summary: dict[str, Any], header: dict[str, Any]) -> str:
    seeds = len(header["seeds"])
    lines = [f"# Faithfulness: {header['title']}", "",
             f"{header['targets']} targets per seed (test triples at filtered tail rank 1), seeds "
             f"{', '.join(map(str, header['seeds']))}; {header['mode']}; base test MRR {header['base_test_mrr']:.3f}. "
             f"Values: share of targets (mean{' ± sd' if seeds > 1 else ''} over seeds). Probability: softmax "
             f"p(t | h, r) over all tails. Wall time {header['wall_seconds']:.0f} s.", "",
             "| method | removed per target | removed in all | lost rank-1 | relative MRR drop | probability fell | "
             "top-1 changed | retrain test MRR |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in summary.values():
        name = "noise floor (other seed, nothing removed)" if entry["method"] == NOISE else entry["method"]
        per = "0" if entry["method"] == NOISE else f"{entry['removed_per_target']:.1f} (B={entry['budget']})"
        lines.append(f"| {name} | {per} | {entry['removed_total']:.0f} | "
                     + " | ".join(fmt(entry[m], seeds) for m in METRICS) + f" | {entry['test_mrr']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in summary.values() if e["method"] != NOISE]
    noise = next((e for e in summary.values() if e["method"] == NOISE), None)
    methods = list(dict.fromkeys(e["method"] for e in entries))
    budgets = sorted({e["budget"] for e in entries})
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes, METRICS, strict=True):
        for j, method in enumerate(methods):
            xs, ys, es = [], [], []
            for b, budget in enumerate(budgets):
                found = [e for e in entries if e["method"] == method and e["budget"] == budget]
                if found:
                    xs.append(b + (j - (len(methods) - 1) / 2) * width)
                    ys.append(found[0][metric]["mean"])
                    es.append(found[0][metric]["sd"])
            ax.bar(xs, ys, width, yerr=es if any(es) else None, capsize=2, label=method)
        if noise is not None:
            mean, sd = noise[metric]["mean"], noise[metric]["sd"]
            ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="noise floor")
            if sd:
                ax.axhspan(mean - sd, mean + sd, color="black", alpha=0.08)
        ax.set_xticks(range(len(budgets)), [f"B={b}" for b in budgets])
        ax.set_title(METRIC_LABELS[metric])
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of targets")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from tracin_index.atomic import replacing

    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------- main


def evaluate(config: dict[str, Any], settings: Settings, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config)
    runs = out / "runs"
    counter = Counter()
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    bases: list[dict[str, Any]] = []
    for seed in settings.seeds:
        base = prepare_base(config, seed, out, settings, counter)
        plan = [(name, budget) for budget in settings.budgets for name in settings.methods] + [(NOISE, 0)]
        for name, budget in plan:
            if settings.per_target and name != NOISE:
                records = [run_once(base, name, budget, settings, runs, counter, [i]) for i in range(len(base.targets))]
            else:
                records = [run_once(base, name, budget, settings, runs, counter)]
            row = row_of(records)
            row.update(method=name, budget=budget, runs=[r["key"] for r in records])
            rows.setdefault(f"{name}-{budget}", {})[seed] = row
        bases.append({"seed": seed, "test_metrics": base.test_metrics, "ranked_first": base.candidates,
                      "test_triples": len(base.dataset.testing.mapped_triples),
                      "targets": labelled(base, base.targets), "target_test_positions": base.target_positions,
                      "before": base.before,
                      "selections": {f"{n}-{b}": s for (n, b), s in base.selections.items()}})
        del base
    summary = summarise(rows)
    pipe = config["pipeline"]
    title = config["metadata"].get("title") or f"{pipe.get('model')} on {pipe.get('dataset')}"
    header = {"title": title, "seeds": list(settings.seeds), "targets": settings.targets,
              "mode": ("one retrain per target" if settings.per_target else "one retrain per method, budget and seed "
                       "(the union of all targets' facts removed)")
              + ("; candidates restricted to the target's neighbourhood" if settings.neighbourhood else ""),
              "base_test_mrr": float(np.mean([b["test_metrics"]["mrr"] for b in bases])),
              "wall_seconds": time.perf_counter() - started}
    payload = {
        "schema": SCHEMA, "config": config, "settings": settings.to_dict(), "header": header,
        "methods": {name: METHODS[name].help for name in settings.methods},
        "summary": summary, "per_seed": rows, "bases": bases,
        "invocation": {"base_trainings": counter.base_trainings, "retrains": counter.retrains, "reused": counter.reused,
                       "wall_seconds": header["wall_seconds"]},
    }
    write_json_atomic(out / "results.json", payload)
    from tracin_index.atomic import write_text

    write_text(out / "results.md", markdown(summary, header))
    plot(summary, out / "results.png", title)
    log(f"done in {header['wall_seconds']:.0f}s: {counter.base_trainings} base trainings, {counter.retrains} retrains, "
        f"{counter.reused} reused; {out / 'results.md'}")
    return payload


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="pykeen pipeline configuration (JSON) or a preset name")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: eval-out/<config name>)")
    parser.add_argument("--targets", type=int, default=20, help="test triples ranked first to explain, per seed")
    parser.add_argument("--budget", type=int, nargs="+", default=[1, 10], help="facts removed per target")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the configuration's)")
    parser.add_argument("--methods", default=",".join(Settings.methods),
                        help=f"comma-separated rows, of: {', '.join(METHODS)}")
    parser.add_argument("--neighbourhood", action="store_true",
                        help="rank only training triples that share an entity with the target (tracin, cosine, embedding)")
    parser.add_argument("--per-target", action="store_true", help="one retrain per target instead of one per method")
    parser.add_argument("--checkpoints", type=int, default=5, help="TracIn checkpoints, evenly spread over training")
    parser.add_argument("--layers", default="last:2", help="tracked layers of the index (build --layers)")
    parser.add_argument("--loss", default="auto", help="the index's loss: bce, ce, score, or auto (ce for a "
                        "cross-entropy training loss, bce otherwise)")
    parser.add_argument("--dim", type=int, default=1024, help="projection dimension of the index")
    parser.add_argument("--noise-offset", type=int, default=1000, help="the noise floor's seed is S + this")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    parser.add_argument("--print-config", metavar="PRESET", choices=sorted(PRESETS), help="print a preset and exit")
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args, parser = parse_args(argv)
    if args.print_config:
        print(json.dumps(PRESETS[args.print_config], indent=2))
        return None
    if not args.config:
        parser.error("give a configuration file or a preset name")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if args.targets < 1 or any(b < 1 for b in args.budget) or args.checkpoints < 1:
        parser.error("--targets, --budget and --checkpoints must be positive")
    config = load_config(args.config)
    seeds = tuple(args.seeds) if args.seeds else (int(config["pipeline"].get("random_seed", 0)),)
    settings = Settings(targets=args.targets, budgets=tuple(dict.fromkeys(args.budget)), seeds=tuple(dict.fromkeys(seeds)),
                        methods=methods, neighbourhood=args.neighbourhood, per_target=args.per_target,
                        checkpoints=args.checkpoints, layers=args.layers, loss=args.loss, dim=args.dim,
                        noise_offset=args.noise_offset)
    out = args.out or Path("eval-out") / Path(args.config).stem
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    logging.getLogger("torch_max_mem").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from tracin_index.runtime import configure_threads

    configure_threads(args.threads)
    return evaluate(config, settings, out)


if __name__ == "__main__":
    import gc

    import pykeen.pipeline  # noqa: F401 - imported before the freeze below

    # pykeen runs gc.collect() after every epoch; frozen objects (those of the imports) are not scanned again
    gc.freeze()
    main()
