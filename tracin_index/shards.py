"""Stage 6, distributed: one build computed by independent shards (processes, hosts, Ray actors).

The coordinator prepares the build once (:func:`prepare_build`: creates it and names it in ``IDX/PREPARED``),
any number of shards compute their write units (:func:`build_shard`: lock-free, idempotent, each touching
only its own units), and the coordinator finalises it (:func:`finalize_build`: every unit done, verified,
published). The steps share :mod:`tracin_index.build`'s plan, unit writer and checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .atomic import write_text
from .build import BuildConfig, _check_out, _create_or_resume, _finish, _guard, _Plan, _up_to_date, _write_units, make_plan
from .errors import InputError, StoreError, arg
from .location import StorePath, Where, location
from .locks import BuildLock
from .model import ModelBundle
from .store import BUILDS, Store, latest_build

__all__ = ["PREPARED", "build_shard", "finalize_build", "parse_shard", "prepare_build", "shard_units", "shard_with_plan"]

PREPARED = "PREPARED"


def shard_units(num_units: int, shard: int, shards: int) -> list[int]:
    """Write units of shard ``shard`` of ``shards``: a contiguous block, sizes differing by at most one."""
    return list(range(num_units * shard // shards, num_units * (shard + 1) // shards))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"{arg('shard', text)} is not i/n (e.g. 0/8 for the first of 8 shards)") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"{arg('shard', text)}: need 0 <= i < n (shards are numbered from 0, as SLURM_ARRAY_TASK_ID)")
    return i, n


def prepare_build(
    bundle: ModelBundle,
    out: Where,
    *,
    checkpoints: list[tuple[str, float]] | None = None,
    config: BuildConfig | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Store:
    """The coordinator's step before any shard runs: create (or find) the build and write its attributes.

    Records the build in ``out/PREPARED``; shards find it there. Computes no rows. Returns the
    building store, or the published one (``build_report["skipped"]``) when it is already up to date.
    """
    config = config or BuildConfig()
    config.check()
    out = location(out)
    say = log or (lambda _msg: None)
    checkpoints = checkpoints or []
    _check_out(out, bundle, checkpoints)
    with BuildLock(out) as held:
        if held.took_over:
            say(f"took over the lock of a build that is no longer running ({held.took_over})")
        plan = make_plan(bundle, checkpoints, config)
        for warning in plan.attrs["warnings"]:
            say(f"warning: {warning}")
        if not force and (published := _up_to_date(out, plan, say)) is not None:
            (out / PREPARED).unlink(missing_ok=True)
            return published
        with _guard(out, out):
            store, _ = _create_or_resume(out, bundle, plan, config, force, say)
        write_text(out / PREPARED, store.path.name + "\n")
        store.build_report = {"skipped": False, "resumed_units": int(store.done().sum()), "computed_units": 0,
                              "build": store.path.name}
        return store


def _prepared(out: StorePath) -> Store | None:
    marker = out / PREPARED
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    try:
        return Store.open(out / BUILDS / name, complete=False)
    except StoreError as exc:
        raise StoreError(f"{out}/{PREPARED} names build {name!r}, which cannot be opened ({exc}); "
                         "run the coordinator's 'tracin-index build ... --prepare' again") from None


def build_shard(
    bundle: ModelBundle,
    out: Where,
    shard: tuple[int, int],
    *,
    checkpoints: list[tuple[str, float]] | None = None,
    config: BuildConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compute shard ``(i, n)``'s missing write units of the prepared build; idempotent, lock-free.

    Needs the same model, checkpoints and settings as ``prepare_build`` (checked by their hash).
    Touches only its own units' chunks and done flags, never the attributes, so any number of shards
    run at once. Returns ``{"units": [...], "units_computed": ..., seconds...}``.
    """
    config = config or BuildConfig()
    config.check()
    return shard_with_plan(make_plan(bundle, checkpoints or [], config), location(out), shard, config, progress, log)


def shard_with_plan(plan: _Plan, out: StorePath, shard: tuple[int, int], config: BuildConfig,
                    progress: Callable[[int, int], None] | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`build_shard` with the model, checkpoints and projection already set up (a long-lived worker)."""
    say = log or (lambda _msg: None)
    i, n = shard
    store = _prepared(out)
    if store is None:
        current = latest_build(out)
        if current is not None and Store.open(current).attrs.get("identity_sha256") == plan.identity_sha:
            say(f"shard {i}/{n}: {out} is already built and published with these settings; nothing to do")
            return {"units": [], "units_computed": 0}
        raise StoreError(f"{out} has no prepared build; run 'tracin-index build ... --prepare' (the coordinator, once) "
                         "before the shards")
    if store.attrs.get("resume_sha256") != plan.resume_sha:
        raise InputError(f"shard {i}/{n} has other inputs or settings than the build prepared at {out} "
                         f"({store.path.name}); run every shard with the coordinator's exact options ({arg('device')} included)")
    units = shard_units(int(store.attrs["num_units"]), i, n)
    done = store.done()
    missing = [u for u in units if not done[u]]
    if not missing:
        say(f"shard {i}/{n}: its {len(units)} write units are done; nothing to do")
        return {"units": units, "units_computed": 0}
    with _guard(store.path, out, remove_on_input_error=False):
        timings = _write_units(store, plan.tracer, plan.triples, config, plan.dtype, progress, units=missing)
    return {"units": units, **timings}


def finalize_build(out: Where, *, log: Callable[[str], None] | None = None) -> Store:
    """The coordinator's last step: check every done flag of the prepared build, verify it, publish it."""
    out = location(out)
    say = log or (lambda _msg: None)
    with BuildLock(out) as held:
        store = _prepared(out)
        if store is None:
            if latest_build(out) is not None:
                say(f"{out} has no prepared build; the published one stays (nothing to finalize)")
                return Store.open(out)
            raise StoreError(f"{out} has no prepared build to finalize; run 'tracin-index build ... --prepare' and the "
                             "shards first")
        done = store.done()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise StoreError(f"build {store.path.name}: {len(missing)} of {len(done)} write units are not done "
                             f"(first: unit {int(missing[0])}); run the missing shards (re-running finished ones is "
                             "harmless), then finalize again")
        with _guard(store.path, out, remove_on_input_error=False):
            _finish(out, store, {"units_computed": len(done)}, held)
        (out / PREPARED).unlink(missing_ok=True)
        published = Store.open(out)
        published.build_report = {"skipped": False, "resumed_units": 0, "computed_units": len(done),
                                  "build": store.path.name}
        return published
