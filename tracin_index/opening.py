"""Opening a built index: the model it was built from (or the one given), checked against the store.

:func:`open_index` loads the recorded model (or takes ``model``) and its checkpoints, and refuses any
difference from what the store records (model class, training triples, checkpoint states and learning
rates, tracked parameters, loss, projection) with one :class:`~tracin_index.errors.IndexMismatchError`
that lists them all. The checkpoints' optimizer states are kept for the tracked parameters (optimizer-aware
queries). It changes no process-wide state.
"""

from __future__ import annotations

import os

from .errors import IndexMismatchError
from .layers import select_parameters
from .location import Where, location
from .model import Checkpoint, ModelBundle, TriplesData, load_checkpoints, load_model, triples_fingerprint
from .projection import ProjectionSpec
from .query import TracinIndex
from .registry import OPTIMIZERS
from .runtime import resolve_device
from .store import Store
from .tracer import Tracer

__all__ = ["open_index"]


def open_index(
    path: Where,
    *,
    model: ModelBundle | str | os.PathLike[str] | None = None,
    checkpoints: list[tuple[str, float]] | None = None,
    layers: str | None = None,
    loss: str | None = None,
    projection: ProjectionSpec | None = None,
    device: str | None = "cpu",
    search: str = "auto",
    memory: int | None = None,
    optimizer: str = OPTIMIZERS.default,
    nprobe: int | None = None,
    shards: int | None = None,
) -> TracinIndex:
    """Open a built index with the model it was built from (or ``model``), refusing any mismatch.

    ``layers``, ``loss`` and ``projection``, when given, must equal the store's; the model's and the
    checkpoints' fingerprints must equal the recorded ones. ``search``: the candidate-search backend,
    ``auto`` (the torch blocked scan where the model runs, or faiss-gpu's index on a GPU when it is
    installed; a stream from the store when the rows do not fit in memory), ``torch`` (the scan; on the CPU, ad-hoc
    queries go through an int8 copy of the rows first), ``full`` (the scan without that prefilter), ``faiss`` or
    ``stream`` (exact, one block
    of at most ``memory`` bytes in RAM at a time: stores larger than memory), ``ann`` (the build's FAISS index,
    ``build --faiss``; ``auto`` takes it from 1M rows). ``nprobe``: the FAISS index's ``nprobe`` (IVF) or
    ``efSearch`` (HNSW), None for its built-in value. ``shards``: with ``search="ray"``, the Ray actors holding
    the rows' shards (default: one per CPU slot of the cluster). ``memory``: the bytes the
    search may hold (default: the in-memory index if it fits in half the available RAM, else 256 MiB blocks).
    ``optimizer``: the training optimizer whose step the influences follow (:data:`~tracin_index.registry.OPTIMIZERS`),
    the default of every query; another one may be asked per query. ``adam`` needs each checkpoint's Adam state
    (:class:`~tracin_index.callbacks.TracinCheckpoint` saves it) and is refused in one line without it.
    """
    store = Store.open(path)
    attrs = store.attrs
    if model is None:
        src = attrs["model_source"]
        bundle = load_model(
            src["path"], model_class=src.get("model_class"), model_kwargs=src.get("model_kwargs"),
            triples=src.get("triples"), entity_to_id=src.get("entity_to_id"),
            relation_to_id=src.get("relation_to_id"), inverse_triples=src.get("inverse_triples"),
        )
    elif isinstance(model, ModelBundle):
        bundle = model
    else:
        bundle = load_model(model)
    differences = []
    if type(bundle.model).__name__ != attrs["model_class"]:
        differences.append(f"model class: index {attrs['model_class']}, query {type(bundle.model).__name__}")
    if triples_fingerprint(bundle.triples.mapped) != attrs["triples_sha256"]:
        differences.append("training triples differ from the ones indexed")
    recorded = attrs["checkpoints"]
    if checkpoints is None:
        specs = [] if recorded[0]["name"] == "model" else [(c["name"], c["lr"]) for c in recorded]
    else:
        specs = checkpoints
    names = [p["name"] for p in attrs["tracked"]]
    ckpts: list[Checkpoint] = load_checkpoints(bundle.model, specs, optimizer_params=names)
    if len(ckpts) != len(recorded):
        differences.append(f"checkpoints: index has {len(recorded)}, query gives {len(ckpts)}")
    else:
        for c, rec in zip(ckpts, recorded, strict=True):
            if c.fingerprint != rec["sha256"]:
                differences.append(f"model state {c.name} differs from the indexed one (sha256 {rec['sha256'][:12]}...)")
            elif abs(c.lr - rec["lr"]) > 1e-12 * max(1.0, rec["lr"]):
                differences.append(f"learning rate of {c.name}: index {rec['lr']}, query {c.lr}")
    params = dict(bundle.model.named_parameters())
    for p in attrs["tracked"]:
        if p["name"] not in params or list(params[p["name"]].shape) != p["shape"]:
            differences.append(f"tracked parameter {p['name']} {p['shape']} is not in the model")
    if layers is not None and not differences:
        asked = select_parameters(bundle.model, layers, bundle.triples.mapped[:2])
        if asked != names:
            differences.append(f"layers: index tracks {names}, --layers {layers} selects {asked}")
    if loss is not None and loss != attrs["loss"]:
        differences.append(f"loss: index {attrs['loss']!r}, query {loss!r}")
    spec = ProjectionSpec(**{k: attrs["projection"][k] for k in ("kind", "dim", "seed")})
    if projection is not None and projection.for_rows(store.num_rows) != spec:
        differences.append(f"projection: index {spec}, query {projection}")
    if differences:
        raise IndexMismatchError(f"index {location(path)} does not match this query: " + "; ".join(differences))
    tracer = Tracer(bundle, ckpts, names, attrs["loss"], spec, resolve_device(device))
    ent, rel = store.labels()
    labels = TriplesData(mapped=bundle.triples.mapped, entity_labels=ent, relation_labels=rel)
    return TracinIndex(store, tracer, labels, search, memory, optimizer=optimizer, nprobe=nprobe, shards=shards)
