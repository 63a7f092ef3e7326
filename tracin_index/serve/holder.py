"""The build a service answers from, and the swap to the next one when the index's ``LATEST`` moves.

A request takes the current :class:`Served` once, at its start, and uses only it, so its answer comes whole
from one build and names it. A background thread reads ``LATEST`` every ``poll`` seconds; a newly published
build is opened, its background work finished and one query run on it while the old build goes on answering,
and then it replaces the old one in one assignment. The old build retires when its last request is done. A
build that fails to open is logged and tried again ``retry`` seconds later; the old one keeps answering.
"""

from __future__ import annotations

import bisect
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, TypeVar

from ..location import StorePath, Where, location
from ..store import latest_build, resolve

if TYPE_CHECKING:
    from ..query import TracinIndex
    from ..rankings import Results

__all__ = ["Current", "Served", "Turnstile", "is_build", "settle", "summary", "warm_up"]

LOG = logging.getLogger("tracin_index.serve")

Opener = Callable[[StorePath], "TracinIndex"]
T = TypeVar("T")


def is_build(where: StorePath) -> bool:
    """Whether ``where`` is one build directory (served as it is) rather than an index home with ``LATEST``."""
    return bool((where / "zarr.json").exists())


def summary(index: TracinIndex) -> dict[str, Any]:
    """What ``/api/info`` tells about an opened build: its size and the settings it was built with."""
    attrs = index.info()
    return {
        "num_rows": index.num_rows,
        "num_train": attrs.get("num_train", index.num_rows),
        "num_entities": len(index.labels.entity_labels),
        "num_relations": len(index.labels.relation_labels),
        "model_class": attrs["model_class"],
        "inverse_triples": attrs.get("inverse_triples"),
        "loss": attrs["loss"],
        "projection": {key: attrs["projection"][key] for key in ("kind", "dim", "seed")},
        "layers": attrs["layers"],
        "tracked": [p["name"] for p in attrs["tracked"]],
        # file names only: the service does not show its filesystem
        "checkpoints": [{"name": PurePath(str(c["name"])).name, "lr": c["lr"]} for c in attrs["checkpoints"]],
        "sample_rate": attrs.get("sample", {}).get("rate", 1.0),
        "device": str(index.tracer.device),
    }


def settle(index: TracinIndex) -> None:
    """Wait for the search's background work (the int8 pack of the rows): searches work before it is done,
    they are only faster after."""
    wait = getattr(index.searcher, "wait", None)
    if callable(wait):
        wait()


def warm_up(index: TracinIndex) -> None:
    """Finish the search's background work and answer one query, so the first request after a swap pays
    neither; raises what the query raises (a build that cannot answer is not swapped in)."""
    settle(index)
    if index.num_rows:
        index.query(index.triples[:1], k=1)


class Turnstile:
    """A semaphore of ``capacity`` that hands its places out first come, first served.

    A waiter is woken by the release that hands it a place, so a late arrival never overtakes it (with a plain
    ``threading.Lock``, a few unlucky requests can wait many turns while others pass).
    """

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._mutex = threading.Lock()
        self._taken = 0
        self._waiting: deque[threading.Event] = deque()

    def acquire(self, timeout: float | None = None) -> bool:
        """Take a place, waiting up to ``timeout`` seconds (None: as long as it takes); False when none came."""
        with self._mutex:
            if self._taken < self.capacity and not self._waiting:
                self._taken += 1
                return True
            turn = threading.Event()
            self._waiting.append(turn)
        if turn.wait(timeout):
            return True
        with self._mutex:
            if turn.is_set():  # handed a place while giving up: keep it
                return True
            self._waiting.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if self._waiting:
                self._waiting.popleft().set()  # the place passes straight to the first waiter
            else:
                self._taken -= 1


