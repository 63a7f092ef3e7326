"""``tracin-index serve``: the warm query service (FastAPI + uvicorn) and its web explorer."""

from __future__ import annotations

import logging
import sys

import click

from ..location import StorePath
from ..registry import SEARCHES
from .common import INDEX, _threads_option, _user_errors, choice, main

MISSING = "serve needs FastAPI: pip install 'tracin-index[serve]'"


@main.command()
@click.argument("index", type=INDEX)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface, put a proxy in front).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (test gradients and re-rank).")
@choice(SEARCHES, "Candidate search.")
@click.option("--memory", default=None, metavar="SIZE",
              help="Memory the search may hold, e.g. 512MB or 4GB (auto streams when the index would not fit).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="With the build's FAISS index (--search ann): lists probed (IVF) or efSearch (HNSW).")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="With --search ray: Ray actors holding the rows' shards (default: one per CPU slot of the cluster "
                   "named by RAY_ADDRESS, else of a local one).")
@_threads_option
@click.option("--max-concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests admitted at once (they take turns on the model); one more waits up to --queue-timeout, "
                   "then gets 503.")
@click.option("--queue-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds a request waits for its turn before it is answered 503.")
@click.option("--max-body", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Largest request body in bytes; a larger one is answered 413.")
@click.option("--poll", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between reads of INDEX/LATEST; a new build is opened in the background and swapped in "
                   "(0: keep the build opened at start).")
@click.option("--batch/--no-batch", default=True, show_default=True,
              help="Answer the queries waiting with the same options in one engine batch (one search and re-rank for "
                   "all; values agree with a query asked alone to float32 rounding).")
@_user_errors
def serve(index: StorePath, host: str, port: int, device: str, search: str, memory: str | None, nprobe: int | None,
          shards: int | None, threads: int | None,
          max_concurrency: int, queue_timeout: float, max_body: int, poll: float, batch: bool) -> None:
    """Answer queries on INDEX over HTTP, with the web explorer at http://HOST:PORT/.

    The published build is opened once and kept warm; when INDEX/LATEST names a new build (the nightly
    job published one), it is opened in the background and answers the requests that arrive after it is
    ready; every answer names its build. JSON API under /api (schema: /openapi.json); docs/serve.md.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        click.echo(f"Error: {MISSING}", err=True)
        sys.exit(1)
    from uvicorn.logging import DefaultFormatter

    from ..runtime import configure_threads
    from ..serve.app import create_app
    from .common import parse_size

    # the service's own lines (builds opened and swapped) in uvicorn's format, next to its request lines
    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log = logging.getLogger("tracin_index.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    configure_threads(threads, tune_allocator=True)
    app = create_app(index, max_concurrency=max_concurrency, max_body=max_body, queue_timeout=queue_timeout, poll=poll,
                     batch=batch, device=device, search=search, memory=parse_size(memory), nprobe=nprobe,
                     shards=shards)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
