"""The ``tracin-index`` command: parses options, calls the Python API, formats the answer.

:func:`main` is the click group (console script ``tracin_index.cli:main``); the commands register on it
from their modules: :mod:`.building` (build), :mod:`.querying` (query, score, self-influence),
:mod:`.oneshot` (run), :mod:`.maintenance` (info, verify, finalize, gc) and :mod:`.serving` (serve).
"""

from __future__ import annotations

from . import building, maintenance, oneshot, querying, serving
from .common import main, parse_size

__all__ = ["building", "main", "maintenance", "oneshot", "parse_size", "querying", "serving"]
