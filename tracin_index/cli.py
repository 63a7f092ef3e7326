"""The ``tracin-index`` command: parses options, calls the Python API, formats the answer."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click
import numpy as np

from .errors import TracinError
from .location import StorePath, location

PATH = click.Path(path_type=Path)


class _IndexLocation(click.ParamType):
    """An index directory or an ``s3://bucket/prefix`` URL (``click.Path`` would collapse ``s3://`` to ``s3:/``)."""

    name = "path|s3://url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> StorePath:
        from .errors import InputError

        try:
            return location(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


INDEX = _IndexLocation()


def _quiet_libraries() -> None:
    import logging
    import warnings

    logging.getLogger("pykeen").setLevel(logging.ERROR)
    logging.getLogger("torch_max_mem").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pykeen")
    warnings.filterwarnings("ignore", category=UserWarning)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report :class:`TracinError` as one line on stderr with exit code 2; ``--debug`` shows the traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False)
        try:
            return fn(*args, **kwargs)
        except TracinError as exc:
            if debug:
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # the environment, not the input: one line, exit 1 (a scheduler may retry)
            if debug:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"Error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was published.", err=True)
            sys.exit(130)
        except Exception as exc:  # the object store's client (botocore, s3fs): also the environment
            from .location import remote_error

            if debug or not type(exc).__module__.startswith(("botocore", "aiobotocore", "s3fs", "aiohttp")):
                raise
            click.echo(f"Error: {remote_error(exc)}", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


def _threads_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--threads", type=int, default=None, help="CPU threads for torch and FAISS (default: all cores).")(fn)


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model-class", default=None, help="pykeen model name when MODEL is a state dict (e.g. ConvE)."),
        click.option("--model-kwargs", default=None, help="JSON keyword arguments for --model-class."),
        click.option("--inverse-triples/--no-inverse-triples", default=None,
                     help="With --model-class: whether the model was trained with inverse triples."),
        click.option("--triples", type=PATH, default=None, help="Training triples as a label TSV (head, relation, tail)."),
        click.option("--entity-to-id", type=PATH, default=None, help="Entity label/id TSV for --triples."),
        click.option("--relation-to-id", type=PATH, default=None, help="Relation label/id TSV for --triples."),
        click.option("--checkpoint", "checkpoint", type=PATH, multiple=True,
                     help="A model state to trace (repeatable, with one --lr each)."),
        click.option("--lr", "lr", type=float, multiple=True, help="Learning rate in force at the matching --checkpoint."),
        click.option("--checkpoints", "checkpoint_dir", type=PATH, default=None,
                     help="A directory of checkpoints (TracinCheckpoint files, pykeen checkpoints): all of them, by epoch."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _load(model: Path, model_class: str | None, model_kwargs: str | None, inverse_triples: bool | None,
          triples: Path | None, entity_to_id: Path | None, relation_to_id: Path | None) -> Any:
    from .errors import InputError
    from .model import load_model

    kwargs = None
    if model_kwargs:
        try:
            kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            raise InputError(f"--model-kwargs is not valid JSON: {exc}") from None
    return load_model(model, model_class=model_class, model_kwargs=kwargs, triples=triples,
                      entity_to_id=entity_to_id, relation_to_id=relation_to_id, inverse_triples=inverse_triples)


def _checkpoints(paths: tuple[Path, ...], lrs: tuple[float, ...], directory: Path | None = None) -> list[tuple[str, float]]:
    from .errors import InputError

    if len(paths) != len(lrs):
        raise InputError(f"give one --lr per --checkpoint ({len(paths)} checkpoints, {len(lrs)} learning rates)")
    specs = [(str(p), lr) for p, lr in zip(paths, lrs, strict=True)]
    if directory is not None:
        from .callbacks import find_checkpoints

        specs += find_checkpoints(directory)
    return specs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracin-index")
def main() -> None:
    """TracIn influence for PyKEEN models: build an index of training gradients, then query it."""
    _quiet_libraries()


@main.command()
@click.option("--model", "model", type=PATH, required=True,
              help="pykeen results directory (save_to_directory), a torch.save model file, or a state dict.")
@_model_options
@click.option("--out", type=INDEX, required=True, help="Directory (or s3://bucket/prefix URL) of the index to create.")
@click.option("--layers", default="last:2", show_default=True, help="last:N (forward order), all, or parameter/layer names.")
@click.option("--loss", default="bce", show_default=True, help="Per-triple loss: bce, ce or score.")
@click.option("--projection", default="sparse", show_default=True, help="sparse (TensorSketch), gaussian or none (exact).")
@click.option("--dim", type=int, default=1024, show_default=True, help="Projected dimension k per checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help="Projection seed.")
@click.option("--batch-size", type=int, default=1024, show_default=True,
              help="Training triples per gradient batch; where rows share the encoder's input (ConvE: the same head "
                   "and relation) a batch grows up to 16x, within the memory of this many unshared triples.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--sample-rate", type=float, default=1.0, show_default=True,
              help="Index only this fraction of the training triples (fast exploration); the store records which.")
@click.option("--stratify", type=click.Choice(["relation", "none"]), default="relation", show_default=True,
              help="relation: sample each relation at --sample-rate (every relation kept); none: uniformly.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--unit-rows", type=int, default=8192, show_default=True,
              help="Rows per write unit (the unit a killed build resumes from).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Stored rows (default float16 for projections, float32 for --projection none).")
@click.option("--cache-activations/--no-cache-activations", default=True, show_default=True,
              help="Store the first tracked Linear's outputs (ConvE: 1,600 bytes per triple) so the exact re-rank "
                   "skips that layer.")
@click.option("--force", is_flag=True, help="Rebuild even when the published build has the same inputs and settings.")
@click.option("--prepare", is_flag=True,
              help="Distributed builds, step 1 (once): create the build and its attributes, compute nothing.")
@click.option("--shard", default=None, metavar="I/N",
              help="Distributed builds, step 2: compute only shard I of N (from 0; idempotent, any number at once).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: prepare, run the shards on a Ray cluster, finalize (pip install 'tracin-index[ray]').")
@click.option("--ray-address", default=None, help="With --executor ray: the cluster to join (default: start a local one).")
@click.option("--workers", type=int, default=None, help="With --executor ray: actors (default: GPUs, else CPUs, of the cluster).")
@click.option("--gpus-per-worker", type=float, default=0, show_default=True, help="With --executor ray: GPUs per actor.")
@click.option("--shards", type=int, default=None, help="With --executor ray: shards in the queue (default: 4 per worker).")
@_threads_option
@_user_errors
def build(model: Path, model_class: str | None, model_kwargs: str | None, inverse_triples: bool | None,
          triples: Path | None, entity_to_id: Path | None, relation_to_id: Path | None,
          checkpoint: tuple[Path, ...], lr: tuple[float, ...], checkpoint_dir: Path | None, out: StorePath, layers: str,
          loss: str, projection: str, dim: int, seed: int, batch_size: int, device: str, sample_rate: float,
          stratify: str, sample_seed: int, unit_rows: int, dtype: str | None, cache_activations: bool, force: bool,
          prepare: bool,
          shard: str | None, executor: str, ray_address: str | None, workers: int | None, gpus_per_worker: float,
          shards: int | None, threads: int | None) -> None:
    """Index the gradients of every training triple of MODEL into the index directory OUT.

    Each build goes to OUT/builds/ and is published (OUT/LATEST) only when complete and verified; a
    killed build resumes when the same command runs again; an unchanged model is not rebuilt.

    Distributed: run `build ... --prepare` once, then `build ... --shard I/N` for I = 0..N-1 (any
    scheduler's array job; same options), then `tracin-index finalize OUT`. `--executor ray` does all
    three on a Ray cluster.
    """
    from .build import BuildConfig
    from .errors import InputError
    from .projection import ProjectionSpec
    from .runtime import configure_threads
    configure_threads(threads, tune_allocator=True)
    started = time.perf_counter()
    config = BuildConfig(layers=layers, loss=loss, projection=ProjectionSpec(projection, dim, seed),
                         batch_size=batch_size, device=device, sample_rate=sample_rate, stratify=stratify,
                         sample_seed=sample_seed, unit_rows=unit_rows, dtype=dtype,
                         cache_activations=cache_activations)
    config.check()
    modes = [name for name, on in (("--prepare", prepare), ("--shard", shard is not None),
                                   ("--executor ray", executor == "ray")) if on]
    if len(modes) > 1:
        raise InputError(f"{' and '.join(modes)} exclude each other; give one")
    if executor != "ray" and (ray_address or workers or gpus_per_worker or shards):
        raise InputError("--ray-address/--workers/--gpus-per-worker/--shards need --executor ray")
    def load() -> Any:
        return _load(model, model_class, model_kwargs, inverse_triples, triples, entity_to_id, relation_to_id)

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    if shard is not None:
        from .shards import build_shard, parse_shard

        i_n = parse_shard(shard)
        with _bar(0, f"shard {shard}") as progress:
            report = build_shard(load(), out, i_n, checkpoints=_checkpoints(checkpoint, lr, checkpoint_dir), config=config,
                                 progress=progress, log=say)
        if report["units_computed"]:
            click.echo(f"shard {shard}: computed {report['units_computed']} of its {len(report['units'])} write units "
                       f"({time.perf_counter() - started:.1f} s); run 'tracin-index finalize {out}' when all shards are done")
        return
    if prepare:
        from .shards import prepare_build

        store = prepare_build(load(), out, checkpoints=_checkpoints(checkpoint, lr, checkpoint_dir), config=config,
                              force=force, log=say)
        if not (store.build_report or {}).get("skipped"):
            click.echo(f"prepared build {store.path.name} in {out}: {store.attrs['num_units']} write units; run the "
                       f"shards (build ... --shard I/N, same options), then 'tracin-index finalize {out}'")
        return
    if executor == "ray":
        from .distributed import ray_build

        store = ray_build(load(), out, checkpoints=_checkpoints(checkpoint, lr, checkpoint_dir), config=config,
                          force=force, address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                          shards=shards, log=say)
        if not (store.build_report or {}).get("skipped"):
            click.echo(f"indexed {store.num_rows:,} rows into {out} on Ray ({time.perf_counter() - started:.1f} s)")
        return
    from .locks import BuildLock

    # Lock before loading anything, so a second builder fails fast. The lock refuses a file or a foreign
    # directory as --out, and removes the directory again if it created it and nothing else came of it.
    with BuildLock(out) as lock:
        _build(load(), out, _checkpoints(checkpoint, lr, checkpoint_dir), config, force, started, lock)


def _build(bundle: Any, out: StorePath, specs: list[tuple[str, float]], config: Any, force: bool, started: float,
           lock: Any = None) -> Any:
    from .build import build_index, sample_rows

    config.check()
    n = len(sample_rows(bundle.triples.mapped, config.sample_rate, config.stratify, config.sample_seed))
    with _bar(n, "indexing") as progress:
        store = build_index(bundle, out, checkpoints=specs, config=config, force=force, progress=progress, lock=lock,
                            log=lambda msg: click.echo(msg, err=True))
    if store.build_report and store.build_report["skipped"]:
        return store
    attrs = store.attrs
    total = attrs["num_train"]
    sampled = "" if n == total else f" (a {config.stratify}-stratified sample of {total:,})"
    click.echo(f"indexed {n:,} training triples{sampled} x {len(attrs['checkpoints'])} checkpoint(s) into {out} "
               f"({attrs['width']} numbers per row, {time.perf_counter() - started:.1f} s)")
    return store


def _format_items(title: str, items: list[Any], exact: bool) -> list[str]:
    lines = [f"  {title}{'' if exact else ' (projected)'}:"]
    if not items:
        lines.append("    (none)")
    width = max((len(f"{i.head}  {i.relation}  {i.tail}") for i in items), default=0)
    for i in items:
        triple = f"{i.head}  {i.relation}  {i.tail}"
        lines.append(f"    {i.rank:>3}  {triple:<{width}}  {i.influence:+.6g}  (#{i.train_index})")
    return lines


def _format_lists(header: str, result: Any) -> str:
    """A header line, then the result's lists (``top`` in abs mode, else proponents and opponents)."""
    lines = [header + ("" if result.mode == "dot" else f"  [{result.mode}]")]
    if result.mode == "abs":
        lines += _format_items("largest |influence|", result.top, result.exact)
    else:
        lines += _format_items("proponents", result.proponents, result.exact)
        lines += _format_items("opponents", result.opponents, result.exact)
    return "\n".join(lines)


def _format_table(result: Any) -> str:
    t = result.test
    return _format_lists(f"test: {t['head']}  {t['relation']}  {t['tail']}", result)


def _format_aggregate(result: Any) -> str:
    return _format_lists(f"influence summed over {result.num_test:,} test triples", result)


def _index_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that re-point an index at its model (paths moved) and assert its settings."""
    options = [
        click.option("--model", "model", type=PATH, default=None, help="Model to use instead of the recorded one (must match)."),
        click.option("--checkpoint", "checkpoint", type=PATH, multiple=True, help="Checkpoints instead of the recorded ones."),
        click.option("--lr", "lr", type=float, multiple=True, help="Learning rate of the matching --checkpoint."),
        click.option("--layers", default=None, help="Refuse unless the index tracks these layers."),
        click.option("--loss", default=None, help="Refuse unless the index used this loss."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda (test gradients and re-rank)."),
        click.option("--search", "search", type=click.Choice(["auto", "torch", "full", "faiss", "stream"]), default="auto",
                     show_default=True, help="Candidate search: stream reads the store block by block (larger than RAM); "
                     "full: every query scans all float32 rows (no int8 prefilter for ad-hoc queries)."),
        click.option("--memory", default=None, metavar="SIZE",
                     help="Memory the search may hold, e.g. 512MB or 4GB (auto streams when the index would not fit)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _ranking_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--top-k", type=int, default=10, show_default=True, help="Training triples listed per end."),
        click.option("--mode", type=click.Choice(MODE_CHOICES), default="dot", show_default=True,
                     help="dot: raw TracIn; cosine: lr-weighted mean of cos(g_c, g'_c) over checkpoints (norms do not dominate); "
                          "abs: largest |influence| in one list (the earlier tool's ranking)."),
        click.option("--relation", "relation", multiple=True,
                     help="Only training triples with this relation (repeatable); applied before the top-K cut."),
        click.option("--neighbourhood", "--neighborhood", "neighbourhood", is_flag=True,
                     help="Only training triples sharing an entity with the test triple; before the top-K cut."),
        click.option("--candidates", type=int, default=None,
                     help="Candidates re-ranked exactly per end (default: 10k and 50k, at least 100 and 500)."),
        click.option("--opponent-candidates", type=int, default=None, help="Candidates for the opponent end only."),
        click.option("--no-rerank", is_flag=True, help="Report projected influences without the exact re-rank."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


MODE_CHOICES = ("dot", "cosine", "abs")


def parse_size(text: str | None) -> int | None:
    """``"512MB"``, ``"4GB"``, ``"1.5GiB"``, ``"1000000"`` -> bytes."""
    from .errors import InputError

    if text is None:
        return None
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower()
    number = t.rstrip("kmgtib")
    try:
        value = float(number) * units[t[len(number):].strip()]
    except (ValueError, KeyError):
        value = -1
    if value <= 0:
        raise InputError(f"--memory {text!r} is not a size; give e.g. 512MB or 4GB")
    return int(value)


def _open(index: StorePath, model: Path | None, checkpoint: tuple[Path, ...], lr: tuple[float, ...], layers: str | None,
          loss: str | None, device: str, search: str = "auto", memory: str | None = None) -> Any:
    from .opening import open_index

    return open_index(index, model=model, checkpoints=_checkpoints(checkpoint, lr) if checkpoint or lr else None,
                      layers=layers, loss=loss, device=device, search=search, memory=parse_size(memory))


@main.command()
@click.argument("index", type=INDEX)
@click.option("--triple", "triple", multiple=True, required=True, help='"head relation tail" labels (repeatable).')
@_ranking_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_index_options
@_threads_option
@_user_errors
def query(index: StorePath, triple: tuple[str, ...], top_k: int, mode: str, relation: tuple[str, ...], neighbourhood: bool,
          candidates: int | None, opponent_candidates: int | None, no_rerank: bool, as_json: bool, model: Path | None,
          checkpoint: tuple[Path, ...], lr: tuple[float, ...], layers: str | None, loss: str | None, device: str,
          search: str, memory: str | None, threads: int | None) -> None:
    """Top proponents and opponents of test triples in INDEX."""
    from .runtime import configure_threads

    configure_threads(threads, tune_allocator=True)
    idx = _open(index, model, checkpoint, lr, layers, loss, device, search, memory)
    results = idx.query(list(triple), k=top_k, mode=mode, relations=list(relation) or None, neighbourhood=neighbourhood,
                        candidates=candidates, opponent_candidates=opponent_candidates, rerank=not no_rerank)
    if as_json:
        payload = [r.to_dict() for r in results]
        click.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        click.echo("\n\n".join(_format_table(r) for r in results))


def _test_triples(idx: Any, test: str) -> Any:
    """``--test``: ``pykeen:DATASET[:SPLIT]``, else a path (a missing file is reported as such)."""
    from .triples import PYKEEN_PREFIX

    return idx.parse(test if test.startswith(PYKEEN_PREFIX) else Path(test))


def _parse_indices(text: str | None, n: int) -> Any:
    """``"0,3,5-9"`` to sorted unique positions within ``0..n-1``."""
    import numpy as np

    from .errors import InputError

    if not text:
        return None
    out: set[int] = set()
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise InputError(f"--test-indices {text!r}: {part!r} is not an index or a range like 5-9") from None
        if not (0 <= a <= b < n):
            raise InputError(f"--test-indices {part}: out of range; the test set has {n} triples (0..{n - 1})")
        out.update(range(a, b + 1))
    return np.array(sorted(out), dtype=np.int64)


@contextmanager
def _bar(length: int, label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr fed with ``(done, total)`` calls; shown from the first call on, so an
    error before any work is the only line printed."""
    state: dict[str, Any] = {"bar": None, "seen": 0}

    def progress(done: int, _total: int) -> None:
        if state["bar"] is None:
            bar: Any = click.progressbar(length=length or _total, label=label, file=sys.stderr)
            state["bar"] = bar.__enter__()
        state["bar"].update(done - state["seen"])
        state["seen"] = done

    try:
        yield progress
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)


@main.command()
@click.argument("index", type=INDEX)
@click.option("--test", "test", required=True,
              help="Test triples: a label TSV, a pykeen triples directory, or pykeen:DATASET[:SPLIT] (e.g. pykeen:nations).")
@click.option("--out", type=PATH, required=True, help="Results file: .parquet or .jsonl (the extension picks).")
@_ranking_options
@click.option("--aggregate", is_flag=True, help="Rank training triples by influence summed over the whole test set.")
@click.option("--test-indices", default=None, help="Score only these test positions (e.g. 0,5,10-20).")
@click.option("--batch-size", type=int, default=None,
              help="Test triples per batch (default: as many as 2 GiB of test gradients hold, often the whole set: "
                   "each candidate's gradient is recomputed once per batch; a killed run resumes from its last batch).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@_index_options
@_threads_option
@_user_errors
def score(index: StorePath, test: str, out: Path, top_k: int, mode: str, relation: tuple[str, ...], neighbourhood: bool,
          candidates: int | None, opponent_candidates: int | None, no_rerank: bool, aggregate: bool,
          test_indices: str | None, batch_size: int | None, overwrite: bool, model: Path | None, checkpoint: tuple[Path, ...],
          lr: tuple[float, ...], layers: str | None, loss: str | None, device: str, search: str, memory: str | None,
          threads: int | None) -> None:
    """Score a whole test set against INDEX into a results file (restartable: run it again after a kill)."""
    from .errors import InputError
    from .rankings import TRAIN_COLUMNS
    from .results import output_format, write_records, write_scores
    from .runtime import configure_threads

    configure_threads(threads, tune_allocator=True)
    output_format(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    started = time.perf_counter()
    idx = _open(index, model, checkpoint, lr, layers, loss, device, search, memory)
    triples = _test_triples(idx, test)
    positions = _parse_indices(test_indices, len(triples))
    if positions is not None:
        triples = triples[positions]
    if aggregate:
        if neighbourhood:
            raise InputError("--neighbourhood applies per test triple; it cannot be combined with --aggregate")
        with _bar(2 * len(triples) if not no_rerank else len(triples), "scoring") as progress:
            result = idx.aggregate(triples, k=top_k, mode=mode, relations=list(relation) or None, candidates=candidates,
                                   opponent_candidates=opponent_candidates, rerank=not no_rerank, progress=progress,
                                   batch_size=256 if batch_size is None else batch_size)
        write_records(result.records(), ["mode", *TRAIN_COLUMNS], out, overwrite=overwrite)
        click.echo(_format_aggregate(result))
        click.echo(f"wrote the aggregate ranking of {len(triples):,} test triples to {out} "
                   f"({time.perf_counter() - started:.1f} s)")
        return
    settings = idx.settings(top_k, mode=mode, relations=list(relation) or None, neighbourhood=neighbourhood,
                            candidates=candidates, opponent_candidates=opponent_candidates, rerank=not no_rerank)
    with _bar(len(triples), "scoring") as progress:
        write_scores(idx, triples, out, settings, batch_size=batch_size, test_index=positions, overwrite=overwrite,
                     progress=progress, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"scored {len(triples):,} test triples into {out} ({time.perf_counter() - started:.1f} s)")


@main.command("self-influence")
@click.argument("index", type=INDEX)
@click.option("--top", type=int, default=None, help="How many to list (default: 20 shown, all written to --out).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", type=PATH, default=None, help="Also write the ranking (all rows unless --top) to .parquet/.jsonl.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@_user_errors
def self_influence(index: StorePath, top: int | None, as_json: bool, out: Path | None, overwrite: bool) -> None:
    """Training triples of INDEX ranked by exact self-influence (suspicious or hard triples first)."""
    from dataclasses import asdict

    from .rankings import TRAIN_COLUMNS, self_influence_ranking
    from .results import output_format, write_records

    if out is not None:
        output_format(out)
    ranking = self_influence_ranking(index, top)
    if out is not None:
        write_records([{"kind": "self", **asdict(i)} for i in ranking], list(TRAIN_COLUMNS), out, overwrite=overwrite)
    shown = ranking if top is not None else ranking[:20]
    if as_json:
        click.echo(json.dumps([asdict(i) for i in shown], indent=2))
    else:
        lines = _format_items("largest self-influence", list(shown), True)
        click.echo("\n".join(lines[1:]))
        if len(shown) < len(ranking):
            click.echo(f"  ... {len(ranking) - len(shown):,} more (--top N, or --out FILE for all)")


class _ArgparseStyle(click.Command):
    """Also takes argparse's ``nargs='+'`` spelling of list options: ``--opt a b c`` means ``--opt a,b,c``."""

    greedy = ("--last-layer-names", "--test-indices")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            out.append(args[i])
            i += 1
            if out[-1] in self.greedy:
                values = []
                while i < len(args) and not args[i].startswith("-"):
                    values.append(args[i])
                    i += 1
                if values:
                    out.append(",".join(values))
        return super().parse_args(ctx, out)


def _run_layers(use_last_layers_only: bool, num_last_layers: int | None, last_layer_names: str | None) -> str:
    if last_layer_names:
        return ",".join(n for n in last_layer_names.split(",") if n)
    if num_last_layers is not None:
        return f"last:{num_last_layers}"
    return "last:2" if use_last_layers_only else "all"


@main.command(cls=_ArgparseStyle)
@click.option("--model-path", type=PATH, required=True, help="The trained model (torch.save file, state dict or pykeen run dir).")
@click.option("--train", type=PATH, default=None, help="Training triples, label TSV (with --entity-to-id/--relation-to-id).")
@click.option("--test", "test", required=True, help="Test triples: label TSV, pykeen triples directory or pykeen:DATASET.")
@click.option("--entity-to-id", type=PATH, default=None, help="Entity label/id TSV the model was trained with.")
@click.option("--relation-to-id", type=PATH, default=None, help="Relation label/id TSV the model was trained with.")
@click.option("--output", type=PATH, required=True, help="Results file: .json, .jsonl or .parquet.")
@click.option("--test-indices", default=None, help="Test positions to explain (e.g. '0 3 5' or 0,3,5-9; default: all).")
@click.option("--use-last-layers-only", is_flag=True, help="Track the last 2 layers (default: all parameters).")
@click.option("--num-last-layers", type=int, default=None, help="Track the last N layers in forward order.")
@click.option("--last-layer-names", default=None, help="Track these parameter or module names ('a b' or a,b).")
@click.option("--learning-rate", type=float, default=None, help="Learning rate the influences are scaled by (default 1).")
@click.option("--mode", "run_mode", type=click.Choice(["single", "batch", "all", "self"]), default="single",
              show_default=True, help="single/batch/all: explain the test triples; self: rank by self-influence.")
@click.option("--score-mode", type=click.Choice(MODE_CHOICES), default="dot", show_default=True,
              help="dot, cosine, or abs (the earlier tool's ranking by |influence|).")
@click.option("--top-k", type=int, default=10, show_default=True)
@click.option("--model-class", default=None, help="pykeen model name when --model-path is a state dict.")
@click.option("--model-kwargs", default=None, help="JSON keyword arguments for --model-class.")
@click.option("--inverse-triples/--no-inverse-triples", default=None, help="With --model-class: trained with inverse triples.")
@click.option("--checkpoints", "checkpoint_dir", type=PATH, default=None, help="A directory of checkpoints (TracInCP).")
@click.option("--loss", default="bce", show_default=True, help="Per-triple loss: bce, ce or score.")
@click.option("--projection", default="sparse", show_default=True, help="sparse, gaussian or none.")
@click.option("--dim", type=int, default=1024, show_default=True, help="Projected dimension k per checkpoint.")
@click.option("--index", "index", type=INDEX, default=None,
              help="Keep the index here (built if missing, reused if it matches); default: a temporary one.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@_threads_option
@_user_errors
def run(model_path: Path, train: Path | None, test: str, entity_to_id: Path | None, relation_to_id: Path | None,
        output: Path, test_indices: str | None, use_last_layers_only: bool, num_last_layers: int | None,
        last_layer_names: str | None, learning_rate: float | None, run_mode: str, score_mode: str, top_k: int,
        model_class: str | None, model_kwargs: str | None, inverse_triples: bool | None, checkpoint_dir: Path | None,
        loss: str, projection: str, dim: int, index: StorePath | None, device: str, overwrite: bool,
        threads: int | None) -> None:
    """One shot, with the earlier run_tracin.py's options: model and triples in, results file out.

    Builds a temporary index (or reuses --index), then explains the test triples (or ranks the
    training triples by self-influence with --mode self).
    """
    import shutil
    import tempfile
    from dataclasses import asdict

    from .build import BuildConfig
    from .errors import InputError
    from .opening import open_index
    from .projection import ProjectionSpec
    from .results import write_records, write_scores
    from .runtime import configure_threads

    configure_threads(threads, tune_allocator=True)
    started = time.perf_counter()
    suffix = output.suffix.lower()
    if suffix not in (".json", ".jsonl", ".parquet"):
        raise InputError(f"--output {output}: the extension picks the format; use .json, .jsonl or .parquet")
    if output.exists() and not overwrite:
        raise InputError(f"{output} already exists; pass --overwrite to replace it")
    if learning_rate is not None and checkpoint_dir is not None:
        raise InputError("give either --learning-rate (the model itself) or --checkpoints DIR, not both")
    bundle = _load(model_path, model_class, model_kwargs, inverse_triples, train, entity_to_id, relation_to_id)
    specs = _checkpoints((), (), checkpoint_dir)
    if learning_rate is not None:
        specs = [(str(model_path), learning_rate)]
    layers = _run_layers(use_last_layers_only, num_last_layers, last_layer_names)
    config = BuildConfig(layers=layers, loss=loss, projection=ProjectionSpec(projection, dim, 0), device=device)
    tmp = None
    if index is None:
        tmp = Path(tempfile.mkdtemp(prefix="tracin-run-"))
        index = tmp / "index"
    try:
        if not (index / "LATEST").exists():
            _build(bundle, index, specs, config, False, started)
        idx = open_index(index, model=bundle, checkpoints=specs, layers=layers, loss=loss,
                         projection=config.projection, device=device)
        if run_mode == "self":
            ranking = idx.self_influence(min(top_k, idx.num_rows))
            records = [{"kind": "self", **asdict(i)} for i in ranking]
            if suffix == ".json":
                _write_json(output, [asdict(i) for i in ranking])
            else:
                write_records(records, list(records[0]) if records else ["kind"], output, overwrite=overwrite)
            click.echo(f"wrote the top {len(ranking)} training triples by self-influence to {output}")
            return
        triples = _test_triples(idx, test)
        positions = _parse_indices(test_indices, len(triples))
        if positions is None:
            positions = np.arange(len(triples))
        settings = idx.settings(top_k, mode=score_mode)
        with _bar(len(positions), "explaining") as progress:
            if suffix == ".json":
                results = idx.score(triples[positions], settings, progress=progress)
                _write_json(output, [{"test_index": int(p), **r.to_dict()} for p, r in zip(positions, results, strict=True)])
            else:
                write_scores(idx, triples[positions], output, settings, test_index=positions, overwrite=overwrite,
                             progress=progress, log=lambda msg: click.echo(msg, err=True))
        click.echo(f"explained {len(positions):,} test triple(s) into {output} ({time.perf_counter() - started:.1f} s)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, payload: Any) -> None:
    """Write a JSON document completely or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@main.command()
@click.argument("index", type=INDEX)
@click.option("--json", "as_json", is_flag=True, help="Print the store's attributes as JSON.")
@_user_errors
def info(index: StorePath, as_json: bool) -> None:
    """Settings, fingerprints and tracked parameters of INDEX."""
    from .store import Store

    store = Store.open(index)
    attrs = store.attrs
    if as_json:
        click.echo(json.dumps(attrs, indent=2))
        return
    from .location import disk_usage

    size = disk_usage(store.path)
    proj = attrs["projection"]
    click.echo(f"index:        {index}  (build {store.path.name}, {size / 2**20:.1f} MiB on disk, status {attrs['status']})")
    click.echo(f"model:        {attrs['model_class']} from {attrs['model_source']['path']}"
               f"{'  (inverse triples)' if attrs['inverse_triples'] else ''}")
    click.echo(f"rows:         {attrs['num_rows']:,} training triples x {attrs['width']} {attrs['dtype']}")
    sample = attrs.get("sample", {})
    if sample.get("rate", 1.0) < 1.0:
        click.echo(f"sample:       {sample['rate']:g} of {attrs['num_train']:,} training triples, stratified by "
                   f"{sample['stratify']}, seed {sample['seed']}")
    click.echo(f"loss:         {attrs['loss']}")
    click.echo(f"projection:   {proj['kind']}  dim={proj['dim']}  seed={proj['seed']}")
    click.echo("checkpoints:")
    for c in attrs["checkpoints"]:
        click.echo(f"  lr={c['lr']:<10g} {c['name']}  sha256 {c['sha256'][:16]}")
    total = 0
    click.echo(f"tracked parameters ({attrs['layers']}):")
    for p in attrs["tracked"]:
        n = 1
        for s in p["shape"]:
            n *= s
        total += n
        click.echo(f"  {p['name']:<45} {tuple(p['shape'])!s:<16} {n:>12,}  {p['kind']}")
    click.echo(f"  {'total':<45} {'':<16} {total:>12,}")
    sw = attrs.get("software", {})
    click.echo("software:     " + ", ".join(f"{k} {v}" for k, v in sw.items()))


@main.command()
@click.argument("index", type=INDEX)
@click.option("--no-model", is_flag=True, help="Skip the checks against the recorded model, checkpoints and triples.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_user_errors
def verify(index: StorePath, no_model: bool, as_json: bool) -> None:
    """Check the published build of INDEX: every chunk's checksum, done flags, rows, values, fingerprints.

    Exit code 0 when sound, 1 when something is wrong (each problem on its own line).
    """
    from .verify import describe
    from .verify import verify as run_verify

    report = run_verify(index, check_model=not no_model)
    if as_json:
        click.echo(json.dumps(describe(report), indent=2))
    else:
        for check in report.checks:
            click.echo(f"ok: {check}")
        for problem in report.problems:
            click.echo(f"PROBLEM: {problem}", err=True)
        click.echo(f"{report.build}: {'sound' if report.ok else f'{len(report.problems)} problem(s)'}")
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("index", type=INDEX)
@_user_errors
def finalize(index: StorePath) -> None:
    """Distributed builds, step 3: check every shard's done flags, verify, publish the build of INDEX."""
    from .shards import finalize_build

    store = finalize_build(index, log=lambda msg: click.echo(msg, err=True))
    report = store.build_report or {}
    if report.get("build"):
        click.echo(f"published build {report['build']} of {index}: {store.num_rows:,} rows")


@main.command()
@click.argument("index", type=INDEX)
@click.option("--keep", type=int, default=3, show_default=True, help="Complete builds to keep (the published one always).")
@click.option("--incomplete", is_flag=True, help="Also remove unfinished builds (otherwise kept for resuming).")
@click.option("--dry-run", is_flag=True, help="List what would be removed.")
@_user_errors
def gc(index: StorePath, keep: int, incomplete: bool, dry_run: bool) -> None:
    """Remove old builds of INDEX, keeping the newest --keep complete ones and the published one."""
    from .errors import InputError
    from .locks import BuildLock
    from .shards import PREPARED
    from .store import Store, builds, latest_build, remove_build

    if keep < 1:
        raise InputError(f"--keep {keep} must be at least 1")
    if not (index / "builds").is_dir():
        raise InputError(f"{index} is not a tracin-index index (no builds/); check the path")
    with BuildLock(index):  # never while a builder writes
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
        # the prepared build of a distributed run is never collected: its shards may be writing
        doomed = [b for b in complete[:-keep] if b != current] + (
            [b for b in unfinished if b.name != prepared] if incomplete else [])
        for b in doomed:
            click.echo(f"{'would remove' if dry_run else 'removing'} {b}")
            if not dry_run:
                remove_build(b)
        kept = len(complete) + len(unfinished) - len(doomed)
        click.echo(f"{len(doomed)} build(s) {'to remove' if dry_run else 'removed'}, {kept} kept "
                   f"(published: {current.name if current else 'none'})")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
