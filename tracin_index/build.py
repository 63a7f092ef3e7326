"""Stage 6: the index phase. Gradients of every training triple, projected, into a store (searched at open)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ann import check_spec, resolve_spec
from .errors import InputError, StoreError, arg
from .layers import select_parameters
from .location import StorePath, Where, location
from .locks import BuildLock
from .losses import DEFAULT_LOSS
from .model import ModelBundle, load_checkpoints, triples_fingerprint
from .projection import DEFAULT_MEMORY, ProjectionSpec
from .registry import LOSSES, STRATEGIES
from .runtime import faiss_module, resolve_device
from .store import BUILDS, SCHEMA_VERSION, Store, builds, latest_build, publish, remove_build
from .tracer import GRADIENT_MEMORY, Tracer
from .verify import verify_rows

__all__ = ["BuildConfig", "build_index", "make_plan", "sample_rows", "software_versions"]

# the distributed steps, in .shards (which builds on this module), importable from here as well
_SHARDS = ("PREPARED", "build_shard", "finalize_build", "parse_shard", "prepare_build", "shard_units", "shard_with_plan")

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
    dtype: str | None = None  # stored rows: float16 (default for projections) or float32 (default for none)
    # store the first tracked Linear's outputs (float32, R * out numbers per triple and checkpoint) so the
    # exact re-rank skips that layer's matmul
    cache_activations: bool = True
    gradient_memory: int = GRADIENT_MEMORY  # bytes one batch's gradients and activations may take
    # a FAISS index_factory string (inner product): the approximate index stored in the build (tracin_index.ann)
    faiss: str | None = "auto"  # an index_factory string, "auto" (ann.default_spec: from 1M rows) or None
    faiss_sample: int = 65536  # rows it is trained on (a seeded sample)
    faiss_seed: int = 0

    def check(self) -> None:
        """Refuse any setting outside its range or its registry, in one line naming the argument."""
        if self.dtype not in (None, "float16", "float32"):
            raise InputError(f"{arg('dtype', self.dtype)} is unknown; choose float16 or float32")
        self.projection.check()
        LOSSES.check(self.loss)
        if not (0.0 < self.sample_rate <= 1.0):
            raise InputError(f"{arg('sample_rate', self.sample_rate)} is out of range; choose a fraction in (0, 1]")
        STRATEGIES.check(self.stratify)
        for name in ("batch_size", "unit_rows", "gradient_memory", "faiss_sample"):
            if getattr(self, name) < 1:
                raise InputError(f"{arg(name, getattr(self, name))} must be at least 1")


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import pykeen
    import zarr

    from . import __version__

    def faiss_version() -> str:  # read from the installed distribution: importing faiss is not needed to build
        for dist in ("faiss-cpu", "faiss-gpu", "faiss"):
            try:
                return version(dist)
            except PackageNotFoundError:
                continue
        return str(faiss_module().__version__)

    return {"tracin_index": __version__, "torch": torch.__version__, "pykeen": pykeen.get_version(),
            "zarr": zarr.__version__, "faiss": faiss_version(), "numpy": np.__version__}


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


def _check_out(out: StorePath, bundle: ModelBundle, checkpoints: list[tuple[str, float]]) -> None:
    inputs = [Path(bundle.source["path"])] + [Path(p) for p, _ in checkpoints]
    inputs += [Path(bundle.source[k]) for k in ("triples", "entity_to_id", "relation_to_id") if bundle.source.get(k)]
    if isinstance(out, Path):  # the inputs are local files: a bucket cannot overwrite them
        target = out.resolve()
        for p in inputs:
            src = p.resolve()
            if target == src or target in src.parents or src in target.parents:
                raise InputError(f"output {out} would overwrite or nest inside the input {p}; choose another {arg('out')}")
    if (out / "zarr.json").exists():
        raise InputError(f"{out} is a single build, not an index directory; choose a new {arg('out')} (builds go to its builds/)")
    # a file or a foreign directory as --out is refused by BuildLock, before it creates anything


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def build_index(
    bundle: ModelBundle,
    out: Where,
    *,
    checkpoints: list[tuple[str, float]] | None = None,
    config: BuildConfig | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    lock: BuildLock | None = None,
) -> Store:
    """Build (or resume, or skip) the index of ``bundle``'s training triples at ``out``; returns the published store.

    ``out`` is an index directory: each build is written to ``out/builds/<UTC time>-<settings hash>``,
    verified, and published by replacing ``out/LATEST`` in one atomic step, so readers keep serving the
    previous build until then. One builder per index (``out/.lock``). ``out`` may be an ``s3://bucket/prefix``
    URL (see :mod:`tracin_index.location`). When the published build has the
    same inputs and settings, nothing is done (``force`` rebuilds). An unfinished build with the same
    inputs and settings (killed, out of space) is resumed from its finished write units, and ends
    byte-identical to an uninterrupted build. ``store.build_report`` says which of these happened.
    """
    config = config or BuildConfig()
    config.check()
    out = location(out)
    say = log or (lambda _msg: None)
    checkpoints = checkpoints or []
    _check_out(out, bundle, checkpoints)
    held = lock or BuildLock(out).acquire()
    # the build loads each checkpoint into the model: the caller gets it back holding its own state
    state = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    try:
        if held.took_over:
            say(f"took over the lock of a build that is no longer running ({held.took_over})")
        return _build_locked(bundle, out, checkpoints, config, force, progress, say, held)
    finally:
        bundle.model.load_state_dict(state)
        if lock is None:
            held.release()


@dataclass
class _Plan:
    """Everything a build derives from its inputs before computing a row."""

    tracer: Tracer
    triples: torch.Tensor
    keep: np.ndarray
    dtype: str
    identity_sha: str
    resume_sha: str
    attrs: dict[str, Any]


def make_plan(bundle: ModelBundle, checkpoints: list[tuple[str, float]], config: BuildConfig) -> _Plan:
    device = resolve_device(config.device)
    ckpts = load_checkpoints(bundle.model, checkpoints)
    all_triples = bundle.triples.mapped
    if all_triples.shape[0] == 0:
        raise InputError("the training set is empty; nothing to index (check the model's training triples)")
    names = select_parameters(bundle.model, config.layers, all_triples[:2])
    keep = sample_rows(all_triples, config.sample_rate, config.stratify, config.sample_seed)
    triples = all_triples[torch.from_numpy(keep)]
    projection = config.projection.for_rows(len(triples))
    tracer = Tracer(bundle, ckpts, names, config.loss, projection, device, config.projection_memory,
                    config.gradient_memory)
    probed = tracer.prepare()
    dtype = config.dtype or ("float32" if config.projection.kind == "none" else "float16")
    cache = tracer.activation_cache(all_triples[:2]) if config.cache_activations else None
    identity: dict[str, Any] = {
        "model_class": type(bundle.model).__name__,
        "inverse_triples": bool(getattr(bundle.model, "use_inverse_triples", False)),
        "checkpoints": [{"lr": c.lr, "sha256": c.fingerprint} for c in ckpts],
        "triples_sha256": triples_fingerprint(all_triples),
        "num_train": int(all_triples.shape[0]),
        "sample": {"rate": config.sample_rate, "stratify": config.stratify, "seed": config.sample_seed},
        "layers": config.layers,
        "tracked": [{"name": p.name, "kind": p.kind, "shape": list(p.shape)} for p in tracer.tracked],
        "loss": config.loss,
        "projection": projection.to_dict(),
        "dtype": dtype,
        "activation_cache": cache,
        "schema_version": SCHEMA_VERSION,
    }
    faiss_spec = resolve_spec(config.faiss, len(triples), tracer.width)
    if faiss_spec is not None:
        check_spec(faiss_spec, tracer.width)
        identity["faiss"] = {"spec": faiss_spec, "sample": config.faiss_sample, "seed": config.faiss_seed}
    identity_sha = _digest(identity)
    layout = {"batch_size": config.batch_size, "unit_rows": config.unit_rows, "device": str(device),
              "gradient_memory": config.gradient_memory}
    resume_sha = _digest({"identity": identity_sha, **layout})
    attrs: dict[str, Any] = {
        **identity,
        "identity_sha256": identity_sha,
        "resume_sha256": resume_sha,
        "model_source": bundle.source,
        "checkpoints": [{"name": c.name, "lr": c.lr, "sha256": c.fingerprint} for c in ckpts],
        "build": layout,
        "plan": probed.plan.to_dict(),
        "warnings": probed.warnings,
        "software": software_versions(),
    }
    return _Plan(tracer, triples, keep, dtype, identity_sha, resume_sha, attrs)


def _up_to_date(out: StorePath, plan: _Plan, say: Callable[[str], None]) -> Store | None:
    """The published build when it has the same inputs and settings and is undamaged, else None."""
    current = latest_build(out)
    if current is None:
        return None
    try:
        published = Store.open(current)
        same = published.attrs.get("identity_sha256") == plan.identity_sha
        damage = verify_rows(published) if same else []
    except StoreError as exc:
        same, damage = True, [str(exc)]
    if same and damage:
        say(f"the published build {current.name} is damaged ({damage[0]}); rebuilding")
        return None
    if not same:
        return None
    say(f"{out} is up to date (build {current.name} has the same model, checkpoints, triples and settings); "
        f"nothing to do ({arg('force', True)} rebuilds)")
    published.build_report = {"skipped": True, "resumed_units": 0, "computed_units": 0, "build": current.name}
    return published


def _create_or_resume(out: StorePath, bundle: ModelBundle, plan: _Plan, config: BuildConfig, force: bool,
                      say: Callable[[str], None]) -> tuple[Store, int]:
    """An unfinished build with the same settings (resumed), else a new one: its attributes are written here."""
    current = latest_build(out)
    for candidate in reversed(builds(out)) if not force else []:
        if candidate == current:
            continue
        try:
            s = Store.open(candidate, complete=False)
        except StoreError:
            continue
        if s.attrs.get("status") == "building" and s.attrs.get("resume_sha256") == plan.resume_sha:
            resumed = int(s.done().sum())
            say(f"resuming build {s.path.name}: {resumed} of {s.attrs['num_units']} write units are done")
            return s, resumed
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")  # names sort by start time
    path = out / BUILDS / f"{stamp}-{plan.identity_sha[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = Store.create(
            path, triples=plan.triples.numpy(), train_index=plan.keep, entity_labels=bundle.triples.entity_labels,
            relation_labels=bundle.triples.relation_labels, width=plan.tracer.width,
            num_checkpoints=len(plan.tracer.checkpoints), unit_rows=config.unit_rows, dtype=plan.dtype, attrs=plan.attrs,
            acts_width=(plan.attrs["activation_cache"] or {}).get("width", 0),
        )
    except BaseException:
        remove_build(path)
        raise
    return store, 0


def _finish(out: StorePath, store: Store, timings: dict[str, Any], lock: BuildLock | None = None) -> None:
    """Verify every row of a build whose units are all done, mark it complete and publish it."""
    _sweep_partials(store)
    t0 = time.perf_counter()
    problems = verify_rows(store)
    timings["verify_s"] = round(time.perf_counter() - t0, 3)
    if problems:
        store.set_attrs(status="failed")  # never resumed: the next run starts a fresh build
        raise StoreError(f"build {store.path.name} failed its verification ({problems[0]}); run the build again "
                         "(it starts afresh; 'tracin-index gc --incomplete' removes the failed one)")
    if store.attrs.get("faiss"):
        _add_faiss(store, timings)
    if lock is not None:
        lock.check()  # an object lock whose lease lapsed meanwhile: another builder owns the index now
    store.set_attrs(status="complete", timings=timings)
    publish(out, store.path)


def _add_faiss(store: Store, timings: dict[str, Any]) -> None:
    """Train the build's FAISS index on its seeded sample, add every row, and store it with its sha256 (once every
    unit is done: a resumed or sharded build does this at its end, like the verification)."""
    from .ann import build_faiss

    t0 = time.perf_counter()
    info = {k: v for k, v in store.attrs["faiss"].items() if k in ("spec", "sample", "seed")}
    trained, data = build_faiss(store, info["spec"], info["sample"], info["seed"])
    store.write_blob("faiss_trained", trained)
    store.write_blob("faiss", data)
    store.set_attrs(faiss={**info, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "faiss_trained_sha256": hashlib.sha256(trained).hexdigest()})
    timings["faiss_s"] = round(time.perf_counter() - t0, 3)


def _sweep_partials(store: Store) -> None:
    """Remove the temporary files of chunk writes that a killed process left behind.

    Zarr writes each local chunk to ``NAME.<uuid>.partial`` and renames it into place; a SIGKILL between the two
    leaves the temporary file. Called under the build lock once every unit is done, so no writer is in flight.
    Object stores have no such files (a PUT is atomic).
    """
    if isinstance(store.path, Path):
        for stale in store.path.rglob("*.partial"):
            stale.unlink(missing_ok=True)


def _guard(where: StorePath, out: StorePath, remove_on_input_error: bool = True) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def guard() -> Any:
        try:
            yield
        except InputError:
            if remove_on_input_error and where != out:
                remove_build(where)  # bad input (e.g. diverged gradients): nothing worth resuming
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreError(f"no space left on the device writing {where}; free space and run the same command "
                                 "again (the build resumes from its finished units)") from None
            raise
    return guard()


def _build_locked(bundle: ModelBundle, out: StorePath, checkpoints: list[tuple[str, float]], config: BuildConfig, force: bool,
                  progress: Callable[[int, int], None] | None, say: Callable[[str], None],
                  lock: BuildLock | None = None) -> Store:
    plan = make_plan(bundle, checkpoints, config)
    for warning in plan.attrs["warnings"]:
        say(f"warning: {warning}")
    if not force and (published := _up_to_date(out, plan, say)) is not None:
        return published
    with _guard(out, out):
        store, resumed = _create_or_resume(out, bundle, plan, config, force, say)
    with _guard(store.path, out):
        timings = _write_units(store, plan.tracer, plan.triples, config, plan.dtype, progress)
        _finish(out, store, timings, lock)
    published = Store.open(out)
    published.build_report = {"skipped": False, "resumed_units": resumed, "computed_units": timings["units_computed"],
                              "build": store.path.name}
    return published


def _write_units(store: Store, tracer: Tracer, triples: torch.Tensor, config: BuildConfig, dtype: str,
                 progress: Callable[[int, int], None] | None, units: list[int] | None = None) -> dict[str, Any]:
    """Compute and write every unit (of ``units``, default all) whose done flag is not set (rows, then the flag).

    Unit ``u``'s Zarr write (checksums, file I/O) runs on a writer thread while unit ``u + 1`` is
    computed; at most one write is in flight, and every write has finished (or raised) on return.
    Returns where the time went (``units_computed`` and seconds); writes no attributes.
    """
    done = store.done()
    wanted = np.ones_like(done) if units is None else np.isin(np.arange(len(done)), units)
    sizes = np.array([hi - lo for lo, hi in map(store.unit_range, range(len(done)))], dtype=np.int64)
    started = time.perf_counter()
    before = tracer.timings()
    computed = 0
    total_rows, rows_done = int(sizes[wanted].sum()), int(sizes[wanted & done].sum())
    if progress is not None:
        progress(rows_done, total_rows)
    compute_s = write_s = wait_s = 0.0

    keep_acts = "acts" in store.group

    def write(u: int, rows: np.ndarray, self_inf: np.ndarray, norms: np.ndarray, acts: np.ndarray | None) -> float:
        t0 = time.perf_counter()
        store.write_unit(u, rows, self_inf, norms, acts)
        return time.perf_counter() - t0

    pending: Future[float] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracin-writer") as writer:
        try:
            for u in np.flatnonzero(wanted & ~done).tolist():
                start, stop = store.unit_range(int(u))
                t0 = time.perf_counter()
                with torch.no_grad():
                    r = tracer.rows(triples[start:stop], batch_size=config.batch_size, keep_acts=keep_acts)
                # torch's float32 -> float16 rounding is numpy's, bit for bit, and vectorised (numpy's is not)
                rows = r.rows.to(getattr(torch, dtype)).cpu().numpy()
                # rows are finite (Tracer.rows): only one beyond the dtype's largest can overflow
                if r.peak > float(np.finfo(rows.dtype).max) and not np.isfinite(rows).all():
                    raise InputError(f"projected gradients reach {r.peak:.3g}, beyond {dtype}'s range; build with "
                                     f"{arg('dtype', 'float32')} (or check the checkpoints' learning rates)")
                self_inf = tracer.self_influence(r.sq_norms).cpu().numpy().astype(np.float32)
                norms = r.sq_norms.sqrt().cpu().numpy().astype(np.float32)
                t1 = time.perf_counter()
                compute_s += t1 - t0
                if pending is not None:
                    write_s += pending.result()  # the previous unit is on disk (its flag included) before the next starts
                    wait_s += time.perf_counter() - t1
                    computed += 1
                    if progress is not None:
                        progress(rows_done, total_rows)
                acts = None if r.acts is None else r.acts.to(torch.float32).cpu().numpy()
                pending = writer.submit(write, int(u), rows, self_inf, norms, acts)
                rows_done += stop - start
            if pending is not None:
                t1 = time.perf_counter()
                write_s += pending.result()
                wait_s += time.perf_counter() - t1
                computed += 1
                pending = None
                if progress is not None:
                    progress(rows_done, total_rows)
        finally:
            if pending is not None:
                with contextlib.suppress(Exception):
                    pending.result()  # a failure elsewhere waits for the write in flight, then propagates
    return {"units_computed": computed, "units_s": round(time.perf_counter() - started, 3),
            "compute_s": round(compute_s, 3),
            **{k: round(v - before[k], 3) for k, v in tracer.timings().items()},
            "zarr_write_s": round(write_s, 3), "zarr_wait_s": round(wait_s, 3)}


def __getattr__(name: str) -> object:
    if name in _SHARDS:
        from . import shards

        return getattr(shards, name)
    raise AttributeError(f"module 'tracin_index.build' has no attribute {name!r}")
