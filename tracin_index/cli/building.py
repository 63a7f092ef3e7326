"""``tracin-index build``: one build, a prepared build and its shards, or a Ray run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..location import StorePath
from ..registry import LOSSES, PROJECTIONS, STRATEGIES
from .common import (
    DIM,
    INDEX,
    PATH,
    _bar,
    _checkpoints,
    _load,
    _model_options,
    _threads_option,
    _user_errors,
    choice,
    main,
)


@main.command()
@click.option("--model", "model", type=PATH, required=True,
              help="pykeen results directory (save_to_directory), a torch.save model file, or a state dict.")
@_model_options
@click.option("--out", type=INDEX, required=True, help="Directory (or s3://bucket/prefix URL) of the index to create.")
@click.option("--layers", default="last:2", show_default=True, help="last:N (forward order), all, or parameter/layer names.")
@choice(LOSSES, "Per-triple loss.")
@choice(PROJECTIONS, "Random projection of the gradients.")
@click.option("--dim", type=DIM, default="auto", show_default=True,
              help="Projected dimension k per checkpoint; auto: 1024, or 2048 from 1M indexed rows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Projection seed.")
@click.option("--batch-size", type=int, default=1024, show_default=True,
              help="Training triples per gradient batch; where rows share the encoder's input (ConvE: the same head "
                   "and relation) a batch grows up to 16x, within the memory of this many unshared triples.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--sample-rate", type=float, default=1.0, show_default=True,
              help="Index only this fraction of the training triples (fast exploration); the store records which.")
@choice(STRATEGIES, "How --sample-rate samples.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--unit-rows", type=int, default=8192, show_default=True,
              help="Rows per write unit (the unit a killed build resumes from).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Stored rows (default float16 for projections, float32 for --projection none).")
@click.option("--cache-activations/--no-cache-activations", default=True, show_default=True,
              help="Store the first tracked Linear's outputs (ConvE: 1,600 bytes per triple) so the exact re-rank "
                   "skips that layer.")
@click.option("--gradient-memory", default="4GiB", show_default=True, metavar="SIZE",
              help="Memory one batch's gradients and activations may take; batches shrink to fit it, and a model whose "
                   "single triple does not fit is refused.")
@click.option("--faiss", "faiss_spec", default="auto", show_default=True, metavar="SPEC|auto|none",
              help="Also store a FAISS index of the rows: an index_factory string with inner product (e.g. IVF1024,SQ8, "
                   "HNSW32,SQ8), trained on a seeded sample; queries search its compact codes (--search ann; auto "
                   "from 1M rows). auto: none below 1M rows, else an exhaustive scan of 4-bit PQ codes, PQ<width/4>x4fs.")
@click.option("--faiss-sample", type=int, default=65536, show_default=True, help="Rows the FAISS index is trained on.")
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
          loss: str, projection: str, dim: int | None, seed: int, batch_size: int, device: str, sample_rate: float,
          stratify: str, sample_seed: int, unit_rows: int, dtype: str | None, cache_activations: bool, gradient_memory: str,
          faiss_spec: str, faiss_sample: int, force: bool,
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
    from ..build import BuildConfig
    from ..errors import InputError
    from ..projection import ProjectionSpec
    from ..runtime import configure_threads
    from ..tracer import GRADIENT_MEMORY
    from .common import parse_size

    configure_threads(threads, tune_allocator=True)
    started = time.perf_counter()
    config = BuildConfig(layers=layers, loss=loss, projection=ProjectionSpec(projection, dim, seed),
                         batch_size=batch_size, device=device, sample_rate=sample_rate, stratify=stratify,
                         sample_seed=sample_seed, unit_rows=unit_rows, dtype=dtype,
                         cache_activations=cache_activations,
                         gradient_memory=parse_size(gradient_memory, "--gradient-memory") or GRADIENT_MEMORY,
                         faiss=faiss_spec, faiss_sample=faiss_sample, faiss_seed=seed)
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
        from ..shards import build_shard, parse_shard

        i_n = parse_shard(shard)
        with _bar(0, f"shard {shard}") as progress:
            report = build_shard(load(), out, i_n, checkpoints=_checkpoints(checkpoint, lr, checkpoint_dir), config=config,
                                 progress=progress, log=say)
        if report["units_computed"]:
            click.echo(f"shard {shard}: computed {report['units_computed']} of its {len(report['units'])} write units "
                       f"({time.perf_counter() - started:.1f} s); run 'tracin-index finalize {out}' when all shards are done")
        return
    if prepare:
        from ..shards import prepare_build

        store = prepare_build(load(), out, checkpoints=_checkpoints(checkpoint, lr, checkpoint_dir), config=config,
                              force=force, log=say)
        if not (store.build_report or {}).get("skipped"):
            click.echo(f"prepared build {store.path.name} in {out}: {store.attrs['num_units']} write units; run the "
                       f"shards (build ... --shard I/N, same options), then 'tracin-index finalize {out}'")
        return
    if executor == "ray":
        from ..distributed import ray_build

        store = ray_build(load(), out, checkpoints=_checkpoints(checkpoint, lr, checkpoint_dir), config=config,
                          force=force, address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                          shards=shards, log=say)
        if not (store.build_report or {}).get("skipped"):
            click.echo(f"indexed {store.num_rows:,} rows into {out} on Ray ({time.perf_counter() - started:.1f} s)")
        return
    from ..locks import BuildLock

    # Lock before loading anything, so a second builder fails fast. The lock refuses a file or a foreign
    # directory as --out, and removes the directory again if it created it and nothing else came of it.
    with BuildLock(out) as lock:
        _build(load(), out, _checkpoints(checkpoint, lr, checkpoint_dir), config, force, started, lock)


def _build(bundle: Any, out: StorePath, specs: list[tuple[str, float]], config: Any, force: bool, started: float,
           lock: Any = None) -> Any:
    from ..build import build_index, sample_rows

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
