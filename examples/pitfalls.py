"""The same service with the session's scope left at FastAPI's default: not for copying.

Notebook 05 and the tests serve this next to ``examples.service`` to measure what
the default costs. The only difference is the dependency: plain ``Depends(get_db)``,
whose scope is ``"request"`` for a dependency with ``yield`` (FastAPI 0.118 and later).
Its code after ``yield`` (the COMMIT, then closing the session) runs *after the response
has been sent*:

- ``POST /orders/{id}`` answers 201 before the COMMIT; a COMMIT that then fails (a
  deferred constraint) leaves the client with a 201 and no row;
- ``GET /orders/export?delay=...`` keeps its session, and the session's pooled
  connection, checked out until the last byte of the stream has been sent: every slow
  client holds one connection, and the pool runs out.

Three more mistakes, of other kinds:

- ``GET /reports/slow`` runs a *sync* session inside an ``async def`` handler. The query
  blocks the event loop for its whole duration, and every other request of the process,
  ``/live`` included, waits for it.
- ``POST /orders/{id}/receipt`` hands the request's session to a background task. The
  task runs after ``get_db`` has committed and closed that session: its write starts a
  new transaction that nobody commits, and is rolled back when the session is garbage
  collected. The client got its 202; the receipt is never stored.
- ``GET /orders/summary`` takes a dependency (``OwnSessionCaller``) that opens a session
  of its own and holds it for the request, next to the request's ``SessionDep``: every
  request needs two pooled connections at once. With as many concurrent requests as the
  pool has connections, each holds one and waits for a second that never frees: nothing
  moves until ``pool_timeout``, then 503s.

Run it with ``uvicorn examples.pitfalls:create_pitfall_app --factory``.

``create_cancellation_app`` is a small async service of another kind: a stream that
keeps its session open, idle in a transaction, across an ``await`` that is not the
database, to compare clean-ups that a disconnect cancels (``GET /reports/held``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from examples.service import metrics
from examples.service.db import (
    AsyncManagerDep,
    ManagerDep,
    SessionDep,
    async_lifespan,
    lifespan,
)
from examples.service.main import install_error_handlers
from examples.service.routes import (
    CALLER,
    INSERT_ORDER,
    INSERT_RECEIPT,
    LIST_ORDERS,
    SLOW_REPORT,
    ReportSeconds,
    live,
    paced_lines,
)
from labkit import Settings
from labkit.web import SessionManager, get_db

__all__ = ["OwnSessionCaller", "RequestScopedSessionDep", "create_cancellation_app",
           "create_pitfall_app"]

# The trap: no scope="function". Commit and close run after the response is sent.
RequestScopedSessionDep = Annotated[Session, Depends(get_db)]


def get_caller_own_session(request: Request) -> Iterator[str]:
    """The trap: a dependency with a session of its own, held until the request ends."""
    manager: SessionManager = request.app.state.db
    with manager.session() as session:
        yield str(session.execute(CALLER).scalar_one())


OwnSessionCaller = Annotated[str, Depends(get_caller_own_session)]

pitfalls = APIRouter()
pitfalls.add_api_route("/live", live)


@pitfalls.post("/orders/{order_id}", status_code=201)
def create_order(order_id: int, item: str,
                 session: RequestScopedSessionDep) -> dict[str, object]:
    """Answered 201 before the COMMIT runs."""
    session.execute(INSERT_ORDER, {"id": order_id, "item": item})
    return {"id": order_id, "item": item}


@pitfalls.get("/orders/export")
def export_orders(session: RequestScopedSessionDep, delay: float = 0.0) -> StreamingResponse:
    """The same code as the reference route; the connection is held while streaming."""
    rows = [{"id": r.id, "item": r.item} for r in session.execute(LIST_ORDERS)]
    return StreamingResponse(paced_lines(rows, delay), media_type="application/x-ndjson")


@pitfalls.post("/orders/{order_id}/receipt", status_code=202)
def send_receipt(order_id: int, tasks: BackgroundTasks,
                 session: SessionDep) -> dict[str, object]:
    """The request's session, used by a task that runs after it was committed and closed."""

    def record_receipt() -> None:
        session.execute(INSERT_RECEIPT, {"id": order_id})

    tasks.add_task(record_receipt)
    return {"order_id": order_id, "receipt": "queued"}


@pitfalls.get("/reports/slow")
async def slow_report(manager: ManagerDep, seconds: ReportSeconds = 1.0) -> dict[str, object]:
    """A sync session in ``async def``: the event loop stops for ``seconds``."""
    with manager.session() as session:
        orders = session.execute(SLOW_REPORT, {"seconds": seconds}).one().orders
    return {"orders": orders, "seconds": seconds}


@pitfalls.get("/orders/summary")
def orders_summary(session: SessionDep, caller: OwnSessionCaller,
                   seconds: ReportSeconds = 0.0) -> dict[str, object]:
    """Two connections per request: the dependency's, then the handler's."""
    orders = session.execute(SLOW_REPORT, {"seconds": seconds}).one().orders
    return {"orders": orders, "caller": caller}


def create_pitfall_app(settings: Settings | None = None) -> FastAPI:
    """Build the pitfall service, with the reference service's lifespan and ``/metrics``.

    Args:
        settings: The database settings; read from the environment at start-up when
            ``None``.
    """
    app = FastAPI(title="labkit pitfalls", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(metrics.router)
    app.include_router(pitfalls)
    return app


CleanUp = Literal["session_scope", "anyio_shield", "unshielded"]

cancellation = APIRouter()


@cancellation.get("/reports/held")
async def held(manager: AsyncManagerDep, cleanup: CleanUp,
               seconds: ReportSeconds = 1.0) -> StreamingResponse:
    """A stream holding its session idle in a transaction while it awaits ``seconds``."""

    async def lines() -> AsyncIterator[str]:
        if cleanup == "session_scope":
            async with manager.session() as session:
                await session.execute(text("SELECT 1"))
                await asyncio.sleep(seconds)
        else:
            session = manager.factory()
            try:
                await session.execute(text("SELECT 1"))
                await asyncio.sleep(seconds)
            finally:
                if cleanup == "anyio_shield":
                    with anyio.CancelScope(shield=True):
                        await session.close()
                else:
                    await session.close()  # cancelled again at its first await
        yield "done\n"

    return StreamingResponse(lines(), media_type="text/plain")


def create_cancellation_app(settings: Settings | None = None) -> FastAPI:
    """Build an async service whose stream is cancelled with its session idle in a transaction.

    ``GET /reports/held?cleanup=...&seconds=...`` opens a session, runs a statement (the
    transaction begins), then awaits ``seconds`` of something that is not the database
    (another service, a pacing delay) before its one line. A client that hangs up
    meanwhile makes Starlette cancel the stream there, and the clean-up runs inside the
    cancelled anyio scope, where every unshielded ``await`` is cancelled again:

    - ``session_scope``: labkit's ``manager.session()``, rollback and close under
      ``asyncio.shield``;
    - ``anyio_shield``: ``finally`` with ``anyio.CancelScope(shield=True)`` around
      ``await session.close()``;
    - ``unshielded``: ``finally: await session.close()``, the code that looks right.

    Args:
        settings: The database settings; read from the environment at start-up when
            ``None``.
    """
    app = FastAPI(title="labkit cancelled clean-ups", lifespan=async_lifespan)
    app.state.settings = settings
    app.include_router(metrics.router)
    app.include_router(cancellation)
    return app
