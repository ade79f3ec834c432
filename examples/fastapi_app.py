"""A reference FastAPI service on labkit: lifespan, one session per request, probes, metrics.

Run it from the repository root (``DATABASE_URL`` from the environment or ``.env``)::

    uvicorn examples.fastapi_app:app          # sync handlers, get_db
    uvicorn examples.fastapi_app:async_app    # the async twin, get_async_db

Nothing connects at import, nor reads the environment: ``app`` and ``async_app`` are
built by ``create_app`` and ``create_async_app``; the engine is created when the
application starts, from ``Settings.from_env(env_file=".env")``, and disposed of when
it stops.

What it serves (``app`` with sync handlers, ``async_app`` with async ones, same routes):

| route | what it shows |
|---|---|
| ``GET /live`` | liveness: the process answers; never touches the database |
| ``GET /ready`` | readiness: the bounded health check, 503 when the database does not answer |
| ``POST /orders/{id}`` | a write committed before its 201 is sent |
| ``GET /orders/export`` | a streamed response whose session is closed before streaming |
| ``POST /orders/{id}/receipt`` | a background task that opens its own session |
| ``POST /payments`` | an idempotent write: ``Idempotency-Key`` header + ``ON CONFLICT`` |
| ``GET /reports/slow`` | a slow query (``pg_sleep``) that blocks neither the event loop nor ``/live`` |
| ``GET /reports/feed`` | a streamed report, each chunk read by a short session of its own |
| ``GET /orders/summary`` | a dependency (``Caller``) that shares the request's session |
| ``GET /metrics`` | ``PoolMetrics`` in the Prometheus text format (``prometheus-client``) |

Every handler takes its session as ``SessionDep`` (``AsyncSessionDep``), that is
``Depends(get_db, scope="function")``. The scope is what makes a 2xx mean "stored":
``get_db`` commits in the code after its ``yield``, and FastAPI (0.118 and later) runs
that code *after the response has been sent* unless the dependency has scope
``"function"`` (FastAPI 0.121 and later), which runs it when the handler returns, before
the response goes out. Without it, a COMMIT that fails (a deferred constraint, a
serialization failure, a connection lost during COMMIT) leaves the client with its 201
and no row. With it, the failure reaches the exception handlers: an ``IntegrityError``
becomes 409, anything else 500. ``require_commit_before_response`` refuses to start an
application in which some route takes ``get_db`` without that scope.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    BackgroundTasks,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
)
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import labkit
from labkit import (
    AsyncSessionManager,
    PoolMetrics,
    SessionManager,
    Settings,
    async_health_check,
    get_async_db,
    get_db,
    health_check,
)
from labkit import metrics as pool_keys
from labkit.errors import is_database_error, translate_error

__all__ = [
    "AsyncCaller",
    "AsyncSessionDep",
    "CHECKOUT_WAIT_BUCKETS_S",
    "Caller",
    "HEALTH_TIMEOUT",
    "MAX_FEED_CHUNKS",
    "MAX_REPORT_SECONDS",
    "READY_TIMEOUT",
    "ServiceMetrics",
    "SessionDep",
    "app",
    "async_app",
    "create_app",
    "create_async_app",
    "install_error_handlers",
    "require_commit_before_response",
    "service_routes",
]

logger = logging.getLogger("labkit.example")

# /ready answers within this many seconds however the database is broken (the probe's
# socket is cut at the deadline); an orchestrator's probe timeout should be longer.
READY_TIMEOUT = 2.0
HEALTH_TIMEOUT = READY_TIMEOUT  # the name older code used; /health is /ready
# Histogram buckets of the checkout wait, seconds: an idle connection (< 1 ms), a new
# connection (a few ms), queueing behind busy requests, up to a 30 s pool_timeout.
CHECKOUT_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                           10.0, 30.0)

# The session a handler takes: committed when the handler returns, *before* the response
# is sent, so that a COMMIT that fails is answered with an error and never with a 2xx.
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_db, scope="function")]

# A real service creates its tables with migrations; the example keeps it to one place.
# Every worker runs the lifespan, and concurrent CREATE TABLE IF NOT EXISTS can still
# collide in the catalog: a transaction-scoped advisory lock takes them one at a time.
_SCHEMA = (
    "SELECT pg_advisory_xact_lock(7411001)",
    "CREATE TABLE IF NOT EXISTS example_orders (id int PRIMARY KEY, item text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS example_receipts (order_id int PRIMARY KEY, "
    "sent_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS example_payments (idempotency_key text PRIMARY KEY, "
    "amount_cents int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
)
_INSERT_ORDER = text("INSERT INTO example_orders (id, item) VALUES (:id, :item)")
_LIST_ORDERS = text("SELECT id, item FROM example_orders ORDER BY id")
_INSERT_RECEIPT = text("INSERT INTO example_receipts (order_id) VALUES (:id) "
                       "ON CONFLICT (order_id) DO NOTHING")
# One statement decides who stored the payment: a concurrent duplicate waits for the
# first transaction, then does nothing. Nothing returned means "already there".
_INSERT_PAYMENT = text("INSERT INTO example_payments (idempotency_key, amount_cents) "
                       "VALUES (:key, :amount) ON CONFLICT (idempotency_key) DO NOTHING "
                       "RETURNING idempotency_key")
_GET_PAYMENT = text("SELECT amount_cents FROM example_payments WHERE idempotency_key = :key")
_SLOW_REPORT = text("SELECT pg_sleep(:seconds), count(*) AS orders FROM example_orders")
_CALLER = text("SELECT current_user")
_SUMMARY = text("SELECT pg_sleep(:seconds), count(*) AS orders FROM example_orders")
MAX_REPORT_SECONDS = 5.0
MAX_FEED_CHUNKS = 100


def _sub_dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for sub in dependant.dependencies:
        yield sub
        yield from _sub_dependencies(sub)


def require_commit_before_response(app: FastAPI) -> None:
    """Refuse an application where a route takes ``get_db`` without ``scope="function"``.

    Walks every route's dependencies, nested ones included. ``Depends(get_db)`` on its
    own has FastAPI's default scope for a dependency with ``yield``, ``"request"``: the
    commit would run after the response is sent, and a failed commit would still be
    answered 2xx. The lifespans below call this first, so the mistake stops start-up
    instead of losing writes.

    Args:
        app: The application, with all of its routes added.

    Raises:
        RuntimeError: Some route takes ``get_db`` or ``get_async_db`` with another scope;
            the message names each route.
    """
    wrong = sorted({f"{'/'.join(sorted(route.methods or ()))} {route.path}"
                    for route in app.routes if isinstance(route, APIRoute)
                    for dependency in _sub_dependencies(route.dependant)
                    if dependency.call in (get_db, get_async_db)
                    and dependency.scope != "function"})
    if wrong:
        raise RuntimeError(
            "these routes would commit after the response is sent, so a failed COMMIT "
            f"would still be answered 2xx: {', '.join(wrong)}. Take the session as "
            "SessionDep / AsyncSessionDep, i.e. Depends(get_db, scope=\"function\")")


# --- /metrics: PoolMetrics in the Prometheus text format -------------------------------

class ServiceMetrics(PoolMetrics):
    """``PoolMetrics`` that also feed a Prometheus registry of the application's own.

    One registry per application (not prometheus-client's global one), so that two apps
    in one process, as in tests, never collide. ``/metrics`` exposes:

    - ``labkit_pool_in_use``, ``labkit_pool_idle``, ``labkit_pool_overflow``,
      ``labkit_pool_size``: gauges read from the pool at scrape time (``overflow`` is
      negative until the pool is full, as SQLAlchemy reports it);
    - ``labkit_pool_checkouts_total``, ``..._connects_total``, ``..._invalidations_total``,
      ``..._checkout_errors_total`` and the other ``PoolMetrics`` counters;
    - ``labkit_pool_checkout_wait_seconds``: a histogram of every checkout's wait;
    - ``labkit_errors_total{error="PoolTimeoutError"}``: database errors that ended a
      request, by labkit class.

    Create it with ``ServiceMetrics.attach(engine)`` before the engine serves traffic and
    keep a reference (the engine holds its collectors weakly).
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.registry = CollectorRegistry(auto_describe=True)
        self.checkout_wait = PromHistogram(
            "labkit_pool_checkout_wait_seconds",
            "Time a request waited for a pooled connection (opening one included).",
            buckets=CHECKOUT_WAIT_BUCKETS_S, registry=self.registry)
        self.errors = PromCounter(
            "labkit_errors", "Database errors that ended a request, by labkit error class.",
            ["error"], registry=self.registry)
        self.registry.register(_PoolCollector(self))

    def _record_checkout(self, ms: float, *, failed: bool) -> None:
        # PoolMetrics' hook for every checkout (the engine's hub calls it): keep its
        # counters and feed the histogram, with no second set of pool listeners.
        super()._record_checkout(ms, failed=failed)
        self.checkout_wait.observe(ms / 1000.0)

    def count_error(self, error: str) -> None:
        """Count a request ended by a database error of labkit class ``error``."""
        self.errors.labels(error=error).inc()

    def exposition(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    """Read ``PoolMetrics`` at scrape time: gauges now, counters since start-up."""

    _GAUGES = ((pool_keys.IN_USE, "Connections checked out of the pool."),
               (pool_keys.IDLE, "Connections idle in the pool."),
               (pool_keys.OVERFLOW, "Overflow connections (negative until the pool is full)."),
               (pool_keys.POOL_SIZE, "The pool's configured pool_size."))
    _COUNTERS = (pool_keys.CONNECTS, pool_keys.CLOSES, pool_keys.CHECKOUTS,
                 pool_keys.CHECKINS, pool_keys.RESETS, pool_keys.INVALIDATIONS,
                 pool_keys.CHECKOUT_ERRORS)

    def __init__(self, metrics: PoolMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        snapshot = self.metrics.snapshot()
        for key, doc in self._GAUGES:
            name = "labkit_pool_size" if key == pool_keys.POOL_SIZE else f"labkit_pool_{key}"
            yield GaugeMetricFamily(name, doc, value=snapshot[key])
        for key in self._COUNTERS:
            yield CounterMetricFamily(f"labkit_pool_{key}", f"PoolMetrics counter {key!r}.",
                                      value=snapshot[key])


# --- routes every service here shares ---------------------------------------------------

# ``app.include_router(service_routes)``: liveness and metrics, the same in every app.
service_routes = APIRouter()


@service_routes.get("/live")
async def live() -> dict[str, str]:
    """Liveness: the process and its event loop answer. Never touches the database, so a
    database outage never makes an orchestrator restart the service."""
    return {"status": "alive"}


@service_routes.get("/metrics")
async def metrics(request: Request) -> Response:
    """Pool gauges, counters, checkout-wait histogram and errors, Prometheus format."""
    exposition: ServiceMetrics = request.app.state.metrics
    return Response(exposition.exposition(), media_type=CONTENT_TYPE_LATEST)


# --- errors -------------------------------------------------------------------------------

def _count(request: Request, error: str) -> None:
    metrics: ServiceMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.count_error(error)


async def _integrity_conflict(request: Request, exc: Exception) -> JSONResponse:
    """Answer 409 when a constraint rejects the data, in a statement or at COMMIT."""
    _count(request, "IntegrityError")
    return JSONResponse(status_code=409, content={
        "error": "IntegrityError", "detail": "conflict: a constraint rejected the data"})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """Answer 503 (with ``Retry-After``) for a transient database error, else 500.

    The body names the labkit class and never the driver's message, which can carry SQL
    and data; the log keeps the whole error.
    """
    if not is_database_error(exc):
        raise exc
    error = translate_error(exc)
    _count(request, type(error).__name__)
    logger.warning("%s %s failed: %s", request.method, request.url.path, error)
    if isinstance(error, labkit.TransientError):
        return JSONResponse(status_code=503, headers={"Retry-After": "1"}, content={
            "error": type(error).__name__, "detail": "the database is unavailable or "
            "overloaded; retry later"})
    return JSONResponse(status_code=500, content={
        "error": type(error).__name__, "detail": "a database error ended the request"})


def install_error_handlers(app: FastAPI) -> None:
    """Map database errors to answers, and count them on ``/metrics`` by labkit class.

    ``IntegrityError`` (SQLAlchemy's, what a failed COMMIT raises, or labkit's) is a 409,
    whether a statement or the COMMIT raised it. Any other database error is translated
    to its labkit class: a ``TransientError`` (pool timeout, database down, connection
    lost) is a 503 with ``Retry-After``, the rest a 500. Other exceptions stay 500s.
    """
    app.add_exception_handler(sa_exc.IntegrityError, _integrity_conflict)
    app.add_exception_handler(labkit.IntegrityError, _integrity_conflict)
    app.add_exception_handler(sa_exc.SQLAlchemyError, _database_error)
    app.add_exception_handler(labkit.DatabaseError, _database_error)


# --- shared pieces of both apps -----------------------------------------------------------

def _payment_answer(response: Response, key: str, amount_cents: int,
                    inserted: bool, stored: int | None) -> dict[str, object]:
    if inserted:
        response.status_code = 201
        return {"idempotency_key": key, "amount_cents": amount_cents, "replayed": False}
    if stored != amount_cents:
        raise HTTPException(status_code=422, detail="this Idempotency-Key was used for "
                            "a different payment")
    response.status_code = 200  # a retry of a stored payment: same answer, stored once
    return {"idempotency_key": key, "amount_cents": amount_cents, "replayed": True}


async def _paced_lines(rows: list[dict[str, object]], delay: float) -> AsyncIterator[bytes]:
    """Yield one NDJSON line per row, ``delay`` seconds apart (a slow feed or client)."""
    for number, row in enumerate(rows):
        if number and delay > 0:
            await asyncio.sleep(delay)
        yield (json.dumps(row) + "\n").encode()


IdempotencyKey = Annotated[str, Header(alias="Idempotency-Key", min_length=1, max_length=200)]
ReportSeconds = Annotated[float, Query(ge=0, le=MAX_REPORT_SECONDS)]
FeedChunks = Annotated[int, Query(ge=1, le=MAX_FEED_CHUNKS)]


def _feed_line(chunk: int, orders: int) -> str:
    return json.dumps({"chunk": chunk, "orders": orders}) + "\n"


# A dependency that needs the database takes the request's session, it does not open one:
# FastAPI resolves SessionDep once per request, so the handler and its dependencies share
# one session and one pooled connection. A dependency opening a session of its own makes
# every request hold two connections at once, and a pool smaller than twice the
# concurrency then deadlocks until pool_timeout (notebook 08 measures it).
def get_caller(session: SessionDep) -> str:
    """Return the database role serving the request, read on the request's session."""
    return str(session.execute(_CALLER).scalar_one())


async def get_async_caller(session: AsyncSessionDep) -> str:
    """Async twin of ``get_caller``."""
    return str((await session.execute(_CALLER)).scalar_one())


Caller = Annotated[str, Depends(get_caller)]
AsyncCaller = Annotated[str, Depends(get_async_caller)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the sync application; ``settings`` default to ``Settings.from_env(env_file=".env")``.

    Args:
        settings: The database settings; read from the environment at start-up when
            ``None``, never at import.

    Returns:
        The application, not yet started: no engine, no connection.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        require_commit_before_response(app)
        manager = SessionManager()
        manager.init(settings or Settings.from_env(env_file=".env"))
        app.state.db = manager
        app.state.metrics = ServiceMetrics.attach(manager.engine)
        try:
            with manager.connect() as conn:
                for statement in _SCHEMA:
                    conn.execute(text(statement))
            yield
        finally:
            manager.close()
            app.state.metrics.detach()

    app = FastAPI(title="labkit example", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(service_routes)

    @app.get("/ready")
    @app.get("/health")
    def ready(response: Response) -> dict[str, object]:
        """Readiness: 200 when the database answers within ``READY_TIMEOUT``, else 503.

        The probe uses a connection of its own, never one of the pool's: a saturated
        pool is reported (``pool_saturated``) but does not fail readiness.
        """
        report = health_check(app.state.db.engine, timeout=READY_TIMEOUT)
        response.status_code = 200 if report.ok else 503
        return report.to_dict()

    @app.post("/orders/{order_id}", status_code=201)
    def create_order(order_id: int, item: str, session: SessionDep) -> dict[str, object]:
        """Insert an order: committed before the 201 is sent; a duplicate id is a 409."""
        session.execute(_INSERT_ORDER, {"id": order_id, "item": item})
        return {"id": order_id, "item": item}

    @app.post("/orders/{order_id}/fail")
    def create_then_fail(order_id: int, session: SessionDep) -> None:
        """Write, then fail: get_db rolls the write back."""
        session.execute(_INSERT_ORDER, {"id": order_id, "item": "doomed"})
        raise HTTPException(status_code=500, detail="handler failed after writing")

    @app.get("/orders")
    def list_orders(session: SessionDep) -> list[dict[str, object]]:
        return [{"id": r.id, "item": r.item} for r in session.execute(_LIST_ORDERS)]

    @app.get("/orders/export")
    def export_orders(session: SessionDep, delay: float = 0.0) -> StreamingResponse:
        """Stream every order as NDJSON, ``delay`` seconds apart.

        The rows are read while the handler runs; ``SessionDep`` then commits and closes
        the session before the first byte is sent, so a slow client holds a socket, not
        a pooled connection.
        """
        rows = [{"id": r.id, "item": r.item} for r in session.execute(_LIST_ORDERS)]
        return StreamingResponse(_paced_lines(rows, delay), media_type="application/x-ndjson")

    @app.post("/orders/{order_id}/receipt", status_code=202)
    def send_receipt(order_id: int, tasks: BackgroundTasks) -> dict[str, object]:
        """Accept the request, record the receipt after the response in a background task.

        The task opens its own session: the request's session (``SessionDep``) is closed
        by then, and must never be handed to a task.
        """
        manager: SessionManager = app.state.db

        def record_receipt() -> None:
            with manager.session() as session:
                session.execute(_INSERT_RECEIPT, {"id": order_id})

        tasks.add_task(record_receipt)
        return {"order_id": order_id, "receipt": "queued"}

    @app.post("/payments")
    def create_payment(amount_cents: int, key: IdempotencyKey, session: SessionDep,
                       response: Response) -> dict[str, object]:
        """Store a payment once per ``Idempotency-Key``: 201 the first time, 200 on a retry.

        A client that lost the answer (timeout, dropped connection, a 503) sends the same
        request with the same key again; ``ON CONFLICT DO NOTHING`` makes the second
        insert a no-op, even when both arrive at once. The same key with another amount
        is a 422.
        """
        inserted = session.execute(_INSERT_PAYMENT, {"key": key, "amount": amount_cents}
                                   ).first() is not None
        stored = None if inserted else session.execute(_GET_PAYMENT, {"key": key}).scalar()
        return _payment_answer(response, key, amount_cents, inserted, stored)

    @app.get("/reports/slow")
    def slow_report(session: SessionDep, seconds: ReportSeconds = 1.0) -> dict[str, object]:
        """A slow query, ``seconds`` long. A ``def`` handler: FastAPI runs it in its
        threadpool, so the event loop (and ``/live``) keeps answering meanwhile; a sync
        session inside ``async def`` would block them all."""
        orders = session.execute(_SLOW_REPORT, {"seconds": seconds}).one().orders
        return {"orders": orders, "seconds": seconds}

    @app.get("/reports/feed")
    def report_feed(chunks: FeedChunks = 3,
                    seconds: ReportSeconds = 0.5) -> StreamingResponse:
        """Stream a report in ``chunks`` NDJSON lines, each one a ``seconds``-long query.

        Each chunk is read by a short session of its own, closed before the line is
        sent: between chunks the stream holds no connection. A client that hangs up
        stops the stream at the next chunk; the chunk being read runs to its end in its
        threadpool thread (a thread cannot be cancelled), then its session is closed.
        """
        manager: SessionManager = app.state.db

        def lines() -> Iterator[str]:
            for chunk in range(chunks):
                with manager.session() as session:
                    orders = session.execute(_SLOW_REPORT, {"seconds": seconds}).one().orders
                yield _feed_line(chunk, orders)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/orders/summary")
    def orders_summary(session: SessionDep, caller: Caller,
                       seconds: ReportSeconds = 0.0) -> dict[str, object]:
        """Count the orders for ``caller``: one request, one session, one connection.

        ``Caller`` reads on the request's own session (``SessionDep`` is resolved once
        per request), so the request never holds two pooled connections at once.
        """
        orders = session.execute(_SUMMARY, {"seconds": seconds}).one().orders
        return {"orders": orders, "caller": caller}

    return app


def create_async_app(settings: Settings | None = None) -> FastAPI:
    """Async twin of ``create_app``: ``AsyncSessionManager``, ``get_async_db``, asyncpg.

    Args:
        settings: The database settings; read from the environment at start-up when
            ``None``, never at import.

    Returns:
        The application, not yet started: no engine, no connection.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        require_commit_before_response(app)
        manager = AsyncSessionManager()
        manager.init(settings or Settings.from_env(env_file=".env"))
        app.state.db = manager
        app.state.metrics = ServiceMetrics.attach(manager.engine)
        try:
            async with manager.connect() as conn:
                for statement in _SCHEMA:
                    await conn.execute(text(statement))
            yield
        finally:
            await manager.close()
            app.state.metrics.detach()

    app = FastAPI(title="labkit example (async)", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(service_routes)

    @app.get("/ready")
    @app.get("/health")
    async def ready(response: Response) -> dict[str, object]:
        """Readiness: 200 when the database answers within ``READY_TIMEOUT``, else 503."""
        engine: AsyncEngine = app.state.db.engine
        report = await async_health_check(engine, timeout=READY_TIMEOUT)
        response.status_code = 200 if report.ok else 503
        return report.to_dict()

    @app.post("/orders/{order_id}", status_code=201)
    async def create_order(order_id: int, item: str,
                           session: AsyncSessionDep) -> dict[str, object]:
        """Insert an order: committed before the 201 is sent; a duplicate id is a 409."""
        await session.execute(_INSERT_ORDER, {"id": order_id, "item": item})
        return {"id": order_id, "item": item}

    @app.post("/orders/{order_id}/fail")
    async def create_then_fail(order_id: int, session: AsyncSessionDep) -> None:
        """Write, then fail: get_async_db rolls the write back."""
        await session.execute(_INSERT_ORDER, {"id": order_id, "item": "doomed"})
        raise HTTPException(status_code=500, detail="handler failed after writing")

    @app.get("/orders")
    async def list_orders(session: AsyncSessionDep) -> list[dict[str, object]]:
        rows = await session.execute(_LIST_ORDERS)
        return [{"id": r.id, "item": r.item} for r in rows]

    @app.get("/orders/export")
    async def export_orders(session: AsyncSessionDep,
                            delay: float = 0.0) -> StreamingResponse:
        """Stream every order as NDJSON; the session is closed before streaming starts."""
        rows = [{"id": r.id, "item": r.item} for r in await session.execute(_LIST_ORDERS)]
        return StreamingResponse(_paced_lines(rows, delay), media_type="application/x-ndjson")

    @app.post("/orders/{order_id}/receipt", status_code=202)
    async def send_receipt(order_id: int, tasks: BackgroundTasks) -> dict[str, object]:
        """Record the receipt after the response, in a task with its own session."""
        manager: AsyncSessionManager = app.state.db

        async def record_receipt() -> None:
            async with manager.session() as session:
                await session.execute(_INSERT_RECEIPT, {"id": order_id})

        tasks.add_task(record_receipt)
        return {"order_id": order_id, "receipt": "queued"}

    @app.post("/payments")
    async def create_payment(amount_cents: int, key: IdempotencyKey,
                             session: AsyncSessionDep,
                             response: Response) -> dict[str, object]:
        """Store a payment once per ``Idempotency-Key``: 201 the first time, 200 on a retry."""
        result = await session.execute(_INSERT_PAYMENT, {"key": key, "amount": amount_cents})
        inserted = result.first() is not None
        stored = None if inserted else (
            await session.execute(_GET_PAYMENT, {"key": key})).scalar()
        return _payment_answer(response, key, amount_cents, inserted, stored)

    @app.get("/reports/slow")
    async def slow_report(session: AsyncSessionDep,
                          seconds: ReportSeconds = 1.0) -> dict[str, object]:
        """A slow query, ``seconds`` long, awaited: the event loop serves others meanwhile."""
        row = (await session.execute(_SLOW_REPORT, {"seconds": seconds})).one()
        return {"orders": row.orders, "seconds": seconds}

    @app.get("/reports/feed")
    async def report_feed(chunks: FeedChunks = 3,
                          seconds: ReportSeconds = 0.5) -> StreamingResponse:
        """Stream a report in chunks, each read by a short session of its own.

        A client that hangs up cancels the stream (Starlette cancels it when the
        server reports the disconnect), mid-query if need be: ``async_session_scope``
        rolls back and closes the session under a shield, and a connection cancelled
        mid-query is closed by SQLAlchemy's pool instead of being returned half-used.
        """
        manager: AsyncSessionManager = app.state.db

        async def lines() -> AsyncIterator[str]:
            for chunk in range(chunks):
                async with manager.session() as session:
                    row = (await session.execute(_SLOW_REPORT, {"seconds": seconds})).one()
                yield _feed_line(chunk, row.orders)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/orders/summary")
    async def orders_summary(session: AsyncSessionDep, caller: AsyncCaller,
                             seconds: ReportSeconds = 0.0) -> dict[str, object]:
        """Count the orders for ``caller``, on the request's one session."""
        row = (await session.execute(_SUMMARY, {"seconds": seconds})).one()
        return {"orders": row.orders, "caller": caller}

    return app


# What ``uvicorn examples.fastapi_app:app`` serves. Building them opens no connection.
app = create_app()
async_app = create_async_app()
