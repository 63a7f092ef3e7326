"""Stage 4: the Zarr v3 store; the only module that touches Zarr.

An index (``IDX``) is a directory of dated builds and a pointer to the published one::

    IDX/LATEST           name of the published build; replaced atomically (write, fsync, rename)
    IDX/.lock            held (flock) by the one running builder; names its pid, host and start
    IDX/builds/<name>/   one build each, <name> = UTC start time + settings hash

``IDX`` may also be an ``s3://bucket/prefix`` URL (:mod:`tracin_index.location`): ``LATEST`` is then
replaced by one PUT (atomic for readers) and ``.lock`` is an object created by a conditional PUT
(``If-None-Match: *``) that carries a lease its holder renews (:mod:`tracin_index.locks`).

Readers follow ``LATEST`` and only ever open a complete build; a build in progress (or a failed one)
is a sibling they never see. Layout of one build::

    zarr.json            group attributes: schema, status, fingerprints, settings, versions
    grads/               (N, C*k) float16 (float32 for --projection none), row-chunked
    triples/             (N, 3) int64 raw ids
    train_index/         (N,) int64 position of each row in the training triples (a sample indexes a subset)
    entity_labels/       (E,) str;  relation_labels/ (R,) str
    self_influence/      (N,) float32, exact: sum_c lr_c ||g_c||^2
    norms/               (N, C) float32, exact ||g_c||
    acts/                (N, C*R*out) float32, optional: the first tracked Linear's outputs (attribute
                         ``activation_cache``), which the exact re-rank takes instead of recomputing them
    done/                (U,) bool, one flag (one chunk) per write unit
    faiss/               (B,) uint8, optional: the serialised FAISS index of ``build --faiss`` (attribute
                         ``faiss``: its spec, training sample, seed, sha256s), written once every unit is done
    faiss_trained/       (B,) uint8, with faiss/: the same index trained and empty (a shard's rows go into it)

The search table is built in memory from the rows when an index is opened (reading every chunk,
so through its checksum); no second copy of the rows is kept on disk that could disagree with them.

A write unit is ``unit_rows`` rows: one chunk of every per-row array. Its rows are written first, then
its flag; completion is read from the flags, never from a chunk's existence. Every array carries a
crc32c checksum per chunk; a mismatch is reported with the array, the chunk and its rows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec

from .atomic import write_text
from .errors import StoreError
from .location import ObjectPath, StorePath, Where, location, zarr_options
from .locks import BuildLock, ObjectLock

# BuildLock and ObjectLock live in .locks, re-exported here
__all__ = ["SCHEMA_VERSION", "BuildLock", "ObjectLock", "Store", "builds", "latest_build", "publish", "resolve"]

SCHEMA_VERSION = 2
LATEST = "LATEST"
BUILDS = "builds"
PER_ROW = ("grads", "triples", "train_index", "self_influence", "norms")
ARRAYS = (*PER_ROW, "done", "entity_labels", "relation_labels")


def _arr(group: zarr.Group, name: str) -> Any:
    return group[name]


def _raw_layout(arr: Any) -> bool:
    """Whether ``arr``'s chunk files hold its rows as plain little-endian bytes (then a checksum) at ``c/<i>/0``."""
    meta = arr.metadata
    names = [type(c).__name__ for c in getattr(meta, "codecs", ())]
    endian = getattr(getattr(meta, "codecs", [None])[0], "endian", None)
    separator = getattr(getattr(meta, "chunk_key_encoding", None), "separator", None)
    return (names == ["BytesCodec", "Crc32cCodec"] and str(getattr(endian, "value", endian)) == "little"
            and separator == "/" and len(arr.shape) >= 1 and np.dtype(arr.dtype).byteorder in "=<|"
            and sys.byteorder == "little")


def _codecs() -> dict[str, Any]:
    # No compressor: projected gradients barely compress. crc32c catches flipped bytes per chunk.
    # write_empty_chunks: every chunk is a file, even one equal to the fill value, so a missing file
    # always means damage (verify counts them) and never "all zeros".
    return {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None,
            "config": {"write_empty_chunks": True}}


