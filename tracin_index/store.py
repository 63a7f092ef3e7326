"""Stage 4: the Zarr v3 store; the only module that touches Zarr.

An index (``IDX``) is a directory of dated builds and a pointer to the published one::

    IDX/LATEST           name of the published build; replaced atomically (write, fsync, rename)
    IDX/.lock            held (flock) by the one running builder; names its pid, host and start
    IDX/builds/<name>/   one build each, <name> = UTC start time + settings hash

Readers follow ``LATEST`` and only ever open a complete build; a build in progress (or a failed one)
is a sibling they never see. Layout of one build::

    zarr.json            group attributes: schema, status, fingerprints, settings, versions
    grads/               (N, C*k) float16 (float32 for --projection none), row-chunked
    triples/             (N, 3) int64 raw ids
    train_index/         (N,) int64 position of each row in the training triples (a sample indexes a subset)
    entity_labels/       (E,) str;  relation_labels/ (R,) str
    self_influence/      (N,) float32, exact: sum_c lr_c ||g_c||^2
    norms/               (N, C) float32, exact ||g_c||
    done/                (U,) bool, one flag (one chunk) per write unit

The FAISS flat index is built in memory from the rows when an index is opened (reading every chunk,
so through its checksum); no second copy of the rows is kept on disk that could disagree with them.

A write unit is ``unit_rows`` rows: one chunk of every per-row array. Its rows are written first, then
its flag; completion is read from the flags, never from a chunk's existence. Every array carries a
crc32c checksum per chunk; a mismatch is reported with the array, the chunk and its rows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec

from .errors import StoreError

__all__ = ["SCHEMA_VERSION", "BuildLock", "Store", "builds", "latest_build", "publish", "resolve"]

SCHEMA_VERSION = 2
LATEST = "LATEST"
BUILDS = "builds"
LOCK = ".lock"
PER_ROW = ("grads", "triples", "train_index", "self_influence", "norms")
ARRAYS = (*PER_ROW, "done", "entity_labels", "relation_labels")


def _arr(group: zarr.Group, name: str) -> Any:
    return group[name]


def _codecs() -> dict[str, Any]:
    # No compressor: projected gradients barely compress. crc32c catches flipped bytes per chunk.
    # write_empty_chunks: every chunk is a file, even one equal to the fill value, so a missing file
    # always means damage (verify counts them) and never "all zeros".
    return {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None,
            "config": {"write_empty_chunks": True}}


class Store:
    """A tracin-index store on disk (one build)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.build_report: dict[str, Any] | None = None

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
            arr = group.create_array(name, shape=(len(labels),), chunks=(max(1, len(labels)),), dtype=str,
                                     serializer=VLenUTF8Codec(), compressors=[Crc32cCodec()], filters=None,
                                     config={"write_empty_chunks": True})
            arr[:] = np.asarray(labels, dtype=object)
        _arr(group, "triples")[:] = triples.astype(np.int64)
        _arr(group, "train_index")[:] = train_index.astype(np.int64)
        group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "num_rows": n, "width": width,
                            "unit_rows": unit_rows, "num_units": units, "status": "building"})
        return cls(path, group)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, complete: bool = True) -> Store:
        """Open an index (its published build, via ``LATEST``) or one build directory."""
        p = resolve(path)
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

    def iter_rows(self, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Stored rows as float32 blocks ``(start, (b, width))``, whole chunks at a time, checksums checked.

        Default block: whole chunks up to 64 MiB of float32 rows (memory flat in N, and small: a fixed
        65,536-row block cost 400 MB at k=1024 while Zarr decoded it).
        """
        size = int(self.attrs["unit_rows"])
        if block_rows is None:
            block_rows = (64 * 2**20) // (4 * max(1, int(self.attrs["width"])))
        block = max(size, block_rows // size * size)
        for start in range(0, self.num_rows, block):
            yield start, self.read("grads", start, min(self.num_rows, start + block)).astype(np.float32)

    def labels(self) -> tuple[list[str], list[str]]:
        return ([str(x) for x in self.read("entity_labels")], [str(x) for x in self.read("relation_labels")])

    def set_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)


# ---------------------------------------------------------------------------------------------- index home


def resolve(path: str | os.PathLike[str]) -> Path:
    """The build directory ``path`` names: itself if it is a build, else its published build."""
    p = Path(path)
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
        raise StoreError(f"index {p} not found (check the path, or build one with 'tracin-index build')")
    raise StoreError(f"{p} is not a tracin-index index (no {LATEST}, no zarr.json); build one with 'tracin-index build'")


def latest_build(home: Path) -> Path | None:
    """The published build of index ``home``, or None."""
    latest = home / LATEST
    if not latest.exists():
        return None
    build = home / BUILDS / latest.read_text().strip()
    return build if (build / "zarr.json").exists() else None


def builds(home: Path) -> list[Path]:
    """Build directories of ``home``, oldest first (names start with their UTC start time)."""
    d = home / BUILDS
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(home: Path, build: Path) -> None:
    """Make ``build`` (a complete build inside ``home``) the one readers open: one atomic rename."""
    _write_atomic(home / LATEST, build.name + "\n")


class BuildLock:
    """One builder per index: an exclusive ``flock`` on ``IDX/.lock``, released when the process ends.

    The file names the holder (pid, host, start time) for the message a second builder gets. A lock
    file left by a dead process holds no flock, so it is simply taken over (and reported as such).
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / LOCK
        self.fd: int | None = None
        self.took_over: str | None = None
        self.created = False

    def acquire(self) -> BuildLock:
        import fcntl

        if self.home.exists() and not self.home.is_dir():
            raise StoreError(f"{self.home} is a file, not an index directory; choose another --out")
        if self.home.is_dir() and any(self.home.iterdir()) and not (
                (self.home / BUILDS).is_dir() or (self.home / LATEST).exists() or self.path.exists()):
            raise StoreError(f"{self.home} exists and is not a tracin-index index; choose another --out")
        self.created = not self.home.exists()
        self.home.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise StoreError(f"{self.home} is being built by {self._holder()}; wait for it to finish "
                                 "(one builder per index)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a lock file that its holder removed meanwhile: lock the current one
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            self.took_over = previous
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self) -> None:
        """Unlock; an index directory this lock created and nothing else filled is removed again."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            if self.created and [p.name for p in self.home.iterdir()] == [LOCK]:
                self.path.unlink(missing_ok=True)  # still locked: a process that opens it now re-checks the inode
                with contextlib.suppress(OSError):
                    self.home.rmdir()
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_build(build: Path) -> None:
    shutil.rmtree(build, ignore_errors=True)
