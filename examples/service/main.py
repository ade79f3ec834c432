"""The application: routers, lifespan and error handlers put together.

Serve it from the repository root (``DATABASE_URL`` in the environment)::

    uvicorn examples.service.main:app          # sync handlers (psycopg2)
    uvicorn examples.service.main:async_app    # the async twin (asyncpg)

``app`` and ``async_app`` are built at import, which opens nothing and reads no
settings: the lifespan does that when the server starts.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from labkit import (CommitOutcomeUnknownError, DatabaseError, IntegrityError, Settings,
                    TransientError)
from labkit.errors import translate_error

from . import async_routes, routes
from . import metrics as metrics_routes
from .db import async_lifespan, lifespan
from .metrics import ServiceMetrics

logger = logging.getLogger("examples.service")


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """Answer a database error by its labkit class, and count it on ``/metrics``.

    ``IntegrityError`` (a constraint, in a statement or at COMMIT) is a 409; a
    ``TransientError`` (pool timeout, database down, connection lost) a 503 with
    ``Retry-After``; anything else a 500. A ``CommitOutcomeUnknownError`` (the answer to
    COMMIT was lost) is a 503 too, with ``"outcome": "unknown"``: the condition passes, and
    the client's rule is the one for a lost answer, send the same request again with the
    same ``Idempotency-Key``; a 500 would tell it a retry fails the same way. The body
    never carries the driver's message, which can hold SQL and data; the log keeps it.
    """
    error = translate_error(exc)
    name = type(error).__name__
    metrics: ServiceMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.count_error(name)
    if isinstance(error, IntegrityError):
        return JSONResponse(status_code=409, content={
            "error": name, "detail": "conflict: a constraint rejected the data"})
    logger.warning("%s %s failed: %s", request.method, request.url.path, error)
    if isinstance(error, CommitOutcomeUnknownError):
        return JSONResponse(status_code=503, headers={"Retry-After": "1"}, content={
            "error": name, "outcome": "unknown", "detail": "the answer to COMMIT was lost: "
            "the write may be stored; retry with the same Idempotency-Key"})
    if isinstance(error, TransientError):
        return JSONResponse(status_code=503, headers={"Retry-After": "1"}, content={
            "error": name, "detail": "the database is unavailable or overloaded; retry later"})
    return JSONResponse(status_code=500, content={
        "error": name, "detail": "a database error ended the request"})


def install_error_handlers(app: FastAPI) -> None:
    """Send SQLAlchemy's and labkit's errors to ``database_error``."""
    app.add_exception_handler(sa_exc.SQLAlchemyError, database_error)
    app.add_exception_handler(DatabaseError, database_error)


def _app(title: str, lifespan_: Any, routers: Any, settings: Settings | None) -> FastAPI:
    app = FastAPI(title=title, lifespan=lifespan_)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(metrics_routes.router)
    for router in routers:
        app.include_router(router)
    return app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The sync application; ``settings`` default to ``Settings.from_env()`` at start-up."""
    return _app("labkit example", lifespan, routes.routers, settings)


def create_async_app(settings: Settings | None = None) -> FastAPI:
    """The async twin of ``create_app``: ``AsyncSessionManager``, asyncpg."""
    return _app("labkit example (async)", async_lifespan, async_routes.routers, settings)


app = create_app()
async_app = create_async_app()
