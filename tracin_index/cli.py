"""The ``tracin-index`` command: parses options, calls the Python API, formats the answer."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from .errors import TracinError

PATH = click.Path(path_type=Path)


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
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was published.", err=True)
            sys.exit(130)

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


def _checkpoints(paths: tuple[Path, ...], lrs: tuple[float, ...]) -> list[tuple[str, float]]:
    from .errors import InputError

    if len(paths) != len(lrs):
        raise InputError(f"give one --lr per --checkpoint ({len(paths)} checkpoints, {len(lrs)} learning rates)")
    return [(str(p), lr) for p, lr in zip(paths, lrs, strict=True)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracin-index")
def main() -> None:
    """TracIn influence for PyKEEN models: build an index of training gradients, then query it."""
    _quiet_libraries()


@main.command()
@click.option("--model", "model", type=PATH, required=True,
              help="pykeen results directory (save_to_directory), a torch.save model file, or a state dict.")
@_model_options
@click.option("--out", type=PATH, required=True, help="Directory of the index to create.")
@click.option("--layers", default="last:2", show_default=True, help="last:N (forward order), all, or parameter/layer names.")
@click.option("--loss", default="bce", show_default=True, help="Per-triple loss: bce, ce or score.")
@click.option("--projection", default="sparse", show_default=True, help="sparse (TensorSketch), gaussian or none (exact).")
@click.option("--dim", type=int, default=1024, show_default=True, help="Projected dimension k per checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help="Projection seed.")
@click.option("--batch-size", type=int, default=1024, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --out.")
@_threads_option
@_user_errors
def build(model: Path, model_class: str | None, model_kwargs: str | None, inverse_triples: bool | None,
          triples: Path | None, entity_to_id: Path | None, relation_to_id: Path | None,
          checkpoint: tuple[Path, ...], lr: tuple[float, ...], out: Path, layers: str, loss: str,
          projection: str, dim: int, seed: int, batch_size: int, device: str, overwrite: bool,
          threads: int | None) -> None:
    """Index the gradients of every training triple of MODEL."""
    from .build import BuildConfig, build_index
    from .projection import ProjectionSpec
    from .runtime import configure_threads

    configure_threads(threads)
    started = time.perf_counter()
    bundle = _load(model, model_class, model_kwargs, inverse_triples, triples, entity_to_id, relation_to_id)
    config = BuildConfig(layers=layers, loss=loss, projection=ProjectionSpec(projection, dim, seed),
                         batch_size=batch_size, device=device)
    n = int(bundle.triples.mapped.shape[0])
    with click.progressbar(length=n, label="indexing", file=sys.stderr) as bar:
        done = [0]

        def progress(rows: int, _total: int) -> None:
            bar.update(rows - done[0])
            done[0] = rows

        store = build_index(bundle, out, checkpoints=_checkpoints(checkpoint, lr), config=config,
                            overwrite=overwrite, progress=progress)
    attrs = store.attrs
    click.echo(f"indexed {n:,} training triples x {len(attrs['checkpoints'])} checkpoint(s) into {out} "
               f"({attrs['width']} numbers per row, {time.perf_counter() - started:.1f} s)")


def _format_table(result: Any) -> str:
    t = result.test
    lines = [f"test: {t['head']}  {t['relation']}  {t['tail']}"]
    for title, items in (("proponents", result.proponents), ("opponents", result.opponents)):
        lines.append(f"  {title}{'' if result.exact else ' (projected)'}:")
        if not items:
            lines.append("    (none)")
        width = max((len(f"{i.head}  {i.relation}  {i.tail}") for i in items), default=0)
        for i in items:
            triple = f"{i.head}  {i.relation}  {i.tail}"
            lines.append(f"    {i.rank:>3}  {triple:<{width}}  {i.influence:+.6g}  (#{i.train_index})")
    return "\n".join(lines)


@main.command()
@click.argument("index", type=PATH)
@click.option("--triple", "triple", multiple=True, required=True, help='"head relation tail" labels (repeatable).')
@click.option("--top-k", type=int, default=10, show_default=True)
@click.option("--candidates", type=int, default=None,
              help="FAISS candidates per end to re-rank (default: 10k / 50k, at least 100 / 500).")
@click.option("--no-rerank", is_flag=True, help="Report projected influences without exact re-ranking.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--model", "model", type=PATH, default=None, help="Model to use instead of the recorded one (must match).")
@click.option("--checkpoint", "checkpoint", type=PATH, multiple=True, help="Checkpoints instead of the recorded ones.")
@click.option("--lr", "lr", type=float, multiple=True)
@click.option("--layers", default=None, help="Refuse unless the index tracks these layers.")
@click.option("--loss", default=None, help="Refuse unless the index used this loss.")
@click.option("--device", default="cpu", show_default=True)
@_threads_option
@_user_errors
def query(index: Path, triple: tuple[str, ...], top_k: int, candidates: int | None, no_rerank: bool,
          as_json: bool, model: Path | None, checkpoint: tuple[Path, ...], lr: tuple[float, ...],
          layers: str | None, loss: str | None, device: str, threads: int | None) -> None:
    """Top proponents and opponents of test triples in INDEX."""
    from .query import open_index
    from .runtime import configure_threads

    configure_threads(threads)
    idx = open_index(index, model=model, checkpoints=_checkpoints(checkpoint, lr) if checkpoint or lr else None,
                     layers=layers, loss=loss, device=device)
    results = idx.query(list(triple), k=top_k, candidates=candidates, rerank=not no_rerank)
    if as_json:
        payload = [r.to_dict() for r in results]
        click.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        click.echo("\n\n".join(_format_table(r) for r in results))


@main.command()
@click.argument("index", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the store's attributes as JSON.")
@_user_errors
def info(index: Path, as_json: bool) -> None:
    """Settings, fingerprints and tracked parameters of INDEX."""
    from .store import Store

    store = Store.open(index)
    attrs = store.attrs
    if as_json:
        click.echo(json.dumps(attrs, indent=2))
        return
    size = sum(f.stat().st_size for f in Path(index).rglob("*") if f.is_file())
    proj = attrs["projection"]
    click.echo(f"index:        {index}  ({size / 2**20:.1f} MiB on disk, status {attrs['status']})")
    click.echo(f"model:        {attrs['model_class']} from {attrs['model_source']['path']}"
               f"{'  (inverse triples)' if attrs['inverse_triples'] else ''}")
    click.echo(f"rows:         {attrs['num_rows']:,} training triples x {attrs['width']} {attrs['dtype']}")
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


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
