"""Integrity checks of a build: every chunk's checksum, done flags, row counts, values, fingerprints.

``verify_rows`` needs only the store (the builder runs it before publishing); ``verify`` adds the
checks against the model, checkpoints and training triples the store records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError, TracinError
from .location import Where
from .store import ARRAYS, PER_ROW, Store, resolve

__all__ = ["VerifyReport", "verify", "verify_rows"]


@dataclass
class VerifyReport:
    """What ``verify`` checked (``checks``) and what is wrong (``problems``; empty = the build is sound)."""

    build: str
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_all(store: Store, name: str, problems: list[str], start: int = 0, stop: int | None = None) -> np.ndarray | None:
    """Rows ``start:stop`` of ``name`` (all by default), or None with the checksum problem added."""
    try:
        return store.read(name, start, stop)
    except StoreError as exc:
        problems.append(str(exc).split(": ", 1)[-1])
        return None


def verify_rows(store: Store) -> list[str]:
    """Checks that need only the store; returns the problems found (empty = sound)."""
    problems: list[str] = []
    a = store.attrs
    n = int(a.get("num_rows", -1))
    cache = a.get("activation_cache")  # the optional acts array, when the build stored it
    arrays, per_row = ((*ARRAYS, "acts"), (*PER_ROW, "acts")) if cache else (ARRAYS, PER_ROW)
    for name in arrays:
        if name not in store.group:
            problems.append(f"array {name!r} is missing")
    if problems:
        return problems
    for name in arrays:  # a missing chunk file would read as its fill value: count them
        arr = store.array(name)
        if arr.nchunks_initialized != arr.nchunks:
            problems.append(f"array {name!r} has {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks missing")
    for name in ("entity_labels", "relation_labels"):
        _read_all(store, name, problems)
    for name in per_row:
        if store.array(name).shape[0] != n:
            problems.append(f"array {name!r} has {store.array(name).shape[0]} rows, the store says {n}")
    done = _read_all(store, "done", problems)
    if done is not None and not bool(np.all(done)):
        problems.append(f"write units {np.flatnonzero(~done.astype(bool))[:5].tolist()} are not done")
    if cache and store.array("acts").shape[1:] != (int(cache["width"]),):
        problems.append(f"array 'acts' has {store.array('acts').shape[1:]} columns, the store says {cache['width']}")
    # the arrays that grow with N x width: streamed a block of chunks at a time, memory flat in N
    for name in ("grads", "acts") if cache else ("grads",):
        try:
            if not all(_finite(block) for _, block in store.iter_rows(name=name, float32=False)):
                problems.append(f"array {name!r} holds NaN or infinite values")
        except StoreError as exc:
            problems.append(str(exc).split(": ", 1)[-1])
    _check_per_row(store, problems)
    if a.get("sample", {}).get("rate", 1.0) >= 1.0 and n != int(a.get("num_train", -1)):
        problems.append(f"{n} rows for {a.get('num_train')} training triples (no sample was asked for)")
    return problems


def _finite(block: np.ndarray) -> bool:
    """No NaN or infinity in ``block``; float16 by its exponent bits (all ones: inf or NaN), cheaper than
    numpy's ``isfinite`` on float16."""
    if block.dtype == np.float16:
        return bool(((block.view(np.uint16) & 0x7C00) != 0x7C00).all())
    return bool(np.isfinite(block).all())


VERIFY_BLOCK_ROWS = 1 << 18  # rows of the narrow per-row arrays read at once (triples: 6 MiB)