class Served:
    """One opened build: its name, the index, the one thread its torch work runs on, and its summary."""

    def __init__(self, build: str, index: TracinIndex) -> None:
        self.build = build
        self.index = index
        # The index's model and tracer are not safe for concurrent calls, and torch keeps a pool of threads for each
        # thread that calls it: every call on this build runs on one thread of its own, in the order they came. The
        # thread ends when the executor is collected, after the last reference to this build is gone.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracin-index-torch")
        self.summary = summary(index)
        self.ready = threading.Event()  # set once the search's background work is done
        self._lock = threading.Lock()
        self._queued: dict[str, list[tuple[list[str], dict[str, Any], Future[Results]]]] = {}  # by their options
        self._sorted: dict[str, tuple[list[str], list[str]]] = {}

    def submit(self, fn: Callable[[TracinIndex], T]) -> Future[T]:
        """``fn(index)`` on the build's thread, after the calls already queued there."""
        return self.worker.submit(fn, self.index)

    def query(self, triples: list[str], **options: Any) -> Future[Results]:
        """``index.query(triples, **options)`` on the build's thread, answered in one engine batch with the other
        queries queued there with the same options: one pass for their test gradients, one search and one re-rank.
        Values agree with the query asked alone to float32 rounding. A request whose triples do not parse gets its
        own error; a question (``h r ?``) is answered alone."""
        future: Future[Results] = Future()
        with self._lock:
            self._queued.setdefault(repr(sorted(options.items())), []).append((triples, options, future))
        self.worker.submit(self._answer_queued)
        return future

    def _answer_queued(self) -> None:
        from ..rankings import Results
        from ..triples import QUESTION

        with self._lock:
            queued, self._queued = self._queued, {}
        for group in queued.values():
            parsed: list[tuple[Any, Future[Results]]] = []
            for triples, options, future in group:
                if not future.set_running_or_notify_cancel():
                    continue  # its request gave up waiting
                try:
                    ids = self.index.parse(triples, questions=True)
                    if bool(((ids[:, 0] == QUESTION) | (ids[:, 2] == QUESTION)).any()):
                        future.set_result(self.index.query(triples, **options))
                    else:
                        parsed.append((ids, future))
                except Exception as exc:
                    future.set_exception(exc)
            if not parsed:
                continue
            try:
                import torch

                results = self.index.query(torch.cat([ids for ids, _ in parsed]), **group[0][1])
            except Exception as exc:  # the options are the same for all, and so is what they raise
                for _, future in parsed:
                    future.set_exception(exc)
                continue
            start = 0
            for ids, future in parsed:
                future.set_result(Results(results[start : start + len(ids)]))
                start += len(ids)

    def retire(self) -> None:
        """Stop the search's background work (searches keep working). Requests that took this build before it
        retired still run on its thread; the thread ends once the last of them lets the build go."""
        close = getattr(self.index.searcher, "close", None)
        if callable(close):
            close()

    def labels(self, kind: str) -> list[str]:
        return self.index.labels.entity_labels if kind == "entity" else self.index.labels.relation_labels

    def complete(self, kind: str, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` labels of ``kind`` (``entity`` or ``relation``) starting with ``prefix`` (case aside),
        in alphabetical order, then those that contain it elsewhere."""
        if kind not in self._sorted:  # computed on first use; two requests computing it at once get equal lists
            pairs = sorted((label.lower(), label) for label in self.labels(kind))
            self._sorted[kind] = ([p[0] for p in pairs], [p[1] for p in pairs])
        keys, labels = self._sorted[kind]
        p = prefix.lower()
        out: list[str] = []
        i = bisect.bisect_left(keys, p)
        while i < len(keys) and keys[i].startswith(p) and len(out) < limit:
            out.append(labels[i])
            i += 1
        if p and len(out) < limit:
            for key, label in zip(keys, labels, strict=True):
                if p in key and not key.startswith(p):
                    out.append(label)
                    if len(out) == limit:
                        break
        return out


class Current:
    """The build a service answers from: the published build of ``where`` (an index home), followed as
    ``LATEST`` moves, or the one build ``where`` names, served as it is.

    ``opener(build_path)`` opens one build (``open_index`` with the service's options). The first build is
    opened here, so a missing or mismatched index fails at once; :meth:`start` begins following ``LATEST``.
    """

    def __init__(self, where: Where, opener: Opener, *, poll: float = 5.0, retry: float = 60.0,
                 log: logging.Logger = LOG) -> None:
        self.location = location(where)
        self.home: StorePath | None = None if is_build(self.location) else self.location
        self.poll = poll
        self.retry = retry
        self.log = log
        self._opener = opener
        self._failed: dict[str, float] = {}
        self._refreshing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        build = resolve(self.location)
        self._served = Served(build.name, opener(build))
        log.info("answering from build %s of %s (%d rows)", build.name, self.location, self._served.index.num_rows)
        # the first build answers at once; its search gets faster when its background work is done
        threading.Thread(target=self._settle, args=(self._served,), name="tracin-index-settle", daemon=True).start()
        self._served.submit(self._first_query)  # starts torch's threads on the build's thread before a request does

    @property
    def following(self) -> bool:
        """Whether the service follows ``LATEST`` (an index home, and a positive ``poll``)."""
        return self.home is not None and self.poll > 0

    def get(self) -> Served:
        """The build to answer the next request from (a request takes it once and keeps it)."""
        return self._served

    def refresh(self) -> bool:
        """Read ``LATEST`` once; open, warm up and swap in a newly published build. True when it swapped."""
        if self.home is None:
            return False
        with self._refreshing:
            build = latest_build(self.home)
            current = self._served
            if build is None or build.name == current.build:
                return False
            failed = self._failed.get(build.name)
            if failed is not None and time.monotonic() - failed < self.retry:
                return False
            self.log.info("build %s published; opening it while build %s answers", build.name, current.build)
            started = time.monotonic()
            served: Served | None = None
            try:
                served = Served(build.name, self._opener(build))
                served.submit(warm_up).result()
                served.ready.set()
            except Exception as exc:
                if served is not None:
                    served.retire()
                self._failed[build.name] = time.monotonic()
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.log.error("build %s could not be opened (%s); build %s goes on answering; next try in %.0f s",
                               build.name, message, current.build, self.retry)
                return False
            self._served = served
            self._failed.pop(build.name, None)
            self.swaps += 1
            self.log.info("answering from build %s (opened in %.1f s); build %s retires when its requests finish",
                          build.name, time.monotonic() - started, current.build)
        current.retire()  # requests already queued on it still get their answers from it
        del current
        gc.collect()
        return True

    def start(self) -> None:
        """Follow ``LATEST`` in a background thread (nothing to do for a single build, or ``poll`` 0)."""
        if not self.following or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="tracin-index-follow", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop following (waits up to ``timeout`` seconds for a build being opened)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop following and the current build's background work (the service has stopped answering)."""
        self.stop()
        self._served.retire()

    def _first_query(self, index: TracinIndex) -> None:
        try:
            if index.num_rows:
                index.query(index.triples[:1], k=1)
        except Exception as exc:  # the requests will say what is wrong
            self.log.warning("a first query on the build failed: %s", exc)

    def _settle(self, served: Served) -> None:
        try:
            settle(served.index)
        except Exception:
            self.log.exception("the search of build %s could not finish its background work", served.build)
        served.ready.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.refresh()
            except Exception:  # reading LATEST failed (a disk, a bucket): the service goes on, and tries again
                self.log.exception("reading %s/LATEST failed", self.home)
