"""Candidate search over shards of the rows held by Ray actors (``search="ray"``), for indexes beyond one machine.

The rows ``0..N`` are cut into ``shards`` contiguous ranges. Each :class:`ShardWorker` actor reads its range from
the build (a path every node reaches: a shared file system or ``s3://``) and holds only its shard's codes: with
a FAISS index in the build (``build --faiss``) the trained, empty index with the shard's rows added, which lists
every row in the same inverted list and with the same code as the whole index does; without one, an exact
``IndexFlatIP`` of the shard's float32 rows. A query goes to every shard; each answers its top candidates of
both ends (``<q, x>`` and ``<-q, x>``) with global row ids, and :class:`ShardedSearcher` merges them by score.
Candidates are then re-ranked exactly in the querying process, as with every search, so the answers equal a
single-node search over the same rows.

``shards`` defaults to one per CPU slot of the cluster. A shard whose actor dies is restarted by Ray (its rows
read again) and its call retried, ``retries`` times; then the query fails with the shard named, never answered
without it. Weighted (cosine) and masked searches are answered by ``fallback`` in the querying process (an exact
scan streamed from the store).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np

from .ann import APPROXIMATE_CANDIDATES
from .errors import InputError, StoreError, arg
from .runtime import faiss_module
from .search import Searcher, both_ends
from .store import Store

__all__ = ["ShardWorker", "ShardedSearcher", "merge_ends", "shard_ranges"]


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal row ranges covering ``0..n``."""
    edges = np.linspace(0, n, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


class ShardWorker:
    """One shard's codes (rows ``lo..hi`` of the build at ``path``), searched for both ends; a Ray actor's body."""

    def __init__(self, path: str, lo: int, hi: int, nprobe: int | None = None, threads: int = 1) -> None:
        from .ann import load_faiss, set_search_parameter

        faiss = faiss_module()
        faiss.omp_set_num_threads(threads)
        store = Store.open(path)
        width = int(store.attrs["width"])
        self.lo, self.hi = lo, hi
        self.index = load_faiss(store, trained=True) if store.attrs.get("faiss") else faiss.IndexFlatIP(width)
        for _, block in store.iter_rows(rows=(lo, hi)):
            self.index.add(block)
        self.nprobe = set_search_parameter(self.index, nprobe)

    def search(self, q: np.ndarray, n_top: int, n_bottom: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Top ``n_top`` of ``<q, x>`` and ``n_bottom`` of ``<-q, x>`` over this shard: scores, global ids (-1: none)."""
        top_s, top_i, bottom_s, bottom_i = both_ends(self.index, q, n_top, n_bottom)
        return top_s, np.where(top_i >= 0, top_i + self.lo, -1), bottom_s, np.where(bottom_i >= 0, bottom_i + self.lo, -1)

    def ready(self) -> tuple[int, int]:
        return self.lo, self.hi


def merge_ends(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], n_top: int, n_bottom: int,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shards' answers as one: the ``n_top`` largest and ``n_bottom`` smallest scores, missing places last."""

    def pick(scores: np.ndarray, ids: np.ndarray, n: int, sign: float) -> tuple[np.ndarray, np.ndarray]:
        key = np.where(ids >= 0, sign * scores, np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :n]
        got_s, got_i = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        if got_i.shape[1] < n:  # fewer rows than asked: pad as FAISS does
            pad = n - got_i.shape[1]
            got_s = np.pad(got_s, ((0, 0), (0, pad)))
            got_i = np.pad(got_i, ((0, 0), (0, pad)), constant_values=-1)
        return got_s, got_i

    ts, ti = pick(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), n_top, -1.0)
    bs, bi = pick(np.concatenate([p[2] for p in parts], 1), np.concatenate([p[3] for p in parts], 1), n_bottom, 1.0)
    return ts, ti, bs, bi


class ShardedSearcher(Searcher):
    """Search fanned out to ``shards`` Ray actors (see the module docstring) and merged."""

    backend = "ray"

    def __init__(self, store: Store, shards: int | None, fallback: Searcher, *, nprobe: int | None = None,
                 cpus_per_shard: float = 1, retries: int = 2, address: str | None = None,
                 load_timeout: float = 1800) -> None:
        if shards is not None and not 1 <= shards <= store.num_rows:
            raise InputError(f"{arg('shards', shards)} must be between 1 and the index's {store.num_rows:,} rows")
        try:
            import ray
        except ImportError:
            raise InputError(f"{arg('search', 'ray')} needs Ray: pip install 'tracin-index[ray]'") from None
        if not ray.is_initialized():  # RAY_ADDRESS names a cluster; without it, a local one is started
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        if shards is None:  # one per cluster CPU slot
            shards = max(1, min(store.num_rows, int(ray.cluster_resources().get("CPU", 1) // cpus_per_shard)))
        self.ray: Any = ray
        if store.attrs.get("faiss"):
            self.candidate_factor = APPROXIMATE_CANDIDATES
        self.fallback = fallback
        self.width = int(store.attrs["width"])
        self.ranges = shard_ranges(store.num_rows, shards)
        threads = max(1, int(cpus_per_shard))
        actor: Any = ray.remote(ShardWorker).options(num_cpus=cpus_per_shard, max_restarts=retries,
                                                max_task_retries=retries)
        self.actors: list[Any] = [actor.remote(str(store.path), lo, hi, nprobe, threads) for lo, hi in self.ranges]
        # every shard loaded, or the shard that failed (or found no free CPU slot in time) named
        self._gather([a.ready.remote() for a in self.actors], load_timeout,
                     f"was not loaded within {load_timeout:g} s: the cluster needs {cpus_per_shard:g} free CPU slot(s) "
                     "per shard (fewer shards, or more nodes)")

    def _gather(self, refs: list[Any], timeout: float | None = None, late: str = "") -> list[Any]:
        out = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, ref in enumerate(refs):
            lo, hi = self.ranges[i]
            try:
                out.append(self.ray.get(ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic())))
            except self.ray.exceptions.GetTimeoutError:
                self.shutdown()
                raise StoreError(f"search shard {i} (rows {lo}-{hi - 1}) {late}") from None
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StoreError(f"search shard {i} (rows {lo}-{hi - 1}) failed after its retries ({first}); "
                                 "check the Ray cluster and open the index again") from None
        return out

    def search(self, q: np.ndarray, n_top: int, n_bottom: int, *, row_scale: np.ndarray | None = None,
               mask: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if row_scale is not None or mask is not None:
            return self.fallback.search(q, n_top, n_bottom, row_scale=row_scale, mask=mask)
        ref = self.ray.put(np.ascontiguousarray(q, dtype=np.float32))
        parts = self._gather([a.search.remote(ref, n_top, n_bottom) for a in self.actors])
        return merge_ends(parts, n_top, n_bottom)

    def shutdown(self) -> None:
        """Stop the shard actors now (they also stop once this searcher is garbage: Ray ends an actor whose
        handles are all gone)."""
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
