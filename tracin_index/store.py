"""Stage 4: the Zarr v3 store; the only module that touches Zarr.

An index (``IDX``) is a directory of dated builds and a pointer to the published one::

    IDX/LATEST           name of the published build; replaced atomically (write, fsync, rename)
    IDX/.lock            held (flock) by the one running builder; names its pid, host and start
    IDX/builds/<name>/   one build each, <name> = UTC start time + settings hash

``IDX`` may also be an ``s3://bucket/prefix`` URL (:mod:`tracin_index.location`): ``LATEST`` is then
replaced by one PUT (atomic for readers) and ``.lock`` is an object created by a conditional PUT
(``If-None-Match: *``) that carries a lease its holder renews (:class:`ObjectLock`).

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

The search table is built in memory from the rows when an index is opened (reading every chunk,
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
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec

from .errors import StoreError
from .location import ObjectPath, StorePath, Where, location, zarr_options

__all__ = ["SCHEMA_VERSION", "BuildLock", "ObjectLock", "Store", "builds", "latest_build", "publish", "resolve", "write_atomic"]

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
    """A tracin-index store on disk or in a bucket (one build)."""

    def __init__(self, path: StorePath, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.build_report: dict[str, Any] | None = None
        self._arrays: dict[str, Any] = {}  # opened once: each open reads the array's metadata (about 2 ms)

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
        # one metadata write (``attrs.update`` rewrites zarr.json once per key: 25 writes, 0.16 s)
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

    def iter_rows(self, block_rows: int | None = None, name: str = "grads",
                  float32: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Rows of a per-row array (the stored gradients by default) as float32 blocks ``(start, (b, width))``,
        whole chunks at a time, checksums checked; ``float32=False``: as stored (a caller that converts
        them itself, or only checks them, skips numpy's copy: 36 ms of a UMLS build and open).

        Default block: whole chunks up to 64 MiB of float32 rows (memory flat in N, and small: a fixed
        65,536-row block cost 400 MB at k=1024 while Zarr decoded it).
        """
        size = int(self.attrs["unit_rows"])
        if block_rows is None:
            width = int(np.prod(self.array(name).shape[1:], dtype=np.int64))
            block_rows = (64 * 2**20) // (4 * max(1, width))
        block = max(size, block_rows // size * size)
        for start in range(0, self.num_rows, block):
            part = self.read(name, start, min(self.num_rows, start + block))
            yield start, part.astype(np.float32) if float32 else part

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


def write_atomic(path: StorePath, text: str) -> None:
    if isinstance(path, ObjectPath):
        path.write_text(text)  # one PUT: readers get the old object or the new one
        return
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


def publish(home: StorePath, build: StorePath) -> None:
    """Make ``build`` (a complete build inside ``home``) the one readers open: one atomic rename (or PUT)."""
    write_atomic(home / LATEST, build.name + "\n")


class BuildLock:
    """One builder per index: an exclusive ``flock`` on ``IDX/.lock``, released when the process ends.

    The file names the holder (pid, host, start time) for the message a second builder gets. A lock
    file left by a dead process holds no flock, so it is simply taken over (and reported as such).
    ``BuildLock(url)`` for an ``s3://`` index is an :class:`ObjectLock`.
    """

    def __new__(cls, home: Where) -> BuildLock:
        if cls is BuildLock and isinstance(location(home), ObjectPath):
            return super().__new__(ObjectLock)
        return super().__new__(cls)

    def __init__(self, home: Where) -> None:
        self.home: Any = location(home)
        self.path: Any = self.home / LOCK
        self.fd: int | None = None
        self.took_over: str | None = None
        self.created = False

    def check(self) -> None:
        """Raise :class:`StoreError` if this lock is no longer held (an object lock whose lease was lost)."""

    def _refuse_foreign(self) -> None:
        if self.home.exists() and not self.home.is_dir():
            raise StoreError(f"{self.home} is a file, not an index directory; choose another --out")
        if self.home.is_dir() and any(True for _ in self.home.iterdir()) and not (
                (self.home / BUILDS).is_dir() or (self.home / LATEST).exists() or self.path.exists()):
            raise StoreError(f"{self.home} exists and is not a tracin-index index; choose another --out")

    def acquire(self) -> BuildLock:
        import fcntl

        self._refuse_foreign()
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
            return _describe(json.loads(self.path.read_text() or "{}"))
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


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info['pid']} on host {info['host']} (started {info['started']})"


def _lease_s() -> float:
    return float(os.environ.get("TRACIN_INDEX_LOCK_LEASE", "60"))


