"""Stage 4: the Zarr v3 store; the only module that touches Zarr.

Layout of one build (a directory)::

    zarr.json            group attributes: schema, status, fingerprints, settings, versions
    grads/               (N, C*k) float16 (float32 for --projection none), row-chunked
    triples/             (N, 3) int64 raw ids
    train_index/         (N,) int64 position of each row in the training triples (a sample indexes a subset)
    entity_labels/       (E,) str;  relation_labels/ (R,) str
    self_influence/      (N,) float32, exact: sum_c lr_c ||g_c||^2
    norms/               (N, C) float32, exact ||g_c||
    done/                (U,) bool, one flag (one chunk) per write unit
    faiss.index          FAISS IndexFlatIP over grads (written last)

A write unit is ``unit_rows`` rows: one chunk of every per-row array. Its rows are written first, then
its flag; completion is read from the flags, never from a chunk's existence. Every array carries a
crc32c checksum per chunk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from .errors import StoreError

__all__ = ["SCHEMA_VERSION", "Store", "publish"]

SCHEMA_VERSION = 2
FAISS_FILE = "faiss.index"


def _arr(group: zarr.Group, name: str) -> Any:
    return group[name]


def _codecs() -> dict[str, Any]:
    # No compressor: projected gradients barely compress. crc32c catches flipped bytes per chunk.
    return {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None}


class Store:
    """A tracin-index store on disk (one build)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        triples: np.ndarray,
        train_index: np.ndarray,
        entity_labels: list[str],
        relation_labels: list[str],
        width: int,
        num_checkpoints: int,
        unit_rows: int,
        dtype: str,
        attrs: dict[str, Any],
    ) -> Store:
        n = int(triples.shape[0])
        unit_rows = max(1, min(unit_rows, n))  # Zarr writes whole chunks: no padding beyond the data
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        units = (n + unit_rows - 1) // unit_rows
        group.create_array("grads", shape=(n, width), chunks=(unit_rows, width), dtype=dtype, **_codecs())
        group.create_array("triples", shape=(n, 3), chunks=(unit_rows, 3), dtype="int64", **_codecs())
        group.create_array("train_index", shape=(n,), chunks=(unit_rows,), dtype="int64", **_codecs())
        group.create_array("self_influence", shape=(n,), chunks=(unit_rows,), dtype="float32", **_codecs())
        group.create_array("norms", shape=(n, num_checkpoints), chunks=(unit_rows, num_checkpoints), dtype="float32", **_codecs())
        group.create_array("done", shape=(units,), chunks=(1,), dtype="bool", fill_value=False, **_codecs())
        for name, labels in (("entity_labels", entity_labels), ("relation_labels", relation_labels)):
            arr = group.create_array(name, shape=(len(labels),), chunks=(max(1, len(labels)),), dtype=str)
            arr[:] = np.asarray(labels, dtype=object)
        _arr(group, "triples")[:] = triples.astype(np.int64)
        _arr(group, "train_index")[:] = train_index.astype(np.int64)
        group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "num_rows": n, "width": width,
                            "unit_rows": unit_rows, "num_units": units, "status": "building"})
        return cls(path, group)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, complete: bool = True) -> Store:
        p = Path(path)
        if not (p / "zarr.json").exists():
            raise StoreError(f"{p} is not a tracin-index store (no zarr.json); build one with 'tracin-index build'")
        try:
            group = zarr.open_group(str(p), mode="r+" if not complete else "r", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{p} could not be opened as a Zarr v3 group: {exc}") from exc
        attrs = dict(group.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{p} has store schema {attrs.get('schema_version')!r}, this tracin-index reads {SCHEMA_VERSION}; rebuild it"
            )
        if complete and attrs.get("status") != "complete":
            raise StoreError(f"{p} is an incomplete build (status {attrs.get('status')!r}); run the build again")
        return cls(p, group)

    # ------------------------------------------------------------------ access

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def array(self, name: str) -> Any:
        """A Zarr array of this store (typed ``Any``: zarr's indexing types are too loose for mypy)."""
        return _arr(self.group, name)

    @property
    def num_rows(self) -> int:
        return int(self.attrs["num_rows"])

    def unit_range(self, u: int) -> tuple[int, int]:
        rows = int(self.attrs["unit_rows"])
        return u * rows, min(self.num_rows, (u + 1) * rows)

    def write_unit(self, u: int, grads: np.ndarray, self_influence: np.ndarray, norms: np.ndarray) -> None:
        """Write unit ``u``'s rows, then its done flag."""
        start, stop = self.unit_range(u)
        self.array("grads")[start:stop] = grads
        self.array("self_influence")[start:stop] = self_influence
        self.array("norms")[start:stop] = norms
        self.array("done")[u] = True

    def done(self) -> np.ndarray:
        return np.asarray(self.array("done")[:], dtype=bool)

    def iter_rows(self, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Stored rows as float32 blocks ``(start, (b, width))``."""
        grads = self.array("grads")
        for start in range(0, self.num_rows, block_rows):
            yield start, np.asarray(grads[start : start + block_rows], dtype=np.float32)

    def labels(self) -> tuple[list[str], list[str]]:
        return ([str(x) for x in self.array("entity_labels")[:]], [str(x) for x in self.array("relation_labels")[:]])

    def set_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    @property
    def faiss_path(self) -> Path:
        return self.path / FAISS_FILE


def publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Move a complete build from ``staging`` to ``target`` (a rename on the same filesystem)."""
    if target.exists():
        if not overwrite:
            raise StoreError(f"{target} already exists; pass --overwrite to replace it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