class Store:
    """A tracin-index store on disk or in a bucket (one build)."""

    def __init__(self, path: StorePath, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.build_report: dict[str, Any] | None = None
        self._arrays: dict[str, Any] = {}  # opened once: each open reads the array's metadata

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        path: StorePath,
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
        acts_width: int = 0,
    ) -> Store:
        n = int(triples.shape[0])
        unit_rows = max(1, min(unit_rows, n))  # Zarr writes whole chunks: no padding beyond the data
        group = zarr.open_group(str(path), mode="w-", zarr_format=3, **zarr_options(path))
        units = (n + unit_rows - 1) // unit_rows
        arrays = {
            "grads": group.create_array("grads", shape=(n, width), chunks=(unit_rows, width), dtype=dtype, **_codecs()),
            "triples": group.create_array("triples", shape=(n, 3), chunks=(unit_rows, 3), dtype="int64", **_codecs()),
            "train_index": group.create_array("train_index", shape=(n,), chunks=(unit_rows,), dtype="int64", **_codecs()),
            "self_influence": group.create_array("self_influence", shape=(n,), chunks=(unit_rows,), dtype="float32",
                                                 **_codecs()),
            "norms": group.create_array("norms", shape=(n, num_checkpoints), chunks=(unit_rows, num_checkpoints),
                                        dtype="float32", **_codecs()),
        }
        if acts_width:  # the activation cache (optional): the first tracked Linear's outputs, float32
            arrays["acts"] = group.create_array("acts", shape=(n, acts_width), chunks=(unit_rows, acts_width),
                                                dtype="float32", **_codecs())
        arrays["done"] = group.create_array("done", shape=(units,), chunks=(1,), dtype="bool", fill_value=False, **_codecs())
        for name, labels in (("entity_labels", entity_labels), ("relation_labels", relation_labels)):
            arrays[name] = group.create_array(name, shape=(len(labels),), chunks=(max(1, len(labels)),), dtype=str,
                                              serializer=VLenUTF8Codec(), compressors=[Crc32cCodec()], filters=None,
                                              config={"write_empty_chunks": True})
            arrays[name][:] = np.asarray(labels, dtype=object)
        arrays["triples"][:] = np.asarray(triples, dtype=np.int64)  # no copy when already int64
        arrays["train_index"][:] = np.asarray(train_index, dtype=np.int64)
        # one metadata write (``attrs.update`` rewrites zarr.json once per key)
        group.update_attributes({**attrs, "schema_version": SCHEMA_VERSION, "num_rows": n, "width": width,
                                 "unit_rows": unit_rows, "num_units": units, "status": "building"})
        store = cls(path, group)
        store._arrays.update(arrays)
        return store

    @classmethod
    def open(cls, path: Where, *, complete: bool = True) -> Store:
        """Open an index (its published build, via ``LATEST``) or one build directory (or ``s3://`` URL)."""
        p = resolve(path)
        try:
            group = zarr.open_group(str(p), mode="r+" if not complete else "r", zarr_format=3, **zarr_options(p))
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
        if name not in self._arrays:
            self._arrays[name] = _arr(self.group, name)
        return self._arrays[name]

    @property
    def num_rows(self) -> int:
        return int(self.attrs["num_rows"])

    def unit_range(self, u: int) -> tuple[int, int]:
        rows = int(self.attrs["unit_rows"])
        return u * rows, min(self.num_rows, (u + 1) * rows)

    def write_unit(self, u: int, grads: np.ndarray, self_influence: np.ndarray, norms: np.ndarray,
                   acts: np.ndarray | None = None) -> None:
        """Write unit ``u``'s rows (and activations, when the store caches them), then its done flag."""
        start, stop = self.unit_range(u)
        if "acts" in self.group:
            if acts is None:
                raise ValueError("this store caches activations: write_unit needs them")
            self.array("acts")[start:stop] = acts
        self.array("grads")[start:stop] = grads
        self.array("self_influence")[start:stop] = self_influence
        self.array("norms")[start:stop] = norms
        self.array("done")[u] = True

    def done(self) -> np.ndarray:
        """Done flags ``(U,) bool``. A flag whose chunk is torn (the writer was killed while writing it)
        reads as not done: its unit is computed and written again."""
        arr = self.array("done")
        try:
            return np.asarray(arr[:], dtype=bool)
        except ValueError:
            flags = np.zeros(arr.shape[0], dtype=bool)
            for u in range(arr.shape[0]):
                with contextlib.suppress(ValueError):
                    flags[u] = bool(arr[u])
            return flags

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of array ``name``; a checksum mismatch names the array, chunk and rows."""
        arr = self.array(name)
        stop = arr.shape[0] if stop is None else stop
        try:
            return np.asarray(arr[start:stop])
        except ValueError as exc:
            if "checksum" not in str(exc).lower():
                raise
        size = arr.chunks[0]
        for c in range(start // size, max(start // size, (stop - 1) // size) + 1):
            try:
                arr[c * size : min(arr.shape[0], (c + 1) * size)]
            except ValueError:
                raise StoreError(
                    f"{self.path}: array {name!r} chunk {c} (rows {c * size}-{min(arr.shape[0], (c + 1) * size) - 1}) "
                    "is corrupt (crc32c mismatch); rebuild the index with 'tracin-index build --force'"
                ) from None
        raise StoreError(f"{self.path}: array {name!r} rows {start}-{stop - 1} could not be read; rebuild it")

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) of per-row array ``name``, reading those rows alone.

        In a local build the chunks are uncompressed (row ``r`` of a chunk starts at byte ``r * row_bytes``), so
        each row is one read of its bytes from its chunk file: a few hundred rows of a store far larger than
        memory cost a few hundred small reads, all announced to the kernel (``posix_fadvise``) before the first,
        so that a disk serves them in parallel. Such partial reads cannot check a chunk's checksum (``verify``
        does); elsewhere (``s3://``, another layout) the rows' whole chunks are read and checked.
        """
        arr = self.array(name)
        rows = np.asarray(rows, dtype=np.int64)
        shape = tuple(int(x) for x in arr.shape[1:])
        dtype = np.dtype(arr.dtype)
        if not len(rows):
            return np.empty((0, *shape), dtype)
        if not isinstance(self.path, Path) or not _raw_layout(arr):
            order = np.unique(rows)
            size = arr.chunks[0]
            parts = {}
            for c in np.unique(order // size):
                start = int(c) * size
                block = self.read(name, start, min(arr.shape[0], start + size))
                for r in order[(order >= start) & (order < start + size)]:
                    parts[int(r)] = block[int(r) - start]
            return np.stack([parts[int(r)] for r in rows])
        row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = int(arr.chunks[0])
        out = np.empty((len(rows), *shape), dtype=dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        order = np.argsort(rows, kind="stable")
        chunk_of = rows[order] // size
        offsets = (rows % size * row_bytes).tolist()
        chunks = [(int(c), os.path.join(self.path, name, "c", str(int(c)), "0"), order[chunk_of == c].tolist())
                  for c in np.unique(chunk_of)]
        if hasattr(os, "posix_fadvise"):  # ask for every row first: the disk then serves them in parallel
            for _, file, picked in chunks:
                fd = os.open(file, os.O_RDONLY)
                for i in picked:
                    os.posix_fadvise(fd, offsets[i], row_bytes, os.POSIX_FADV_WILLNEED)
                os.close(fd)
        for c, file, picked in chunks:
            fd = os.open(file, os.O_RDONLY)
            try:
                for i in picked:
                    if os.preadv(fd, [flat[i].data], offsets[i]) != row_bytes:
                        raise StoreError(f"{self.path}: array {name!r} chunk {c} is truncated; rebuild the index "
                                         "with 'tracin-index build --force'")
            finally:
                os.close(fd)
        return out

    def iter_rows(self, block_rows: int | None = None, name: str = "grads",
                  float32: bool = True, rows: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Rows of a per-row array (the stored gradients by default) as float32 blocks ``(start, (b, width))``,
        whole chunks at a time, checksums checked; ``float32=False``: as stored (a caller that converts
        them itself, or only checks them, skips numpy's copy). ``rows``: only the range ``(lo, hi)``.

        Default block: whole chunks up to 64 MiB of float32 rows (memory flat in N, and small: a block's
        decoding by Zarr takes several times its rows' bytes, so the block is sized by bytes, not rows).
        """
        size = int(self.attrs["unit_rows"])
        if block_rows is None:
            width = int(np.prod(self.array(name).shape[1:], dtype=np.int64))
            block_rows = (64 * 2**20) // (4 * max(1, width))
        block = max(size, block_rows // size * size)
        lo, hi = rows or (0, self.num_rows)
        for start in range(lo, hi, block):
            part = self.read(name, start, min(hi, start + block))
            yield start, part.astype(np.float32) if float32 else part

    def write_blob(self, name: str, data: bytes, chunk: int = 64 * 2**20) -> None:
        """Bytes as a 1-D uint8 array ``name`` (replaced if there), crc32c per chunk of ``chunk`` bytes."""
        if name in self.group:
            del self.group[name]
            self._arrays.pop(name, None)
        arr = self.group.create_array(name, shape=(len(data),), chunks=(max(1, min(chunk, len(data))),), dtype="uint8",
                                      **_codecs())
        arr[:] = np.frombuffer(data, dtype=np.uint8)
        self._arrays[name] = arr

    def read_blob(self, name: str) -> bytes:
        """What :meth:`write_blob` wrote, checksums checked."""
        return b"".join(chunk.tobytes() for chunk in self.iter_blob(name))

    def iter_blob(self, name: str) -> Iterator[np.ndarray]:
        """What :meth:`write_blob` wrote, chunk by chunk (uint8 arrays), checksums checked."""
        arr = self.array(name)
        size = int(arr.chunks[0])
        for start in range(0, int(arr.shape[0]), size):
            yield self.read(name, start, min(int(arr.shape[0]), start + size))

    def labels(self) -> tuple[list[str], list[str]]:
        return ([str(x) for x in self.read("entity_labels")], [str(x) for x in self.read("relation_labels")])

    def set_attrs(self, **values: Any) -> None:
        self.group.update_attributes(values)  # one metadata write


# ---------------------------------------------------------------------------------------------- index home


def resolve(path: Where) -> StorePath:
    """The build directory ``path`` names: itself if it is a build, else its published build."""
    p = location(path)
    if (p / "zarr.json").exists():
        return p
    latest = p / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        build = p / BUILDS / name
        if not (build / "zarr.json").exists():
            raise StoreError(f"{p}: {LATEST} names build {name!r}, which is missing; run 'tracin-index build' again")
        return build
    if (p / BUILDS).is_dir():
        raise StoreError(f"{p} has no published build yet (a first build is running or failed); run 'tracin-index build'")
    if not p.exists():
        if isinstance(p, ObjectPath) and not ObjectPath(f"s3://{p.bucket}").exists():
            raise StoreError(f"bucket {p.bucket!r} does not exist at {p.endpoint()}; check the URL {p} "
                             "(or AWS_ENDPOINT_URL)")
        raise StoreError(f"index {p} not found (check the path, or build one with 'tracin-index build')")
    raise StoreError(f"{p} is not a tracin-index index (no {LATEST}, no zarr.json); build one with 'tracin-index build'")


def latest_build(home: StorePath) -> StorePath | None:
    """The published build of index ``home``, or None."""
    latest = home / LATEST
    if not latest.exists():
        return None
    build = home / BUILDS / latest.read_text().strip()
    return build if (build / "zarr.json").exists() else None


def builds(home: StorePath) -> list[StorePath]:
    """Build directories of ``home``, oldest first (names start with their UTC start time)."""
    d = home / BUILDS
    if not isinstance(d, ObjectPath) and not d.is_dir():  # (a missing prefix lists as empty)
        return []
    found: list[StorePath] = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.name)


def publish(home: StorePath, build: StorePath) -> None:
    """Make ``build`` (a complete build inside ``home``) the one readers open: one atomic rename (or PUT)."""
    write_text(home / LATEST, build.name + "\n")


def remove_build(build: StorePath) -> None:
    if isinstance(build, ObjectPath):
        build.rmtree()
    else:
        shutil.rmtree(build, ignore_errors=True)
