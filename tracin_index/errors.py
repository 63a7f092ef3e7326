"""Exceptions a user can act on: each message names the problem and the fix.

A message names the arguments it is about with :func:`arg`. ``str(error)`` spells them as Python
arguments (``k=0``), which is what a caller of the Python API typed; :meth:`TracinError.render` spells
them as the command line does (``--top-k 0``), given the command's map from argument to flag.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["TracinError", "InputError", "IndexMismatchError", "StoreError", "arg", "spelled"]

_MARK = "\x1f"
_SEP = "\x1e"
_ARG = re.compile(f"{_MARK}([^{_MARK}{_SEP}]*){_SEP}([012]){_SEP}([^{_MARK}]*){_SEP}([^{_MARK}]*){_MARK}")
_NO_VALUE = object()


def arg(name: str, value: Any = _NO_VALUE) -> str:
    """The argument ``name`` (with ``value``) inside an error message, spelled when the message is shown."""
    if value is _NO_VALUE:
        return f"{_MARK}{name}{_SEP}0{_SEP}{_SEP}{_MARK}"
    shown = "" if value is True else str(value)
    return f"{_MARK}{name}{_SEP}1{_SEP}{value!r}{_SEP}{shown}{_MARK}"


def spelled(python: str, cli: str) -> str:
    """Words of a message that the Python API and the command line spell differently."""
    return f"{_MARK}{_SEP}2{_SEP}{python}{_SEP}{cli}{_MARK}"


def _python(m: re.Match[str]) -> str:
    name, how, python, _ = m.groups()
    return f"{name}={python}" if how == "1" else python if how == "2" else name


class TracinError(Exception):
    """Base class: a problem with what the user asked for, reported as one line without a traceback."""

    def __str__(self) -> str:
        return _ARG.sub(_python, super().__str__())

    def render(self, flag: Callable[[str], str]) -> str:
        """The message with each argument spelled as the command line's ``flag(name)`` (and its value)."""

        def cli(m: re.Match[str]) -> str:
            name, how, _, shown = m.groups()
            return f"{flag(name)} {shown}".rstrip() if how == "1" else shown if how == "2" else flag(name)

        return _ARG.sub(cli, super().__str__())


class InputError(TracinError):
    """A file, label, option or model that cannot be used as given."""


class IndexMismatchError(TracinError):
    """The index was built with a model, layers, loss or projection other than the query's."""


class StoreError(TracinError):
    """The store on disk is missing, incomplete or not a tracin-index store."""
