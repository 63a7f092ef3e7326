"""The service's FastAPI application: a JSON API over one opened index, and the explorer's static files at ``/``.

Every answer is a JSON object that names the build it came from (``"build"``). A request takes the current
build once (:class:`~tracin_index.serve.holder.Current`) and answers from it alone, while a newly published
build may be swapped in for the requests after it. Errors are JSON too, ``{"error": "<one line>"}``: 400 for
input the library refuses (its message names the closest labels), 422 for a request outside the API's
bounds, 413 for a body over ``max_body`` bytes, 503 when ``max_concurrency`` requests are already inside the
index and another waited ``queue_timeout`` seconds, 500 (and a log line with the traceback) for anything
unexpected. No traceback reaches a client.

Endpoints (their schemas: ``/openapi.json``)::

    GET  /api/info                                   the build: rows, model, loss, projection, layers, checkpoints
    GET  /api/labels?kind=entity&prefix=br&limit=20  label completion
    POST /api/query          {"triples": ["h r t"], "k": 10, "mode": "dot", "relations": null, "neighbourhood": false}
    POST /api/predict        {"question": "h r ?", "n": 10, "filtered": true}
    POST /api/explain        {"question": "h r ?", "predictions": 1, "k": 10, "filtered": true, "mode": "dot"}
    POST /api/contrast       {"triple": "h r t", "versus": "h r t2", "k": 10, "mode": "dot"}
    GET  /api/self-influence?top=20
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import IndexMismatchError, StoreError, TracinError
from ..location import StorePath, Where
from .holder import LOG, Current, Served, Turnstile

__all__ = ["MAX_K", "MAX_N", "MAX_TRIPLES", "ServiceError", "create_app"]

STATIC = Path(__file__).parent / "static"
MAX_TRIPLES = 64  # test triples per /api/query request
MAX_K = 1000  # training triples per list
MAX_N = 100  # predictions per question
MAX_TOP = 10_000  # rows of /api/self-influence
MAX_LABEL = 1000  # characters of one triple or question

T = TypeVar("T")


class ServiceError(Exception):
    """A request the service turns away itself (busy, too large, internal), with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Triple = Annotated[str, Field(min_length=1, max_length=MAX_LABEL, examples=["brazil commonbloc1 india"])]
K = Annotated[int, Field(ge=1, le=MAX_K, description="training triples per list (proponents, opponents)")]
Mode = Annotated[str, Field(description="dot, cosine or abs (tracin_index.MODES)")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryRequest(Strict):
    triples: list[Triple] = Field(min_length=1, max_length=MAX_TRIPLES, examples=[["brazil commonbloc1 india"]],
                                  description='"head relation tail" labels')
    k: K = 10
    mode: Mode = "dot"
    relations: list[Annotated[str, Field(max_length=MAX_LABEL)]] | None = Field(
        None, max_length=MAX_K, description="only training triples with these relations (before the top-k cut)")
    neighbourhood: bool = Field(False, description="only training triples sharing an entity with their test triple")


class PredictRequest(Strict):
    question: Triple = Field(examples=["brazil commonbloc1 ?"], description='"head relation ?" or "? relation tail"')
    n: int = Field(10, ge=1, le=MAX_N, description="predictions listed")
    filtered: bool = Field(True, description="leave out the completions that are training triples")


class ExplainRequest(Strict):
    question: Triple = Field(examples=["brazil commonbloc1 ?"], description='"head relation ?" or "? relation tail"')
    predictions: int = Field(1, ge=1, le=MAX_N, description="the model's top predictions explained")
    k: K = 10
    filtered: bool = True
    mode: Mode = "dot"


class ContrastRequest(Strict):
    triple: Triple = Field(examples=["brazil commonbloc1 india"])
    versus: Triple = Field(examples=["brazil commonbloc1 uk"], description="the triple it is preferred over")
    k: K = 10
    mode: Mode = "dot"


def _status(exc: TracinError) -> int:
    if isinstance(exc, StoreError):
        return 503  # the store went missing or bad under a running service
    if isinstance(exc, IndexMismatchError):
        return 409
    return 400


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error(status: int, message: str, build: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": _one_line(message)}
    if build is not None:
        body["build"] = build
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """Pydantic's errors as one line: ``k: Input should be less than or equal to 1000 (got 5000)``."""
    parts = []
    for e in exc.errors()[:3]:
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})")
            continue
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query")) or "body"
        value = e.get("input")
        got = f" (got {value!r})" if isinstance(value, int | float | bool) or (isinstance(value, str) and len(value) < 80) else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts) or "invalid request"


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, by its Content-Length or while it is read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body exceeds {self.limit} bytes (the service's --max-body)"
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _error(413, message)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message)  # FastAPI passes it on to the handler below
            return msg

        await self.app(scope, limited, send)


