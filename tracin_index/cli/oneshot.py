"""``tracin-index run``: build (or reuse) an index and explain a test set in one command, with the earlier
tool's option names."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..location import StorePath
from ..registry import FORMATS, LOSSES, MODES, OPTIMIZERS, PROJECTIONS
from .building import _build
from .common import (
    DIM,
    INDEX,
    PATH,
    _bar,
    _checkpoints,
    _load,
    _parse_indices,
    _test_triples,
    _threads_option,
    _user_errors,
    choice,
    main,
)


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
@click.option("--output", type=PATH, required=True,
              help="Results file; its extension picks the format: " + ", ".join(f"{e['suffix']} ({e.name})" for e in FORMATS)
              + ".")
@click.option("--test-indices", default=None, help="Test positions to explain (e.g. '0 3 5' or 0,3,5-9; default: all).")
@click.option("--use-last-layers-only", is_flag=True, help="Track the last 2 layers (default: all parameters).")
@click.option("--num-last-layers", type=int, default=None, help="Track the last N layers in forward order.")
@click.option("--last-layer-names", default=None, help="Track these parameter or module names ('a b' or a,b).")
@click.option("--learning-rate", type=float, default=None, help="Learning rate the influences are scaled by (default 1).")
@click.option("--mode", "run_mode", type=click.Choice(["single", "batch", "all", "self"]), default="single",
              show_default=True, help="single/batch/all: explain the test triples; self: rank by self-influence.")
@choice(MODES, "Influence to rank by.", ..., "--score-mode")
@choice(OPTIMIZERS, "The optimizer the model was trained with, whose steps the influences follow.")
@click.option("--top-k", type=int, default=10, show_default=True)
@click.option("--model-class", default=None, help="pykeen model name when --model-path is a state dict.")
@click.option("--model-kwargs", default=None, help="JSON keyword arguments for --model-class.")
@click.option("--inverse-triples/--no-inverse-triples", default=None, help="With --model-class: trained with inverse triples.")
@click.option("--checkpoints", "checkpoint_dir", type=PATH, default=None, help="A directory of checkpoints (TracInCP).")
@choice(LOSSES, "Per-triple loss.")
@choice(PROJECTIONS, "Random projection of the gradients.")
@click.option("--dim", type=DIM, default="auto", show_default=True,
              help="Projected dimension k per checkpoint; auto: 1024, or 2048 from 1M indexed rows.")
@click.option("--index", "index", type=INDEX, default=None,
              help="Keep the index here (built if missing, reused if it matches); default: a temporary one.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@_threads_option
@_user_errors(aliases={"out": "output", "mode": "score_mode", "triples": "train"})
def run(model_path: Path, train: Path | None, test: str, entity_to_id: Path | None, relation_to_id: Path | None,
        output: Path, test_indices: str | None, use_last_layers_only: bool, num_last_layers: int | None,
        last_layer_names: str | None, learning_rate: float | None, run_mode: str, score_mode: str, optimizer: str, top_k: int,
        model_class: str | None, model_kwargs: str | None, inverse_triples: bool | None, checkpoint_dir: Path | None,
        loss: str, projection: str, dim: int | None, index: StorePath | None, device: str, overwrite: bool,
        threads: int | None) -> None:
    """One shot, with the earlier run_tracin.py's options: model and triples in, results file out.

    Builds a temporary index (or reuses --index), then explains the test triples (or ranks the
    training triples by self-influence with --mode self).
    """
    import shutil
    import tempfile
    from dataclasses import asdict

    import numpy as np

    from ..build import BuildConfig
    from ..errors import InputError
    from ..opening import open_index
    from ..projection import ProjectionSpec
    from ..registry import format_for
    from ..results import check_output, write_json, write_records, write_scores
    from ..runtime import configure_threads

    configure_threads(threads, tune_allocator=True)
    started = time.perf_counter()
    table = format_for(output)["table"]
    check_output(output, overwrite, tables_only=False)
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
                         projection=config.projection, device=device, optimizer=optimizer)
        if run_mode == "self":
            ranking = idx.self_influence(min(top_k, idx.num_rows))
            records = [{"kind": "self", **asdict(i)} for i in ranking]
            if not table:
                write_json([asdict(i) for i in ranking], output, overwrite=overwrite)
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
            if not table:
                results = idx.score(triples[positions], settings, progress=progress)
                write_json([{"test_index": int(p), **r.to_dict()} for p, r in zip(positions, results, strict=True)], output,
                           overwrite=overwrite)
            else:
                write_scores(idx, triples[positions], output, settings, test_index=positions, overwrite=overwrite,
                             progress=progress, log=lambda msg: click.echo(msg, err=True))
        click.echo(f"explained {len(positions):,} test triple(s) into {output} ({time.perf_counter() - started:.1f} s)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

