"""Which builds of an index to keep: the published one, the newest complete ones, the prepared one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import InputError, TracinError, arg
from .location import StorePath
from .locks import BuildLock
from .shards import PREPARED
from .store import BUILDS, Store, builds, latest_build, remove_build

__all__ = ["Collected", "collect_builds"]


@dataclass(frozen=True)
class Collected:
    """What :func:`collect_builds` removed (or, in a dry run, would remove) and kept."""

    removed: list[StorePath]
    kept: int
    published: str | None
    dry_run: bool


def collect_builds(index: StorePath, keep: int = 3, *, incomplete: bool = False, dry_run: bool = False,
                   log: Callable[[str], None] | None = None) -> Collected:
    """Remove the builds of ``index`` other than the published one and the newest ``keep`` complete ones.

    Unfinished builds stay (a build resumes from them) unless ``incomplete``; the prepared build of a
    distributed run always stays, since its shards may be writing. Runs under the index's build lock, so
    never while a builder writes. ``log`` hears each build as it goes.
    """
    if keep < 1:
        raise InputError(f"{arg('keep', keep)} must be at least 1")
    if not (index / BUILDS).is_dir():
        raise InputError(f"{index} is not a tracin-index index (no {BUILDS}/); check the path")
    with BuildLock(index):
        current = latest_build(index)
        complete: list[StorePath] = []
        unfinished: list[StorePath] = []
        for b in builds(index):
            try:
                status = Store.open(b, complete=False).attrs.get("status")
            except TracinError:
                status = None
            (complete if status == "complete" else unfinished).append(b)
        marker = index / PREPARED
        prepared = marker.read_text().strip() if marker.exists() else None
        doomed = [b for b in complete[:-keep] if b != current] + (
            [b for b in unfinished if b.name != prepared] if incomplete else [])
        for b in doomed:
            if log is not None:
                log(f"{'would remove' if dry_run else 'removing'} {b}")
            if not dry_run:
                remove_build(b)
    return Collected(removed=doomed, kept=len(complete) + len(unfinished) - len(doomed),
                     published=current.name if current else None, dry_run=dry_run)
