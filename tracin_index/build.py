"""Stage 6: the index phase. Gradients of every training triple, projected, into a store, plus FAISS."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, StoreError
from .losses import DEFAULT_LOSS
from .model import ModelBundle, load_checkpoints, select_parameters, triples_fingerprint
from .projection import DEFAULT_MEMORY, ProjectionSpec
from .runtime import resolve_device
from .search import build_flat_index, save_index
from .store import Store, publish
from .tracer import Tracer

__all__ = ["BuildConfig", "build_index", "sample_rows", "software_versions"]

STRATIFY = ("relation", "none")


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one build; all of them are written into the store."""

    layers: str = "last:2"
    loss: str = DEFAULT_LOSS
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    batch_size: int = 1024
    unit_rows: int = 8192
    device: str | None = "cpu"
    projection_memory: int = DEFAULT_MEMORY
    sample_rate: float = 1.0
    stratify: str = "relation"
    sample_seed: int = 0

    def check(self) -> None:
        if not (0.0 < self.sample_rate <= 1.0):
            raise InputError(f"--sample-rate {self.sample_rate} is out of range; choose a fraction in (0, 1]")
        if self.stratify not in STRATIFY:
            raise InputError(f"--stratify {self.stratify!r} is unknown; choose one of {', '.join(STRATIFY)}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size} must be at least 1")
        if self.unit_rows < 1:
            raise InputError(f"--unit-rows {self.unit_rows} must be at least 1")


def software_versions() -> dict[str, str]:
    import faiss
    import pykeen
    import zarr

    from . import __version__

    return {"tracin_index": __version__, "torch": torch.__version__, "pykeen": pykeen.get_version(),
            "zarr": zarr.__version__, "faiss": faiss.__version__, "numpy": np.__version__}


def sample_rows(triples: torch.Tensor, rate: float, stratify: str = "relation", seed: int = 0) -> np.ndarray:
    """Sorted positions ``(n,) int64`` of a seeded sample of ``triples`` ``(N, 3)``.

    ``stratify="relation"`` takes ``max(1, round(rate * n_r))`` triples of every relation ``r`` (each
    relation stays represented); ``"none"`` takes ``max(1, round(rate * N))`` uniformly. ``rate=1``
    keeps every triple. The same (triples, rate, stratify, seed) always give the same sample.
    """
    n = int(triples.shape[0])
    if rate >= 1.0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if stratify == "none":
        return np.sort(rng.choice(n, size=max(1, round(rate * n)), replace=False)).astype(np.int64)
    rel = triples[:, 1].numpy()
    picked = []
    for r in np.unique(rel):
        members = np.flatnonzero(rel == r)
        picked.append(rng.choice(members, size=max(1, round(rate * len(members))), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _check_out(out: Path, bundle: ModelBundle, checkpoints: list[tuple[str, float]]) -> None:
    inputs = [Path(bundle.source["path"])] + [Path(p) for p, _ in checkpoints]
    inputs += [Path(bundle.source[k]) for k in ("triples", "entity_to_id", "relation_to_id") if bundle.source.get(k)]
    target = out.resolve()
    for p in inputs:
        src = p.resolve()
        if target == src or target in src.parents:
            raise InputError(f"output {out} would overwrite the input {p}; choose another --out")
    if out.exists() and not (out / "zarr.json").exists():
        raise InputError(f"{out} exists and is not a tracin-index store; choose another --out")


def build_index(
    bundle: ModelBundle,
    out: str | os.PathLike[str],
    *,
    checkpoints: list[tuple[str, float]] | None = None,
    config: BuildConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Store:
    """Build an index of every training triple of ``bundle`` at ``out``; returns the published store.

    The build goes to a staging directory beside ``out`` and is renamed into place only when complete,
    so ``out`` is never half-written.
    """
    config = config or BuildConfig()
    config.check()
    out = Path(out)
    checkpoints = checkpoints or []
    _check_out(out, bundle, checkpoints)
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass --overwrite to replace it")
    device = resolve_device(config.device)
    ckpts = load_checkpoints(bundle.model, checkpoints)
    all_triples = bundle.triples.mapped
    if all_triples.shape[0] == 0:
        raise InputError("the training set is empty; nothing to index (check --triples / the model directory)")
    names = select_parameters(bundle.model, config.layers, all_triples[:2])
    keep = sample_rows(all_triples, config.sample_rate, config.stratify, config.sample_seed)
    triples = all_triples[torch.from_numpy(keep)]
    tracer = Tracer(bundle, ckpts, names, config.loss, config.projection, device, config.projection_memory)
    dtype = "float32" if config.projection.kind == "none" else "float16"

    attrs: dict[str, Any] = {
        "model_source": bundle.source,
        "model_class": type(bundle.model).__name__,
        "inverse_triples": bool(getattr(bundle.model, "use_inverse_triples", False)),
        "checkpoints": [{"name": c.name, "lr": c.lr, "sha256": c.fingerprint} for c in ckpts],
        "triples_sha256": triples_fingerprint(all_triples),
        "num_train": int(all_triples.shape[0]),
        "sample": {"rate": config.sample_rate, "stratify": config.stratify, "seed": config.sample_seed},
        "layers": config.layers,
        "tracked": [{"name": p.name, "kind": p.kind, "shape": list(p.shape)} for p in tracer.tracked],
        "loss": config.loss,
        "projection": config.projection.to_dict(),
        "dtype": dtype,
        "build": {"batch_size": config.batch_size, "device": str(device)},
        "software": software_versions(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        store = Store.create(
            staging, triples=triples.numpy(), train_index=keep, entity_labels=bundle.triples.entity_labels,
            relation_labels=bundle.triples.relation_labels, width=tracer.width,
            num_checkpoints=len(ckpts), unit_rows=config.unit_rows, dtype=dtype, attrs=attrs,
        )
        started = time.perf_counter()
        units = int(store.attrs["num_units"])
        for u in range(units):
            start, stop = store.unit_range(u)
            with torch.no_grad():
                r = tracer.rows(triples[start:stop], batch_size=config.batch_size)
            store.write_unit(
                u,
                r.rows.cpu().numpy().astype(dtype),
                tracer.self_influence(r.sq_norms).cpu().numpy().astype(np.float32),
                r.sq_norms.sqrt().cpu().numpy().astype(np.float32),
            )
            if progress is not None:
                progress(stop, store.num_rows)
        grad_seconds = time.perf_counter() - started
        index = build_flat_index(store)
        save_index(index, store.faiss_path)
        store.set_attrs(status="complete", timings={"gradients_s": round(grad_seconds, 3),
                                                    "total_s": round(time.perf_counter() - started, 3)})
        publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Store.open(out)
