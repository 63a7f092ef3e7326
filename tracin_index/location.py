"""Where an index lives: a local directory (:class:`pathlib.Path`) or an ``s3://bucket/prefix`` URL.

Local paths stay plain ``Path`` objects, so everything local uses the filesystem directly (flock, fsync
and rename). A URL becomes an :class:`ObjectPath`: the few ``Path`` operations the store and the builder
use (``/``, ``name``, ``exists``, ``read_text``, ``iterdir``...), done on the bucket with s3fs. Zarr
opens a build at a URL through fsspec as well (``zarr.storage.FsspecStore``).

Credentials and the endpoint come from the standard places botocore and fsspec read:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``, ``~/.aws``, an instance role),
``AWS_ENDPOINT_URL`` or ``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, moto).

Object stores have no directories: ``mkdir`` does nothing, a "directory" exists while an object
under it exists, and ``write_text`` is one PUT, which readers see entirely or not at all.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError, StoreError

__all__ = ["ObjectPath", "StorePath", "Where", "disk_usage", "is_remote", "location", "remote_error", "zarr_options"]

PROTOCOLS = ("s3", "s3a")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
_COLLAPSED = re.compile(r"^(s3a?):/([^/].*)$")  # Path("s3://b/p") is "s3:/b/p"
# Listings are never cached: other processes (shards, a second builder) write the same prefix.
STORAGE_OPTIONS: dict[str, Any] = {"use_listings_cache": False}


class ObjectPath:
    """An object-store location (``s3://bucket/key/prefix``) with the ``Path`` operations an index needs."""

    def __init__(self, url: str, *, _kind: str | None = None) -> None:
        m = _URL.match(url)
        if m is None:
            raise InputError(f"{url} is not a URL; give s3://BUCKET/PREFIX")
        self.protocol = "s3" if m.group(1) in PROTOCOLS else m.group(1)  # another one is refused on first use
        self.key = m.group(2).strip("/")  # "bucket/prefix/..."
        self._kind = _kind  # "file" / "directory" when a listing told us, else unknown

    # ------------------------------------------------------------------ naming

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.key == self.key

    def __hash__(self) -> int:
        return hash(("ObjectPath", self.key))

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.protocol}://{self.key}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return ObjectPath(f"{self.protocol}://{head}")

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    def resolve(self) -> ObjectPath:
        return self

    @property
    def fs(self) -> Any:
        """The (cached) s3fs filesystem; synchronous."""
        import fsspec

        if self.protocol != "s3":
            raise InputError(f"{self}: {self.protocol}:// is not supported; give a local directory or an "
                             "s3://bucket/prefix URL")
        if not self.key:
            raise InputError(f"{self} names no bucket; give s3://BUCKET/PREFIX")

        try:
            return fsspec.filesystem(self.protocol, **STORAGE_OPTIONS)
        except ImportError:
            raise InputError(f"{self} needs s3fs: pip install 'tracin-index[s3]'") from None

    # ------------------------------------------------------------------ queries

    def exists(self) -> bool:
        with self.errors():
            return bool(self.fs.exists(self.key))

    def is_dir(self) -> bool:
        if self._kind is not None:
            return self._kind == "directory"
        with self.errors():
            return bool(self.fs.isdir(self.key))

    def is_file(self) -> bool:
        if self._kind is not None:
            return self._kind == "file"
        with self.errors():
            return bool(self.fs.isfile(self.key))

    def iterdir(self) -> Iterator[ObjectPath]:
        with self.errors():
            try:
                entries = self.fs.ls(self.key, detail=True)
            except FileNotFoundError:
                entries = []
        for e in entries:
            name = str(e["name"]).rstrip("/")
            if name != self.key:
                yield ObjectPath(f"{self.protocol}://{name}", _kind="directory" if e["type"] == "directory" else "file")

    def read_bytes(self) -> bytes:
        with self.errors():
            return bytes(self.fs.cat_file(self.key))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    # ------------------------------------------------------------------ changes

    def write_text(self, text: str) -> None:
        """One PUT: readers see the old object or the new one, never a part."""
        with self.errors():
            self.fs.pipe_file(self.key, text.encode())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: nothing to do."""

    def unlink(self, missing_ok: bool = False) -> None:
        with self.errors():
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def rmtree(self) -> None:
        with self.errors(), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.key, recursive=True)

    # ------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn the object store's failures (no bucket, no credentials, no endpoint) into one-line StoreErrors."""
        try:
            yield
        except (StoreError, InputError):
            raise
        except Exception as exc:
            message = remote_error(exc, self)
            if message is None:
                raise
            raise StoreError(message) from None

    def endpoint(self) -> str:
        """The endpoint the requests go to, for messages."""
        with contextlib.suppress(Exception):
            client = getattr(self.fs, "_s3", None)
            if client is not None:
                return str(client.meta.endpoint_url)
        for var in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(var):
                return os.environ[var]
        return "AWS S3"


StorePath = Path | ObjectPath
Where = str | os.PathLike[str] | ObjectPath


def location(where: Where) -> StorePath:
    """``where`` as a ``Path`` (local) or an :class:`ObjectPath` (``s3://`` URL)."""
    if isinstance(where, ObjectPath):
        return where
    text = os.fspath(where)
    if m := _COLLAPSED.match(text):  # an s3:// URL that went through Path() on the way
        text = f"{m.group(1)}://{m.group(2)}"
    elif isinstance(where, Path):
        return where
    m = _URL.match(text)
    if m is None:
        return Path(text)
    if m.group(1) == "file":
        return Path(m.group(2))
    return ObjectPath(text)  # a protocol other than s3:// is refused (one line) when it is first used


def is_remote(where: Any) -> bool:
    return isinstance(where, ObjectPath)


def zarr_options(where: StorePath) -> dict[str, Any]:
    """Keyword arguments for ``zarr.open_group(str(where), ...)``: fsspec's storage options for a URL."""
    return {"storage_options": dict(STORAGE_OPTIONS)} if isinstance(where, ObjectPath) else {}


def disk_usage(where: StorePath) -> int:
    """Bytes stored under ``where``."""
    if isinstance(where, ObjectPath):
        with where.errors():
            return int(where.fs.du(where.key))
    return sum(f.stat().st_size for f in where.rglob("*") if f.is_file())


def remote_error(exc: BaseException, where: ObjectPath | None = None) -> str | None:
    """A one-line message (problem and fix) for an object store's failure, or None when ``exc`` is something else."""
    kind = type(exc).__name__
    module = type(exc).__module__ or ""
    url = str(where) if where is not None else "the object store"
    endpoint = where.endpoint() if where is not None else os.environ.get("AWS_ENDPOINT_URL", "AWS S3")
    text = str(exc)
    if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return (f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                "in the environment")
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError") or (
            module.startswith(("aiohttp", "botocore")) and "connect" in text.lower()):
        return (f"cannot reach the object store at {endpoint} for {url} ({text}); check AWS_ENDPOINT_URL "
                "(or FSSPEC_S3_ENDPOINT_URL) and that the server is up")
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        bucket = where.bucket if where is not None else "?"
        return f"bucket {bucket!r} does not exist at {endpoint}; create it first or check the URL {url}"
    if isinstance(exc, PermissionError) or kind in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"access to {url} at {endpoint} was denied ({text}); check the credentials and the bucket's policy"
    if module.startswith(("botocore", "aiobotocore", "s3fs")):
        return f"the object store at {endpoint} failed for {url}: {text}"
    return None
