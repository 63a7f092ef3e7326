"""``tracin-index query``, ``score`` and ``self-influence``: rankings of training triples, printed or written."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..location import StorePath
from ..registry import FORMATS, LOSSES, MODES, OPTIMIZERS, SEARCHES
from .common import (
    INDEX,
    PATH,
    _bar,
    _checkpoints,
    _parse_indices,
    _test_triples,
    _threads_option,
    _user_errors,
    choice,
    main,
    parse_size,
)

TABLES = ", ".join(f"{e['suffix']} ({e.name})" for e in FORMATS if e["table"])


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
    tags = [name for name, plain in ((result.mode, MODES.default), (result.optimizer, OPTIMIZERS.default)) if name != plain]
    lines = [header + (f"  [{', '.join(tags)}]" if tags else "")]
    if result.mode == "abs":
        lines += _format_items("largest |influence|", result.top, result.exact)
    else:
        lines += _format_items("proponents", result.proponents, result.exact)
        lines += _format_items("opponents", result.opponents, result.exact)
    return "\n".join(lines)


def _format_table(result: Any) -> str:
    t = result.test
    header = f"test: {t['head']}  {t['relation']}  {t['tail']}"
    if result.prediction is not None:
        p = result.prediction
        header += (f"  (prediction {p['rank']} of {p['question']!r}, score {p['score']:.6g}"
                   f"{'' if p['filtered'] else ', unfiltered'})")
    if result.versus is not None:
        v = result.versus
        header += f"  versus {v['head']}  {v['relation']}  {v['tail']}  (influence on the score margin)"
    return _format_lists(header, result)


def _format_aggregate(result: Any) -> str:
    return _format_lists(f"influence summed over {result.num_test:,} test triples", result)


def _index_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that re-point an index at its model (paths moved) and assert its settings."""
    options = [
        click.option("--model", "model", type=PATH, default=None, help="Model to use instead of the recorded one (must match)."),
        click.option("--checkpoint", "checkpoint", type=PATH, multiple=True, help="Checkpoints instead of the recorded ones."),
        click.option("--lr", "lr", type=float, multiple=True, help="Learning rate of the matching --checkpoint."),
        click.option("--layers", default=None, help="Refuse unless the index tracks these layers."),
        choice(LOSSES, "Refuse unless the index used this loss.", None),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda (test gradients and re-rank)."),
        choice(SEARCHES, "Candidate search."),
        click.option("--memory", default=None, metavar="SIZE",
                     help="Memory the search may hold, e.g. 512MB or 4GB (auto streams when the index would not fit)."),
        click.option("--nprobe", type=click.IntRange(min=1), default=None,
                     help="With the build's FAISS index (--search ann): lists probed (IVF) or efSearch (HNSW); more is "
                          "slower and finds more."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _ranking_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--top-k", type=int, default=10, show_default=True, help="Training triples listed per end."),
        choice(MODES, "Influence to rank by."),
        choice(OPTIMIZERS, "The optimizer the model was trained with, whose steps the influences follow."),
        click.option("--relation", "relation", multiple=True,
                     help="Only training triples with this relation (repeatable); applied before the top-K cut."),
        click.option("--neighbourhood", "--neighborhood", "neighbourhood", is_flag=True,
                     help="Only training triples sharing an entity with the test triple; before the top-K cut."),
        click.option("--candidates", type=int, default=None,
                     help="Candidates re-ranked exactly per end (default: 10k and 50k, at least 100 and 500; four times "
                          "that with the build's FAISS index)."),
        click.option("--opponent-candidates", type=int, default=None, help="Candidates for the opponent end only."),
        click.option("--no-rerank", is_flag=True, help="Report projected influences without the exact re-rank."),
        click.option("--predictions", type=int, default=1, show_default=True,
                     help="For a question ('head relation ?' or '? relation tail'): how many of the model's top "
                          "completions to explain."),
        click.option("--unfiltered", is_flag=True,
                     help="Rank a question's completions with the other known training triples kept (default: "
                          "filtered out, as PyKEEN's filtered evaluation does)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _open(index: StorePath, model: Path | None, checkpoint: tuple[Path, ...], lr: tuple[float, ...], layers: str | None,
          loss: str | None, device: str, search: str = "auto", memory: str | None = None,
          optimizer: str = OPTIMIZERS.default, nprobe: int | None = None) -> Any:
    from ..opening import open_index

    return open_index(index, model=model, checkpoints=_checkpoints(checkpoint, lr) if checkpoint or lr else None,
                      layers=layers, loss=loss, device=device, search=search, memory=parse_size(memory), optimizer=optimizer,
                      nprobe=nprobe)


@main.command()
@click.argument("index", type=INDEX)
@click.option("--triple", "triple", multiple=True, required=True,
              help='"head relation tail" labels (repeatable); "head relation ?" or "? relation tail" explains the '
                   "model's top predictions.")
@click.option("--versus", "versus", multiple=True,
              help='"head relation tail2": which training triples make the model prefer --triple over this one '
                   "(influence on the margin between their scores; one per --triple, or one for all).")
@_ranking_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_index_options
@_threads_option
@_user_errors
def query(index: StorePath, triple: tuple[str, ...], versus: tuple[str, ...], top_k: int, mode: str, optimizer: str,
          relation: tuple[str, ...],
          neighbourhood: bool, candidates: int | None, opponent_candidates: int | None, no_rerank: bool, predictions: int,
          unfiltered: bool, as_json: bool, model: Path | None,
          checkpoint: tuple[Path, ...], lr: tuple[float, ...], layers: str | None, loss: str | None, device: str,
          search: str, memory: str | None, nprobe: int | None, threads: int | None) -> None:
    """Top proponents and opponents of test triples in INDEX."""
    from ..runtime import configure_threads

    configure_threads(threads, tune_allocator=True)
    idx = _open(index, model, checkpoint, lr, layers, loss, device, search, memory, optimizer, nprobe)
    results = idx.query(list(triple), k=top_k, mode=mode, relations=list(relation) or None, neighbourhood=neighbourhood,
                        candidates=candidates, opponent_candidates=opponent_candidates, rerank=not no_rerank,
                        versus=list(versus) or None, predictions=predictions, filtered=not unfiltered)
    if as_json:
        payload = [r.to_dict() for r in results]
        click.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        click.echo("\n\n".join(_format_table(r) for r in results))


@main.command()
@click.argument("index", type=INDEX)
@click.option("--test", "test", required=True,
              help="Test triples: a label TSV, a pykeen triples directory, or pykeen:DATASET[:SPLIT] (e.g. pykeen:nations).")
@click.option("--out", type=PATH, required=True, help=f"Results file; its extension picks the format: {TABLES}.")
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
def score(index: StorePath, test: str, out: Path, top_k: int, mode: str, optimizer: str, relation: tuple[str, ...],
          neighbourhood: bool,
          candidates: int | None, opponent_candidates: int | None, no_rerank: bool, predictions: int, unfiltered: bool,
          aggregate: bool,
          test_indices: str | None, batch_size: int | None, overwrite: bool, model: Path | None, checkpoint: tuple[Path, ...],
          lr: tuple[float, ...], layers: str | None, loss: str | None, device: str, search: str, memory: str | None,
          nprobe: int | None, threads: int | None) -> None:
    """Score a whole test set against INDEX into a results file (restartable: run it again after a kill)."""
    from ..errors import InputError
    from ..rankings import TRAIN_COLUMNS
    from ..results import check_output, write_records, write_scores
    from ..runtime import configure_threads

    configure_threads(threads, tune_allocator=True)
    check_output(out, overwrite)
    started = time.perf_counter()
    idx = _open(index, model, checkpoint, lr, layers, loss, device, search, memory, optimizer, nprobe)
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
                            candidates=candidates, opponent_candidates=opponent_candidates, rerank=not no_rerank,
                            predictions=predictions, filtered=not unfiltered)
    with _bar(0, "scoring") as progress:  # its length from write_scores: questions expand to their predictions
        write_scores(idx, triples, out, settings, batch_size=batch_size, test_index=positions, overwrite=overwrite,
                     progress=progress, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"scored {len(triples):,} test triples into {out} ({time.perf_counter() - started:.1f} s)")


@main.command("self-influence")
@click.argument("index", type=INDEX)
@click.option("--top", type=int, default=None, help="How many to list (default: 20 shown, all written to --out).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", type=PATH, default=None, help=f"Also write the ranking (all rows unless --top) to a file: {TABLES}.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@choice(OPTIMIZERS, "The optimizer the model was trained with, whose steps the self-influences follow (other than "
        f"{OPTIMIZERS.default}: computed with the model, a pass over the indexed triples).")
@_index_options
@_threads_option
@_user_errors
def self_influence(index: StorePath, top: int | None, as_json: bool, out: Path | None, overwrite: bool, optimizer: str,
                   model: Path | None, checkpoint: tuple[Path, ...], lr: tuple[float, ...], layers: str | None,
                   loss: str | None, device: str, search: str, memory: str | None, nprobe: int | None,
                   threads: int | None) -> None:
    """Training triples of INDEX ranked by exact self-influence (suspicious or hard triples first)."""
    from dataclasses import asdict

    from ..rankings import TRAIN_COLUMNS, self_influence_ranking
    from ..results import check_output, write_records
    from ..runtime import configure_threads

    if out is not None:
        check_output(out, overwrite)
    if optimizer == OPTIMIZERS.default:
        ranking = self_influence_ranking(index, top)  # stored by the build: no model needed
    else:
        configure_threads(threads, tune_allocator=True)
        ranking = _open(index, model, checkpoint, lr, layers, loss, device, search, memory, optimizer, nprobe).self_influence(top)
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
