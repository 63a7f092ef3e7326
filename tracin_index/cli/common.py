"""What every ``tracin-index`` command shares: the ``main`` group, option types and decorators, model and
checkpoint loading, error reporting, progress bars, test-set options."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click

from ..errors import TracinError
from ..location import StorePath, location
from ..registry import Registry

PATH = click.Path(path_type=Path)


class _IndexLocation(click.ParamType):
    """An index directory or an ``s3://bucket/prefix`` URL (``click.Path`` would collapse ``s3://`` to ``s3:/``)."""

    name = "path|s3://url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> StorePath:
        from ..errors import InputError

        try:
            return location(value)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


INDEX = _IndexLocation()


class _Dim(click.ParamType):
    """A projected dimension: a positive integer, or ``auto`` (None: chosen by the rows indexed)."""

    name = "integer|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "auto":
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not an integer or auto", param, ctx)


DIM = _Dim()


def _quiet_libraries() -> None:
    import logging
    import warnings

    logging.getLogger("pykeen").setLevel(logging.ERROR)
    logging.getLogger("torch_max_mem").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pykeen")
    warnings.filterwarnings("ignore", category=UserWarning)


# the library's argument names that the command line spells otherwise (a command may add its own)
ALIASES = {"k": "top_k", "relations": "relation", "rerank": "no_rerank", "checkpoints": "checkpoint"}


def flag(name: str, aliases: dict[str, str] | None = None) -> str:
    """The running command's option for the library's argument ``name`` (``k`` -> ``--top-k``)."""
    wanted = (aliases or {}).get(name, ALIASES.get(name, name))
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx is not None else []:
        if param.name == wanted and isinstance(param, click.Option):
            return param.opts[0]
    return "--" + wanted.replace("_", "-")


def _user_errors(fn: Callable[..., Any] | None = None, *, aliases: dict[str, str] | None = None) -> Any:
    """Report :class:`TracinError` as one line on stderr with exit code 2, the arguments it names spelled as
    this command's options; ``--debug`` shows the traceback. ``aliases``: library argument -> option name."""
    if fn is None:
        return lambda f: _user_errors(f, aliases=aliases)

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False)
        try:
            return fn(*args, **kwargs)
        except TracinError as exc:
            if debug:
                raise
            click.echo(f"Error: {exc.render(lambda name: flag(name, aliases))}", err=True)
            sys.exit(2)
        except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
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
            from ..location import remote_error

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
    from ..errors import InputError
    from ..model import load_model

    kwargs = None
    if model_kwargs:
        try:
            kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            raise InputError(f"--model-kwargs is not valid JSON: {exc}") from None
    return load_model(model, model_class=model_class, model_kwargs=kwargs, triples=triples,
                      entity_to_id=entity_to_id, relation_to_id=relation_to_id, inverse_triples=inverse_triples)


def _checkpoints(paths: tuple[Path, ...], lrs: tuple[float, ...], directory: Path | None = None) -> list[tuple[str, float]]:
    from ..errors import InputError

    if len(paths) != len(lrs):
        raise InputError(f"give one --lr per --checkpoint ({len(paths)} checkpoints, {len(lrs)} learning rates)")
    specs = [(str(p), lr) for p, lr in zip(paths, lrs, strict=True)]
    if directory is not None:
        from ..callbacks import find_checkpoints

        specs += find_checkpoints(directory)
    return specs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracin-index")
def main() -> None:
    """TracIn influence for PyKEEN models: build an index of training gradients, then query it."""
    _quiet_libraries()


def choice(registry: Registry, help: str, default: Any = ..., *decls: str, **kwargs: Any) -> Callable[..., Any]:
    """An option whose choices, default and help come from ``registry`` (named as its argument: ``--loss``)."""
    decls = decls or ("--" + registry.argument.replace("_", "-"),)
    return click.option(*decls, type=click.Choice(registry.names), default=registry.default if default is ... else default,
                        show_default=default is ..., help=f"{help} {registry.help()}.", **kwargs)


def _test_triples(idx: Any, test: str) -> Any:
    """``--test``: ``pykeen:DATASET[:SPLIT]``, else a path (a missing file is reported as such); a line may be
    a question (``head relation ?``)."""
    from ..triples import PYKEEN_PREFIX

    return idx.parse(test if test.startswith(PYKEEN_PREFIX) else Path(test), questions=True)


def _parse_indices(text: str | None, n: int) -> Any:
    """``"0,3,5-9"`` to sorted unique positions within ``0..n-1``."""

    import numpy as np

    from ..errors import InputError

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


def parse_size(text: str | None, option: str = "--memory") -> int | None:
    """``"512MB"``, ``"4GB"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (a bad one is named as ``option``)."""
    from ..errors import InputError

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
        raise InputError(f"{option} {text!r} is not a size; give e.g. 512MB or 4GB")
    return int(value)
