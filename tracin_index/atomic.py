"""Files written completely or not at all: readers see the old file or the new one, never a part."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .location import ObjectPath, StorePath

__all__ = ["replacing", "write_text"]


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to. When the block ends normally the file is flushed to
    disk and renamed onto ``path`` (and the rename itself flushed); when it raises, the file is removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: StorePath, text: str) -> None:
    """``path``'s new contents, atomically (an object in a bucket: one PUT)."""
    if isinstance(path, ObjectPath):
        path.write_text(text)
        return
    with replacing(path) as tmp:
        tmp.write_text(text)