def _check_per_row(store: Store, problems: list[str]) -> None:
    """Training positions increasing within the training triples, triple ids inside the label tables,
    self-influence equal to the norms and learning rates: a block of rows at a time, all four arrays
    side by side, so memory stays flat in N (reading them whole would grow with N)."""
    a = store.attrs
    n, num_train = int(a.get("num_rows", 0)), int(a.get("num_train", 0))
    num_e, num_r = store.array("entity_labels").shape[0], store.array("relation_labels").shape[0]
    lrs = np.array([c["lr"] for c in a.get("checkpoints", [])], dtype=np.float64)
    unit = max(1, int(a.get("unit_rows", 1)))
    block = max(unit, VERIFY_BLOCK_ROWS // unit * unit)
    unreadable: list[str] = []
    found: list[str] = []

    def problem(message: str) -> None:
        if message not in found:
            found.append(message)

    previous = -1  # the last training position of the block before
    for start in range(0, n, block):
        got: dict[str, np.ndarray] = {}
        for name in ("train_index", "triples", "norms", "self_influence"):
            part = None if name in unreadable else _read_all(store, name, found, start, min(n, start + block))
            if part is None:
                unreadable.append(name)  # its checksum problem is reported once
            else:
                got[name] = part
        ti = got.get("train_index")
        if ti is not None and len(ti):
            if ti[0] <= previous or ti[-1] >= num_train or bool(np.any(np.diff(ti) <= 0)):
                problem("array 'train_index' is not increasing within the training triples")
            previous = int(ti[-1])
        triples = got.get("triples")
        if triples is not None and len(triples) and (
                triples.min() < 0 or max(triples[:, 0].max(), triples[:, 2].max()) >= num_e or triples[:, 1].max() >= num_r):
            problem("array 'triples' holds ids outside the label tables")
        norms, si = got.get("norms"), got.get("self_influence")
        if norms is not None and si is not None and len(norms) == len(si):
            if norms.shape[1] != len(lrs):
                problem(f"array 'norms' has {norms.shape[1]} columns for {len(lrs)} checkpoints")
            elif not np.allclose(si, (norms.astype(np.float64) ** 2) @ lrs, rtol=1e-3, atol=1e-12):
                problem("array 'self_influence' disagrees with 'norms' and the learning rates")
    problems.extend(found)


def verify(path: Where, *, check_model: bool = True) -> VerifyReport:
    """Verify the published build of index ``path`` (or one build directory).

    Checks every chunk of every array against its crc32c, the done flags, the row counts against the
    training triples, values (finite rows; self-influence = norms and learning rates), and with
    ``check_model`` the recorded fingerprints of the model's training triples and of every checkpoint.
    """
    build = resolve(path)
    report = VerifyReport(build=str(build))
    try:
        store = Store.open(build, complete=False)
    except StoreError as exc:
        report.problems.append(str(exc))
        return report
    a = store.attrs
    if a.get("status") != "complete":
        report.problems.append(f"status is {a.get('status')!r}, not 'complete'")
    report.problems += verify_rows(store)
    report.checks.append(f"{len(ARRAYS)} arrays, every chunk present and its crc32c, {a.get('num_units')} done flags, "
                         f"{a.get('num_rows')} rows")
    if a.get("faiss"):
        report.problems += _check_faiss(store)
        report.checks.append(f"FAISS index {a['faiss']['spec']}: its chunks' crc32c and its sha256")
    if check_model and not report.problems:
        try:
            report.problems += _check_fingerprints(store, report)
        except StoreError as exc:
            report.problems.append(str(exc))
    return report


def _check_faiss(store: Store) -> list[str]:
    """The stored FAISS index is there, whole, and the one whose sha256 the build recorded."""
    info = store.attrs["faiss"]
    problems = []
    for name, key, what in (("faiss", "sha256", "the FAISS index"),
                            ("faiss_trained", "faiss_trained_sha256", "the trained, empty FAISS index")):
        if name not in store.group or key not in info:
            problems.append(f"{what} {info.get('spec')!r} is missing")
            continue
        try:
            data = store.read_blob(name)
        except StoreError as exc:
            problems.append(str(exc).split(": ", 1)[-1])
            continue
        if hashlib.sha256(data).hexdigest() != info[key]:
            problems.append(f"{what} does not match its recorded sha256")
    return problems


def _check_fingerprints(store: Store, report: VerifyReport) -> list[str]:
    from .model import load_checkpoints, load_model, triples_fingerprint

    a = store.attrs
    src = a["model_source"]
    problems: list[str] = []
    try:
        bundle = load_model(src["path"], model_class=src.get("model_class"), model_kwargs=src.get("model_kwargs"),
                            triples=src.get("triples"), entity_to_id=src.get("entity_to_id"),
                            relation_to_id=src.get("relation_to_id"), inverse_triples=src.get("inverse_triples"))
    except TracinError as exc:
        return [f"the recorded model cannot be loaded ({exc}); verify --no-model skips this check"]
    mapped = bundle.triples.mapped
    if triples_fingerprint(mapped) != a["triples_sha256"]:
        problems.append("the model's training triples differ from the indexed ones (sha256)")
    else:
        ti = store.read("train_index")
        if not np.array_equal(mapped.numpy()[ti], store.read("triples")):
            problems.append("array 'triples' differs from the training triples at 'train_index'")
        report.checks.append(f"training triples sha256 {a['triples_sha256'][:12]} and the stored rows")
    recorded = a["checkpoints"]
    specs = [] if recorded[0]["name"] == "model" else [(c["name"], c["lr"]) for c in recorded]
    try:
        ckpts = load_checkpoints(bundle.model, specs)
    except TracinError as exc:
        return [*problems, f"a recorded checkpoint cannot be loaded ({exc})"]
    for c, rec in zip(ckpts, recorded, strict=True):
        if c.fingerprint != rec["sha256"]:
            problems.append(f"checkpoint {Path(c.name).name} differs from the indexed one (sha256)")
    report.checks.append(f"{len(ckpts)} checkpoint fingerprint(s)")
    return problems


def describe(report: VerifyReport) -> dict[str, Any]:
    return {"build": report.build, "ok": report.ok, "checks": report.checks, "problems": report.problems}
