"""Distributed index builds on Ray: long-lived shard workers fed from a queue.

The shard is the unit (:func:`tracin_index.build.build_shard`): a worker computes a contiguous block
of write units of the prepared build and writes only their chunks and done flags. This module adds
the scheduling on top:

1. the first worker prepares the build (creates the store and its attributes, once), so the driver
   needs neither the model's device nor a GPU;
2. one actor per GPU (or CPU worker) sets the model, checkpoints and projection up once, then takes
   shards from the queue until it is empty;
3. a shard whose actor dies (node lost, OOM kill, preemption) goes back to the queue and a fresh
   actor takes the dead one's place; a shard's finished units are kept, so the retry only computes
   the rest, and the store ends byte-identical to a one-process build;
4. the driver finalizes: checks every done flag, verifies, publishes.

The index must be shared by the driver and every worker (NFS, Lustre, or an s3:// URL).
Ray is optional: ``pip install 'tracin-index[ray]'``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .build import BuildConfig, make_plan
from .errors import InputError, TracinError, arg
from .location import Where, location
from .model import ModelBundle
from .shards import finalize_build, prepare_build, shard_units, shard_with_plan
from .store import Store

__all__ = ["ShardWorker", "ray_build"]


class ShardWorker:
    """One Ray actor: the model, checkpoints and projection set up once, then any number of shards."""

    def __init__(self, bundle: ModelBundle, out: str, checkpoints: list[tuple[str, float]], config: BuildConfig,
                 threads: int, die_after_units: int | None = None) -> None:
        from .runtime import configure_threads

        configure_threads(threads, tune_allocator=True)
        self.bundle, self.out, self.checkpoints, self.config = bundle, location(out), checkpoints, config
        self.plan: Any = None
        self.die_after_units = die_after_units  # fault injection for the tests: exit hard mid-shard

    def prepare(self, force: bool) -> dict[str, Any]:
        store = prepare_build(self.bundle, self.out, checkpoints=self.checkpoints, config=self.config, force=force)
        return {"report": store.build_report, "num_units": int(store.attrs.get("num_units", 0)),
                "name": store.path.name}

    def run(self, shard: int, shards: int) -> dict[str, Any]:
        if self.plan is None:
            self.plan = make_plan(self.bundle, self.checkpoints, self.config)
        seen = {"units": 0}

        def progress(_done: int, _total: int) -> None:
            seen["units"] += 1
            if self.die_after_units is not None and seen["units"] > self.die_after_units:
                os._exit(1)  # as a node loss would: no cleanup, a write may be in flight

        return {"shard": shard, "pid": os.getpid(),
                **shard_with_plan(self.plan, self.out, (shard, shards), self.config, progress)}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(f"{arg('executor', 'ray')} needs Ray: pip install 'tracin-index[ray]'") from None
    return ray


def ray_build(
    bundle: ModelBundle,
    out: Where,
    *,
    checkpoints: list[tuple[str, float]] | None = None,
    config: BuildConfig | None = None,
    force: bool = False,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0,
    cpus_per_worker: int = 1,
    shards: int | None = None,
    max_attempts: int = 3,
    log: Callable[[str], None] | None = None,
    _die_after_units: int | None = None,
) -> Store:
    """Build ``bundle``'s index at ``out`` (shared by every worker) on a Ray cluster; returns the published store.

    ``address``: the cluster (``None``: the one this process is connected to, else a new local one).
    ``workers``: actors (default: the cluster's GPUs / ``gpus_per_worker``, or its CPUs /
    ``cpus_per_worker``). ``shards``: queue length (default 4 per worker, at most one per write unit).
    A shard is tried on up to ``max_attempts`` actors. ``_die_after_units`` makes the first actors
    exit hard after that many units (the tests' worker kill); their replacements run normally.
    """
    ray = _import_ray()
    config = config or BuildConfig()
    config.check()
    say = log or (lambda _msg: None)
    checkpoints = checkpoints or []
    if gpus_per_worker < 0 or cpus_per_worker < 1:
        raise InputError(f"{arg('gpus_per_worker')} must be >= 0 and cpus per worker >= 1")
    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started_here = address is None
    try:
        resources = ray.cluster_resources()
        if workers is None:
            if gpus_per_worker > 0:
                workers = int(resources.get("GPU", 0) // gpus_per_worker)
            else:
                workers = int(resources.get("CPU", 1) // cpus_per_worker)
        if workers < 1:
            raise InputError(f"the Ray cluster has {resources.get('GPU', 0):g} GPUs and {resources.get('CPU', 0):g} CPUs: "
                             f"too few for one worker; lower {arg('gpus_per_worker')} or add nodes")
        actor_cls = ray.remote(ShardWorker).options(num_gpus=gpus_per_worker, num_cpus=cpus_per_worker, max_restarts=0)
        bundle_ref = ray.put(bundle)
        where = location(out)
        out_s = str(where.resolve())

        def new_actor(fault: bool) -> Any:
            return actor_cls.remote(bundle_ref, out_s, checkpoints, config, cpus_per_worker,
                                    _die_after_units if fault else None)

        actors = [new_actor(True) for _ in range(workers)]
        first = ray.get(actors[0].prepare.remote(force))
        if first["report"] and first["report"].get("skipped"):
            say(f"{out} is up to date; nothing to do (--force rebuilds)")
            return Store.open(out)
        num_units = first["num_units"]
        n = max(1, min(shards or 4 * workers, num_units))
        say(f"build {first['name']}: {num_units} write units in {n} shards on {workers} Ray workers")
        queue: deque[int] = deque(range(n))
        attempts = dict.fromkeys(range(n), 0)
        idle = list(actors)
        running: dict[Any, tuple[Any, int]] = {}
        finished, started = 0, time.perf_counter()
        while queue or running:
            while queue and idle:
                actor, shard = idle.pop(), queue.popleft()
                attempts[shard] += 1
                running[actor.run.remote(shard, n)] = (actor, shard)
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, shard = running.pop(ref)
            try:
                report = ray.get(ref)
            except ray.exceptions.RayActorError:
                if attempts[shard] >= max_attempts:
                    raise TracinError(f"shard {shard}/{n} lost its worker {attempts[shard]} times; check the cluster "
                                      f"(memory, preemption), then run the same command again (it resumes)") from None
                say(f"shard {shard}/{n}: its worker died; requeued on a fresh worker (attempt {attempts[shard] + 1})")
                queue.appendleft(shard)
                idle.append(new_actor(False))
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                if isinstance(cause, TracinError) or attempts[shard] >= max_attempts:
                    raise cause from None
                say(f"shard {shard}/{n} failed ({cause}); requeued (attempt {attempts[shard] + 1})")
                queue.appendleft(shard)
                idle.append(actor)
                continue
            finished += 1
            idle.append(actor)
            units = len(shard_units(num_units, shard, n))
            say(f"shard {shard}/{n} done: {report['units_computed']} of {units} units computed "
                f"({finished}/{n} shards, {time.perf_counter() - started:.1f} s)")
        for actor in idle:  # every live actor is idle once the queue is empty; dead ones are gone
            ray.kill(actor)
        return finalize_build(out, log=say)
    finally:
        if started_here:
            ray.shutdown()
