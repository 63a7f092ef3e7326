"""``tracin-index info``, ``verify``, ``finalize`` and ``gc``: looking after an index's builds."""

from __future__ import annotations

import json
import sys

import click

from ..location import StorePath
from .common import (
    INDEX,
    _user_errors,
    main,
)


@main.command()
@click.argument("index", type=INDEX)
@click.option("--json", "as_json", is_flag=True, help="Print the store's attributes as JSON.")
@_user_errors
def info(index: StorePath, as_json: bool) -> None:
    """Settings, fingerprints and tracked parameters of INDEX."""
    from ..plan import Plan
    from ..store import Store

    store = Store.open(index)
    attrs = store.attrs
    if as_json:
        click.echo(json.dumps(attrs, indent=2))
        return
    from ..location import disk_usage

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
    plan = Plan.from_dict(attrs["plan"]) if "plan" in attrs else None
    click.echo(f"tracked parameters ({attrs['layers']}):")
    for p in attrs["tracked"]:
        n = 1
        for s in p["shape"]:
            n *= s
        total += n
        kind = "dense, per triple" if plan is not None and p["name"] in plan.per_triple else p["kind"]
        click.echo(f"  {p['name']:<45} {tuple(p['shape'])!s:<16} {n:>12,}  {kind}")
    click.echo(f"  {'total':<45} {'':<16} {total:>12,}")
    if plan is not None:
        click.echo(f"plan:         {plan.describe()}")
    for warning in attrs.get("warnings", []):
        click.echo(f"warning:      {warning}")
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
    from ..verify import describe
    from ..verify import verify as run_verify

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
    from ..shards import finalize_build

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
    from ..retention import collect_builds

    collected = collect_builds(index, keep, incomplete=incomplete, dry_run=dry_run, log=click.echo)
    click.echo(f"{len(collected.removed)} build(s) {'to remove' if dry_run else 'removed'}, {collected.kept} kept "
               f"(published: {collected.published or 'none'})")
