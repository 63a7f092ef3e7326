"""Exceptions a user can act on: each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["TracinError", "InputError", "IndexMismatchError", "StoreError"]


class TracinError(Exception):
    """Base class: a problem with what the user asked for, reported as one line without a traceback."""


class InputError(TracinError):
    """A file, label, option or model that cannot be used as given."""


class IndexMismatchError(TracinError):
    """The index was built with a model, layers, loss or projection other than the query's."""


class StoreError(TracinError):
    """The store on disk is missing, incomplete or not a tracin-index store."""
