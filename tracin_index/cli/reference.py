"""The command-line reference (``docs/cli.md``), written from the commands and the registries themselves.

``python -m tracin_index.cli.reference > docs/cli.md`` regenerates it; a test checks that the file in
the repository is what this prints.
"""

from __future__ import annotations

import inspect

import click

from ..registry import REGISTRIES, Registry
from . import main

__all__ = ["COLUMNS", "reference"]

# the columns of the result tables (score, score --aggregate, self-influence --out, run)
COLUMNS = {
    "test_index": "position of the test triple in the test set (or in --test-indices)",
    "test_head": "test triple's head label",
    "test_relation": "test triple's relation label",
    "test_tail": "test triple's tail label",
    "test_head_id": "test triple's head id (the model's entity id)",
    "test_relation_id": "test triple's relation id",
    "test_tail_id": "test triple's tail id",
    "mode": "scoring mode (dot, cosine or abs)",
    "question": "with a test file of questions (a ? head or tail): the question this predicted triple answers",
    "prediction_score": "the model's score of the predicted triple (predict_t / predict_h)",
    "prediction_rank": "its rank among the question's completions (filtered unless --unfiltered)",
    "kind": "list the row belongs to: proponent, opponent, top (abs mode) or self (self-influence)",
    "rank": "1-based rank within its list",
    "train_index": "position of the training triple in the model's training triples",
    "head": "training triple's head label",
    "relation": "training triple's relation label",
    "tail": "training triple's tail label",
    "head_id": "training triple's head id",
    "relation_id": "training triple's relation id",
    "tail_id": "training triple's tail id",
    "influence": "TracIn influence (exact after the re-rank; projected with --no-rerank)",
}

COMMANDS = ("build", "query", "score", "self-influence", "run", "serve", "info", "verify", "finalize", "gc")


def _anchor(text: str) -> str:
    return text.lower().replace(" ", "-")


def _option(param: click.Parameter, ctx: click.Context) -> tuple[str, str, str, str]:
    names = " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    if isinstance(param.type, click.Choice):
        kind = " | ".join(str(c) for c in param.type.choices)
    elif isinstance(param, click.Option) and param.is_flag:
        kind = "flag"
    else:
        kind = param.type.name.upper() if param.type.name != "text" else (getattr(param, "metavar", None) or "TEXT")
    default = ""
    value = param.default
    if isinstance(param, click.Option) and param.is_flag:
        if value is True and param.secondary_opts:
            default = f"`{param.opts[0]}`"
    elif isinstance(value, int | float | str) and not isinstance(value, bool):
        default = f"`{value}`"
    if isinstance(param, click.Option) and param.multiple:
        kind += ", repeatable"
    if param.required:
        default = "required"
    text = getattr(param, "help", None) or ""
    return names, kind.replace("|", "\\|"), default, text.replace("|", "\\|")


def _command(name: str, command: click.Command) -> list[str]:
    ctx = click.Context(command, info_name=f"tracin-index {name}")
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## `{name}`", "", "```", f"tracin-index {name} {usage}", "```", ""]
    lines += [inspect.cleandoc(command.help or ""), ""]
    params = [p for p in command.params if isinstance(p, click.Option) and p.name not in ("help",)]
    lines += ["| option | value | default | what it does |", "|---|---|---|---|"]
    for p in params:
        lines.append("| {} | {} | {} | {} |".format(*_option(p, ctx)))
    lines.append("")
    return lines


def _registry(registry: Registry) -> list[str]:
    lines = [f"### {registry.title}", "",
             f"Python argument `{registry.argument}`, option `--{registry.argument.replace('_', '-')}`; default "
             f"`{registry.default}`.", "", "| name | what it is |", "|---|---|"]
    lines += [f"| `{e.name}` | {e.help} |" for e in registry]
    return [*lines, ""]


def reference() -> str:
    """The Markdown text of ``docs/cli.md``."""
    from ..rankings import COLUMN_TYPES, result_columns

    lines = ["# Command-line reference", "",
             "<!-- written by `python -m tracin_index.cli.reference > docs/cli.md`; edit the commands' help, not this "
             "file -->", "",
             "`tracin-index COMMAND --help` prints the same for one command. Every command takes `--debug` (a full "
             "traceback instead of the one-line error). Exit codes: 0 done, 1 a problem of the environment (a disk, "
             "a bucket) or an unsound index (`verify`), 2 a problem with the input (the message names the option "
             "and the fix), 130 interrupted (nothing is published).", "",
             "Commands: " + ", ".join(f"[`{c}`](#{_anchor(c)})" for c in COMMANDS) + "; then the "
             "[registered names](#registered-names) and the [output schemas](#output-schemas).", ""]
    for name in COMMANDS:
        command = main.commands[name]
        lines += _command(name, command)
    lines += ["## Registered names", "",
              "The choices of the options above. Each is one entry in `tracin_index/registry.py`, which is where "
              "a new one is added.", ""]
    for registry in REGISTRIES:
        lines += _registry(registry)
    lines += ["## Output schemas", "",
              "### Result tables (`score --out`, `run --output`: .parquet or .jsonl)", "",
              "One row per (test triple, list, rank). The three prediction columns are there when the test set holds "
              "questions (`head relation ?`); their values are empty for its full triples. `score --aggregate` "
              "writes `mode` and the training columns; "
              "`self-influence --out` writes `kind` (`self`) and the training columns.", "",
              "| column | type | meaning |", "|---|---|---|"]
    for column in result_columns(predictions=True):
        lines.append(f"| `{column}` | {COLUMN_TYPES[column]} | {COLUMNS[column]} |")
    lines += ["", "### JSON (`query --json`, `run --output FILE.json`)", "",
              "One object per test triple (`query --json` with one `--triple` prints the object itself):", "",
              "```json",
              '{"test": {"head": "brazil", "relation": "commonbloc1", "tail": "india"},',
              ' "mode": "dot",',
              ' "proponents": [{"rank": 1, "train_index": 515, "head": "india", "relation": "commonbloc1", '
              '"tail": "brazil", "head_id": 9, "relation_id": 7, "tail_id": 3, "influence": 0.0129}],',
              ' "opponents": [...]}',
              "```", "",
              "In `abs` mode the object has one list, `top`, instead of `proponents` and `opponents`. With "
              "`--optimizer` other than `sgd` the object names it (`\"optimizer\": \"adam\"`). "
              "`run --output FILE.json` adds `test_index` to each object; with `--mode self` it is a list of "
              "training-triple objects. `self-influence --json` prints a list of training-triple objects; "
              "`verify --json` prints `{\"build\", \"ok\", \"checks\", \"problems\"}`; `info --json` prints the "
              "store's attributes.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    click.echo(reference(), nl=False)
