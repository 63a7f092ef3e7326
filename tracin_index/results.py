"""Results files: Parquet or JSON Lines (by extension), written atomically; bulk scoring is restartable.

A bulk run writes one part file per batch of test triples into ``.OUT.parts/`` beside ``OUT`` (each
part by write-then-rename, so a part is complete or absent), with a manifest of everything the results
depend on. A killed run started again with the same command skips the finished parts; when all are
there they are joined into ``OUT`` (again write-then-rename) and the parts are removed. An unbroken
run goes through the same parts, so both end in the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import replacing
from .errors import InputError, StoreError, arg
from .model import triples_fingerprint
from .query import ScoreSettings, TracinIndex
from .questions import with_predictions
from .rankings import COLUMN_TYPES, result_columns
from .registry import FORMATS, format_for

__all__ = ["JSONL", "PARQUET", "check_output", "output_format", "write_json", "write_records", "write_scores"]

MANIFEST = "manifest.json"


def output_format(path: str | os.PathLike[str]) -> str:
    """The table format (``parquet`` or ``jsonl``) that ``path``'s extension picks; anything else is refused."""
    return format_for(path, tables_only=True).name


def _schema(columns: list[str]) -> Any:
    import pyarrow as pa

    def typ(c: str) -> Any:
        return getattr(pa, COLUMN_TYPES[c])()

    return pa.schema([(c, typ(c)) for c in columns])


class JSONL:
    """JSON Lines: one object per record; parts join by concatenation."""

    @staticmethod
    def write(records: list[dict[str, Any]], columns: list[str], path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps({c: rec[c] for c in columns}, ensure_ascii=False) + "\n")

    @staticmethod
    def join(parts: list[Path], columns: list[str], path: Path) -> None:
        with open(path, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())


class PARQUET:
    """Apache Parquet with a fixed schema per column; parts join as row groups of one file."""

    @staticmethod
    def write(records: list[dict[str, Any]], columns: list[str], path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{c: rec[c] for c in columns} for rec in records], schema=_schema(columns))
        pq.write_table(table, path)

    @staticmethod
    def join(parts: list[Path], columns: list[str], path: Path) -> None:
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, _schema(columns)) as writer:
            for p in parts:
                writer.write_table(pq.read_table(p))


def _write_part(records: list[dict[str, Any]], columns: list[str], path: Path, fmt: str) -> None:
    """Write ``records`` to ``path`` completely or not at all."""
    with replacing(path) as tmp:
        FORMATS[fmt].load().write(records, columns, tmp)


def _join(parts: list[Path], columns: list[str], out: Path, fmt: str) -> None:
    with replacing(out) as tmp:
        FORMATS[fmt].load().join(parts, columns, tmp)


def write_json(payload: Any, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """One JSON document (``run``'s nested results, one object per test triple) written atomically."""
    out = Path(out)
    check_output(out, overwrite, tables_only=False)
    with replacing(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
    return out


def check_output(out: Path, overwrite: bool, tables_only: bool = True) -> str:
    """The format of ``out``, refused in one line when it is a directory, has another extension, or exists
    without ``overwrite``; creates its parent directory."""
    fmt = format_for(out, tables_only=tables_only).name
    if out.is_dir():
        raise InputError(f"{arg('out', out)} is a directory; give a file name ending in {FORMATS[fmt]['suffix']}")
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass {arg('overwrite', True)} to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return fmt


def write_records(records: list[dict[str, Any]], columns: list[str], out: str | os.PathLike[str], *,
                  overwrite: bool = False) -> Path:
    """Write a small table (a ranking) to ``out`` (.parquet or .jsonl), atomically."""
    out = Path(out)
    fmt = check_output(out, overwrite)
    _write_part(records, columns, out, fmt)
    return out


def _index_identity(index: TracinIndex) -> dict[str, Any]:
    a = index.info()
    return {k: a.get(k) for k in ("triples_sha256", "checkpoints", "tracked", "loss", "projection", "sample", "num_rows")}


def write_scores(
    index: TracinIndex,
    test: Any,
    out: str | os.PathLike[str],
    settings: ScoreSettings,
    *,
    batch_size: int | None = None,
    test_index: np.ndarray | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Score every test triple into ``out`` (one row per test triple, kind and rank), restartably.

    ``test``: what :meth:`TracinIndex.parse` accepts. ``test_index (M,)``: the position reported for
    each test triple (default ``0..M-1``). ``progress(done, total)`` counts test triples, including
    those already done by an earlier, killed run. ``batch_size`` None: :meth:`TracinIndex.bulk_batch_size`;
    a killed run resumes from its last finished batch.
    """
    out = Path(out)
    fmt = check_output(out, overwrite)
    triples, answers, origin = index.resolve(test, settings)  # a question becomes its predicted triples
    positions = origin if test_index is None else np.asarray(test_index, dtype=np.int64)[origin]
    batch_size = index.bulk_batch_size(len(triples), settings, requested=batch_size)
    manifest = {
        "schema": 1, "format": fmt, "batch_size": batch_size, "settings": settings.to_dict(),
        "index": _index_identity(index), "test_sha256": triples_fingerprint(triples),
        "test_index_sha256": triples_fingerprint(torch.from_numpy(positions.reshape(-1, 1))),
    }
    parts_dir = out.with_name(f".{out.name}.parts")
    manifest_path = parts_dir / MANIFEST
    if parts_dir.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != json.loads(json.dumps(manifest)):
            if log is not None:
                log(f"discarding the partial results in {parts_dir}: they were made with other settings or inputs")
            shutil.rmtree(parts_dir)
    if not parts_dir.exists():
        staging = parts_dir.with_name(parts_dir.name + f".new-{os.getpid()}")
        staging.mkdir(parents=True)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(staging, parts_dir)
    columns = list(result_columns(any(a is not None for a in answers)))
    ext = out.suffix.lower()
    n_batches = (len(triples) + batch_size - 1) // batch_size
    paths = [parts_dir / f"part-{b:06d}{ext}" for b in range(n_batches)]
    done = sum(min(batch_size, len(triples) - b * batch_size) for b, p in enumerate(paths) if p.exists())
    if done and log is not None:
        log(f"resuming: {done:,} of {len(triples):,} test triples already scored in {parts_dir}")
    if progress is not None:
        progress(done, len(triples))
    for b, path in enumerate(paths):
        if path.exists():
            continue
        lo, hi = b * batch_size, min(len(triples), (b + 1) * batch_size)

        def within(fraction: float, before: int = done, n: int = hi - lo) -> None:
            assert progress is not None
            progress(before + int(n * fraction), len(triples))

        with torch.no_grad():
            results = with_predictions(index.score_batch(triples[lo:hi], settings, within if progress is not None else None),
                                       answers[lo:hi])
        records = [rec for m, res in enumerate(results) for rec in res.records(int(positions[lo + m]))]
        _write_part(records, columns, path, fmt)
        done += hi - lo
        if progress is not None:
            progress(done, len(triples))
    _join(paths, columns, out, fmt)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out
