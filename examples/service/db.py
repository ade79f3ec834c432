"""The service's database: one engine per application, one session per request.

Nothing here connects, or reads the environment, at import. The lifespan does, when the
application starts: it reads ``Settings.from_env()`` (unless ``create_app`` was given
settings), creates the engine, waits for the database, checks the connection budget and
creates the tables; at shutdown it disposes of the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from labkit import Settings, async_wait_for_database, wait_for_database
from labkit.sizing import async_check_connection_budget, check_connection_budget
from labkit.web import AsyncSessionManager, SessionManager, get_async_db, get_db

from .metrics import ServiceMetrics

# The session a handler takes. scope="function": get_db commits when the handler
# returns, *before* the response is sent, so a COMMIT that fails is answered with an
# error, never with a 2xx. (FastAPI's default for a dependency with yield, "request",
# would commit after the response.) tests/test_fastapi_example.py checks every route.
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_db, scope="function")]


def get_manager(request: Request) -> SessionManager:
    """The application's ``SessionManager``: for work that outlives the request's session
    (a background task, a stream read in chunks), which opens its own with
    ``manager.session()``."""
    manager: SessionManager = request.app.state.db
    return manager


def get_async_manager(request: Request) -> AsyncSessionManager:
    """Async twin of ``get_manager``."""
    manager: AsyncSessionManager = request.app.state.db
    return manager


ManagerDep = Annotated[SessionManager, Depends(get_manager)]
AsyncManagerDep = Annotated[AsyncSessionManager, Depends(get_async_manager)]

# A real service creates its tables with migrations; the example keeps it to one place.
# Every worker runs the lifespan, and concurrent CREATE TABLE IF NOT EXISTS can collide
# in the catalog: a transaction-scoped advisory lock takes them one at a time.
SCHEMA = (
    "SELECT pg_advisory_xact_lock(7411001)",
    "CREATE TABLE IF NOT EXISTS example_orders (id int PRIMARY KEY, item text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS example_receipts (order_id int PRIMARY KEY, "
    "sent_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS example_payments (idempotency_key text PRIMARY KEY, "
    "amount_cents int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
)


def _settings(app: FastAPI) -> Settings:
    """The settings ``create_app`` was given, else the environment's (read now)."""
    return getattr(app.state, "settings", None) or Settings.from_env()


def prepare(manager: SessionManager, settings: Settings) -> None:
    """Wait for the database (30 s at most), check the connection budget, create tables."""
    wait_for_database(manager.engine)
    check_connection_budget(manager.engine, settings)  # logs a warning when over
    with manager.connect() as conn:
        for statement in SCHEMA:
            conn.execute(text(statement))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database when the application starts, close it when it stops."""
    manager = SessionManager()
    settings = _settings(app)
    manager.init(settings)
    app.state.db = manager
    app.state.metrics = ServiceMetrics(manager.engine)  # before the engine serves traffic
    try:
        await asyncio.to_thread(prepare, manager, settings)  # blocking: off the event loop
        yield
    finally:
        manager.close()
        app.state.metrics.close()


@asynccontextmanager
async def async_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Async twin of ``lifespan``: ``AsyncSessionManager`` (asyncpg)."""
    manager = AsyncSessionManager()
    settings = _settings(app)
    manager.init(settings)
    app.state.db = manager
    app.state.metrics = ServiceMetrics(manager.engine)
    try:
        await async_wait_for_database(manager.engine)
        await async_check_connection_budget(manager.engine, settings)  # warns when over
        async with manager.connect() as conn:
            for statement in SCHEMA:
                await conn.execute(text(statement))
        yield
    finally:
        await manager.close()
        app.state.metrics.close()
