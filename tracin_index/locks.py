"""One builder per index: the lock on ``IDX/.lock``.

On a filesystem the lock is an exclusive ``flock`` on the file (:class:`BuildLock`); for an ``s3://`` index
it is an object created by a conditional PUT that carries a lease its holder renews (:class:`ObjectLock`).
The lock names its holder (pid, host, start time) for the message a second builder gets.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .errors import StoreError, arg
from .location import ObjectPath, Where, location

__all__ = ["LOCK", "BuildLock", "ObjectLock"]

LOCK = ".lock"


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
        from .store import BUILDS, LATEST  # the index layout (store imports this module)

        if self.home.exists() and not self.home.is_dir():
            raise StoreError(f"{self.home} is a file, not an index directory; choose another {arg('out')}")
        if self.home.is_dir() and any(True for _ in self.home.iterdir()) and not (
                (self.home / BUILDS).is_dir() or (self.home / LATEST).exists() or self.path.exists()):
            raise StoreError(f"{self.home} exists and is not a tracin-index index; choose another {arg('out')}")

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
