"""``tracin-index serve``: one opened index behind a JSON API, with the web explorer at ``/``.

:func:`~tracin_index.serve.app.create_app` builds the FastAPI application; :class:`~tracin_index.serve.holder.Current`
holds the build it answers from and swaps in the next one when the index's ``LATEST`` moves. FastAPI and uvicorn
are the ``serve`` extra (``pip install 'tracin-index[serve]'``); importing this package imports neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Current", "Served", "create_app"]

if TYPE_CHECKING:
    from .app import create_app
    from .holder import Current, Served


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("Current", "Served"):
        from . import holder

        return getattr(holder, name)
    raise AttributeError(f"module 'tracin_index.serve' has no attribute {name!r}")
