"""A FastAPI service on labkit: lifespan, one session per request, ``/health``.

Run it from the repository root (``DATABASE_URL`` from the environment or ``.env``)::

    uvicorn examples.fastapi_app:app          # sync handlers, get_db
    uvicorn examples.fastapi_app:async_app    # the async twin, get_async_db

Nothing connects at import, nor reads the environment: ``app`` and ``async_app`` are
built by ``create_app`` and ``create_async_app``; the engine is created when the
application starts, from ``Settings.from_env(env_file=".env")``, and disposed of when
it stops.

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

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import labkit
from labkit import (
    AsyncSessionManager,
    SessionManager,
    Settings,
    async_health_check,
    get_async_db,
    get_db,
    health_check,
)

__all__ = [
    "AsyncSessionDep",
    "HEALTH_TIMEOUT",
    "SessionDep",
    "app",
    "async_app",
    "create_app",
    "create_async_app",
    "install_error_handlers",
    "require_commit_before_response",
]

HEALTH_TIMEOUT = 2.0

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
)
_INSERT_ORDER = text("INSERT INTO example_orders (id, item) VALUES (:id, :item)")
_LIST_ORDERS = text("SELECT id, item FROM example_orders ORDER BY id")


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


async def _integrity_conflict(request: Request, exc: Exception) -> JSONResponse:
    """Answer 409 when a constraint rejects the data, in a statement or at COMMIT."""
    return JSONResponse(status_code=409, content={
        "error": "IntegrityError", "detail": "conflict: a constraint rejected the data"})


def install_error_handlers(app: FastAPI) -> None:
    """Map ``IntegrityError`` to 409, whether a statement or the COMMIT raised it.

    SQLAlchemy's class is what a failed COMMIT raises; labkit's is what code inside
    ``translating_errors`` raises. Every other error stays a 500.
    """
    app.add_exception_handler(sa_exc.IntegrityError, _integrity_conflict)
    app.add_exception_handler(labkit.IntegrityError, _integrity_conflict)


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
        try:
            with manager.connect() as conn:
                for statement in _SCHEMA:
                    conn.execute(text(statement))
            yield
        finally:
            manager.close()

    app = FastAPI(title="labkit example", lifespan=lifespan)
    install_error_handlers(app)

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

    @app.get("/health")
    def health(response: Response) -> dict[str, object]:
        """Readiness: 200 when the database answers within the timeout, else 503."""
        report = health_check(app.state.db.engine, timeout=HEALTH_TIMEOUT)
        response.status_code = 200 if report.ok else 503
        return report.to_dict()

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
        try:
            async with manager.connect() as conn:
                for statement in _SCHEMA:
                    await conn.execute(text(statement))
            yield
        finally:
            await manager.close()

    app = FastAPI(title="labkit example (async)", lifespan=lifespan)
    install_error_handlers(app)

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

    @app.get("/health")
    async def health(response: Response) -> dict[str, object]:
        """Readiness: 200 when the database answers within the timeout, else 503."""
        report = await async_health_check(app.state.db.engine, timeout=HEALTH_TIMEOUT)
        response.status_code = 200 if report.ok else 503
        return report.to_dict()

    return app


# What ``uvicorn examples.fastapi_app:app`` serves. Building them opens no connection.
app = create_app()
async_app = create_async_app()