class ObjectLock(BuildLock):
    """One builder per ``s3://`` index: ``IDX/.lock`` is an object created by a conditional PUT.

    ``PUT .lock`` with ``If-None-Match: *`` succeeds for exactly one of any number of builders (the
    others get 412 Precondition Failed). The object names its holder (pid, host, start) and a lease
    expiry, which a heartbeat thread renews every quarter lease with ``If-Match: <ETag>`` (so a lock
    taken over meanwhile is never overwritten by its former holder). A builder that finds the lock held
    fails fast, unless the holder is gone: its lease expired (``TRACIN_INDEX_LOCK_LEASE`` seconds,
    default 60; hosts' clocks are assumed to agree to within a fraction of that), or it ran on this
    host and its pid is no longer alive (a killed build is resumed at once). It then takes the lock
    over with ``If-Match`` on the ETag it read, so of two builders taking over one wins. Releasing
    deletes the object (``If-Match`` again). A holder whose renewal finds the lock taken over stops
    before publishing (:meth:`check`).
    """

    def __init__(self, home: Where) -> None:
        super().__init__(home)
        self.etag: str | None = None
        self.token = uuid.uuid4().hex
        self.lease_s = _lease_s()
        self.lost: str | None = None
        self.started = ""
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _body(self, started: str) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "token": self.token,
                "expires": time.time() + self.lease_s}
        return json.dumps(info).encode()

    def _put(self, body: bytes, **condition: str) -> bool:
        """PUT the lock object under ``condition``; False when the condition does not hold (412)."""
        fs, key = self.path.fs, self.path.key
        try:
            with self.home.errors():
                bucket, obj = key.split("/", 1)
                out = fs.call_s3("put_object", Bucket=bucket, Key=obj, Body=body, **condition)
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "condition" in str(exc).lower() or "412" in str(exc):
                return False
            raise
        self.etag = str(out["ETag"])
        return True

    def _read(self) -> tuple[dict[str, Any], str] | None:
        """The lock object's holder and ETag, or None when there is none (released meanwhile)."""
        fs = self.path.fs
        try:
            with self.home.errors():
                bucket, obj = self.path.key.split("/", 1)
                got = fs.call_s3("get_object", Bucket=bucket, Key=obj)
                body = _read_body(fs, got)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(body or b"{}")
        except ValueError:
            info = {}
        return (info if isinstance(info, dict) else {}), str(got["ETag"])

    def _stale(self, info: dict[str, Any]) -> str | None:
        """Why the holder ``info`` no longer holds the lock, or None while it does."""
        try:
            expires = float(info["expires"])
        except (KeyError, TypeError, ValueError):
            return "the lock object is unreadable"
        if expires < time.time():
            return f"its lease expired {time.time() - expires:.0f} s ago"
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and info["pid"] != os.getpid():
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                return "its process is gone"
            except OSError:
                pass
        return None

    def acquire(self) -> BuildLock:
        self._refuse_foreign()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for _ in range(5):
            if self._put(self._body(self.started), IfNoneMatch="*"):
                break
            current = self._read()
            if current is None:
                continue  # released between our PUT and our GET: try again
            info, etag = current
            why = self._stale(info)
            if why is None:
                try:
                    holder = _describe(info)
                except KeyError:
                    holder = "another process"
                raise StoreError(f"{self.home} is being built by {holder}; wait for it to finish (one builder per index)")
            if self._put(self._body(self.started), IfMatch=etag):
                shown = {k: info[k] for k in ("pid", "host", "started") if k in info}
                self.took_over = f"{json.dumps(shown)}; {why}"
                break
        else:
            raise StoreError(f"{self.home}: the lock {self.path} keeps changing hands; run the build again")
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, name="tracin-lock-lease", daemon=True)
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4) and self._renew_once():
            pass

    def _renew_once(self) -> bool:
        """One heartbeat: extend the lease. False (``lost`` set) once the lock is someone else's."""
        etag = self.etag
        if etag is None:
            return False
        try:
            if self._put(self._body(self.started), IfMatch=etag):
                return True
            current = self._read()
        except Exception:  # a network blip: try again at the next beat (the lease covers four)
            return True
        try:
            holder = _describe(current[0]) if current is not None else "nobody"
        except KeyError:
            holder = "another process"
        self.lost = f"its lease lapsed and the lock is now held by {holder}"
        return False

    def check(self) -> None:
        if self.lost is not None:
            raise StoreError(f"{self.home}: this builder lost its lock ({self.lost}); nothing was published; run the "
                             "build again when the other one has finished")

    def release(self) -> None:
        """Stop renewing and delete the lock object (only if it is still ours)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self.etag is not None and self.lost is None:
            bucket, obj = self.path.key.split("/", 1)
            with contextlib.suppress(Exception):
                self.path.fs.call_s3("delete_object", Bucket=bucket, Key=obj, IfMatch=self.etag)
        self.etag = None


def _read_body(fs: Any, response: dict[str, Any]) -> bytes:
    """The body of a ``get_object`` response made through s3fs (an aiobotocore stream)."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with response["Body"] as stream:
            return bytes(await stream.read())

    return bytes(sync(fs.loop, read))


def remove_build(build: StorePath) -> None:
    if isinstance(build, ObjectPath):
        build.rmtree()
    else:
        shutil.rmtree(build, ignore_errors=True)