class Gate:
    """At most ``limit`` requests inside the index at once, first come, first served; another waits up to
    ``timeout`` seconds for a place, then gets 503.

    Inside, each request's call runs on its build's own thread, after the calls queued before it (the
    index's model is not safe for concurrent calls). A call still queued when the time is up is cancelled.
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self._slots = Turnstile(limit)

    def run(self, served: Served, fn: Callable[[Any], T]) -> T:
        """``fn(index)`` on ``served``'s thread; its result, or what it raised."""
        return self.wait(lambda: served.submit(fn))

    def wait(self, start: Callable[[], Future[T]]) -> T:
        """The result of the call ``start()`` queues on a build's thread (or what it raised), once a place is free."""
        deadline = time.monotonic() + self.timeout
        busy = (f"busy: {self.limit} requests are being answered and this one waited {self.timeout:g} s; "
                "try again (or raise the service's --max-concurrency)")
        if not self._slots.acquire(timeout=self.timeout):
            raise ServiceError(503, busy)
        try:
            future = start()
            try:
                return future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if future.cancel():
                    raise ServiceError(503, busy) from None
                return future.result()  # it has started: its answer is on the way
        finally:
            self._slots.release()


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """An endpoint whose unexpected exceptions become a logged 500 with a one-line message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TracinError, ServiceError, HTTPException):
            raise
        except Exception as exc:
            LOG.exception("%s failed", fn.__name__)
            text = str(exc).strip()
            raise ServiceError(500, f"internal error: {type(exc).__name__}" + (f": {text}" if text else "")) from None

    return wrapper


def _answer(served: Served, **payload: Any) -> JSONResponse:
    return JSONResponse({"build": served.build, **payload})


def create_app(
    index_location: Where,
    *,
    max_concurrency: int = 8,
    max_body: int = 65536,
    queue_timeout: float = 30.0,
    poll: float = 5.0,
    batch: bool = True,
    **open_kwargs: Any,
) -> FastAPI:
    """The service over the index at ``index_location`` (an index home, followed as ``LATEST`` moves, or one
    build directory, served as it is).

    The published build is opened here with ``open_index(build, **open_kwargs)`` (``device``, ``search``,
    ``memory``, ``model``, ``checkpoints``...), so a missing or mismatched index raises at once. While the
    application runs (its lifespan), ``LATEST`` is read every ``poll`` seconds and a new build is swapped in.
    ``batch``: queries waiting with the same options are answered in one engine batch
    (:meth:`~tracin_index.serve.holder.Served.query`); False answers each alone.
    ``app.state.current`` is the :class:`~tracin_index.serve.holder.Current`.
    """
    from ..opening import open_index

    if max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")

    def opener(build: StorePath) -> Any:
        return open_index(build, **open_kwargs)

    current = Current(index_location, opener, poll=poll)
    gate = Gate(max_concurrency, queue_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        current.start()
        try:
            yield
        finally:
            current.close()

    # no Swagger or ReDoc pages: they load their scripts from a CDN, and the service fetches nothing from elsewhere
    app = FastAPI(title="tracin-index", summary="TracIn influence of training triples on a PyKEEN model's beliefs",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.current = current
    app.add_middleware(BodyLimit, limit=max_body)

    @app.exception_handler(TracinError)
    async def tracin_error(request: Request, exc: TracinError) -> JSONResponse:
        return _error(_status(exc), str(exc), getattr(request.state, "build", None))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, str(exc), getattr(request.state, "build", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(404, f"no such page: {request.url.path} (the API is under /api; its schema is /openapi.json)")
        return _error(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        LOG.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}")

    def take(request: Request) -> Served:
        served = current.get()
        request.state.build = served.build  # error answers name it too
        return served

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info", summary="The build answering: rows, model, loss, projection, layers, checkpoints")
    @_guarded
    def info(request: Request) -> JSONResponse:
        served = take(request)
        return _answer(served, following=current.following, ready=served.ready.is_set(), **served.summary)

    @app.get("/api/labels", summary="Entity or relation labels starting with (then containing) a prefix")
    @_guarded
    def labels(request: Request, kind: Literal["entity", "relation"] = "entity",
               prefix: Annotated[str, Query(max_length=MAX_LABEL)] = "",
               limit: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> JSONResponse:
        served = take(request)
        return _answer(served, kind=kind, prefix=prefix, labels=served.complete(kind, prefix, limit))

    @app.post("/api/query", summary="Top proponents and opponents of test triples")
    @_guarded
    def query(request: Request, body: QueryRequest) -> JSONResponse:
        served = take(request)
        options = {"k": body.k, "mode": body.mode, "relations": body.relations, "neighbourhood": body.neighbourhood}
        if batch:  # answered with the queries queued beside it, in one engine batch
            results = gate.wait(lambda: served.query(body.triples, **options))
        else:
            results = gate.run(served, lambda index: index.query(body.triples, **options))
        return _answer(served, results=[r.to_dict() for r in results])

    @app.post("/api/predict", summary="The model's top completions of a question (h, r, ?) or (?, r, t)")
    @_guarded
    def predict(request: Request, body: PredictRequest) -> JSONResponse:
        served = take(request)
        predictions = gate.run(served, lambda index: index.predict(body.question, n=body.n, filtered=body.filtered))
        return _answer(served, question=body.question, filtered=body.filtered, predictions=predictions)

    @app.post("/api/explain", summary="Proponents and opponents of the model's top predictions for a question")
    @_guarded
    def explain(request: Request, body: ExplainRequest) -> JSONResponse:
        served = take(request)
        results = gate.run(served, lambda index: index.explain_prediction(
            body.question, predictions=body.predictions, k=body.k, filtered=body.filtered, mode=body.mode))
        return _answer(served, question=body.question, results=[r.to_dict() for r in results])

    @app.post("/api/contrast", summary="Training triples that make the model prefer one triple over another")
    @_guarded
    def contrast(request: Request, body: ContrastRequest) -> JSONResponse:
        served = take(request)
        results = gate.run(served, lambda index: index.query(body.triple, k=body.k, mode=body.mode, versus=body.versus))
        return _answer(served, results=[r.to_dict() for r in results])

    @app.get("/api/self-influence", summary="Training triples by exact self-influence, largest first")
    @_guarded
    def self_influence(request: Request, top: Annotated[int, Query(ge=1, le=MAX_TOP)] = 20) -> JSONResponse:
        served = take(request)
        ranking = gate.run(served, lambda index: index.self_influence(top))
        return _answer(served, ranking=[dataclasses.asdict(i) for i in ranking])

    return app
