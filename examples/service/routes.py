"""The service's routes, sync: ``def`` handlers on a ``Session`` (psycopg2).

FastAPI runs ``def`` handlers in its threadpool, so a slow query never blocks the event
loop. Every handler that needs the database takes ``SessionDep``; work that outlives the
request (a background task, a stream read chunk by chunk) takes the manager instead and
opens short sessions of its own. ``async_routes.py`` is the async twin.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Header, HTTPException, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import text

from labkit import health_check
from labkit.web import SessionManager

from .db import ManagerDep, SessionDep

# /ready answers within this many seconds however the database is broken (the probe's
# socket is cut at the deadline); an orchestrator's probe timeout should be longer.
READY_TIMEOUT = 2.0
MAX_REPORT_SECONDS = 5.0
MAX_FEED_CHUNKS = 100

INSERT_ORDER = text("INSERT INTO example_orders (id, item) VALUES (:id, :item)")
LIST_ORDERS = text("SELECT id, item FROM example_orders ORDER BY id")
INSERT_RECEIPT = text("INSERT INTO example_receipts (order_id) VALUES (:id) "
                      "ON CONFLICT (order_id) DO NOTHING")
# One statement decides who stores the payment: a concurrent duplicate waits for the
# first transaction, then does nothing. Nothing returned means "already there".
INSERT_PAYMENT = text("INSERT INTO example_payments (idempotency_key, amount_cents) "
                      "VALUES (:key, :amount) ON CONFLICT (idempotency_key) DO NOTHING "
                      "RETURNING idempotency_key")
GET_PAYMENT = text("SELECT amount_cents FROM example_payments WHERE idempotency_key = :key")
SLOW_REPORT = text("SELECT pg_sleep(:seconds), count(*) AS orders FROM example_orders")
CALLER = text("SELECT current_user")

IdempotencyKey = Annotated[str, Header(alias="Idempotency-Key", min_length=1, max_length=200)]
ReportSeconds = Annotated[float, Query(ge=0, le=MAX_REPORT_SECONDS)]
FeedChunks = Annotated[int, Query(ge=1, le=MAX_FEED_CHUNKS)]


# --- helpers both twins use -------------------------------------------------------------

async def paced_lines(rows: list[dict[str, object]], delay: float) -> AsyncIterator[bytes]:
    """Yield one NDJSON line per row, ``delay`` seconds apart (a slow feed or client)."""
    for number, row in enumerate(rows):
        if number and delay > 0:
            await asyncio.sleep(delay)
        yield (json.dumps(row) + "\n").encode()


def feed_line(chunk: int, orders: int) -> str:
    return json.dumps({"chunk": chunk, "orders": orders}) + "\n"


def payment_answer(response: Response, key: str, amount_cents: int,
                   inserted: bool, stored: int | None) -> dict[str, object]:
    """201 for a new payment, 200 for a retry of a stored one, 422 for a reused key."""
    if not inserted and stored != amount_cents:
        raise HTTPException(status_code=422, detail="this Idempotency-Key was used for "
                            "a different payment")
    response.status_code = 201 if inserted else 200
    return {"idempotency_key": key, "amount_cents": amount_cents, "replayed": not inserted}


# --- probes: /live never touches the database, /ready does, with a deadline ---------------

probes = APIRouter(tags=["probes"])


@probes.get("/live")
async def live() -> dict[str, str]:
    """Liveness: the process and its event loop answer. ``async def``: it needs no
    threadpool thread, and a database outage never gets the service restarted."""
    return {"status": "alive"}


@probes.get("/ready")
def ready(manager: ManagerDep, response: Response) -> dict[str, object]:
    """Readiness: 200 when the database answers within ``READY_TIMEOUT``, else 503.

    The probe uses a connection of its own, never one of the pool's: a saturated pool is
    reported (``pool_saturated``) but does not fail readiness.
    """
    report = health_check(manager.engine, timeout=READY_TIMEOUT)
    response.status_code = 200 if report.ok else 503
    return report.to_dict()


# --- orders -------------------------------------------------------------------------------

orders = APIRouter(prefix="/orders", tags=["orders"])


# A dependency that needs the database takes the request's session: FastAPI resolves
# SessionDep once per request, so the handler and its dependencies share one connection.
# One that opened a session of its own would hold a second connection per request.
def get_caller(session: SessionDep) -> str:
    """The database role serving the request (a stand-in for loading the user)."""
    return str(session.execute(CALLER).scalar_one())


Caller = Annotated[str, Depends(get_caller)]


@orders.post("/{order_id}", status_code=201)
def create_order(order_id: int, item: str, session: SessionDep) -> dict[str, object]:
    """Insert an order: committed before the 201 is sent; a duplicate id is a 409."""
    session.execute(INSERT_ORDER, {"id": order_id, "item": item})
    return {"id": order_id, "item": item}


@orders.post("/{order_id}/fail")
def create_then_fail(order_id: int, session: SessionDep) -> None:
    """Write, then fail: nothing is committed."""
    session.execute(INSERT_ORDER, {"id": order_id, "item": "doomed"})
    raise HTTPException(status_code=500, detail="handler failed after writing")


@orders.get("")
def list_orders(session: SessionDep) -> list[dict[str, object]]:
    return [{"id": r.id, "item": r.item} for r in session.execute(LIST_ORDERS)]


@orders.get("/export")
def export_orders(session: SessionDep, delay: float = 0.0) -> StreamingResponse:
    """Stream every order as NDJSON, ``delay`` seconds apart.

    The rows are read while the handler runs; the session is committed and closed before
    the first byte is sent, so a slow client holds a socket, not a pooled connection.
    """
    rows = [{"id": r.id, "item": r.item} for r in session.execute(LIST_ORDERS)]
    return StreamingResponse(paced_lines(rows, delay), media_type="application/x-ndjson")


@orders.get("/summary")
def orders_summary(session: SessionDep, caller: Caller,
                   seconds: ReportSeconds = 0.0) -> dict[str, object]:
    """Count the orders for ``caller``: one request, one session, one connection."""
    count = session.execute(SLOW_REPORT, {"seconds": seconds}).one().orders
    return {"orders": count, "caller": caller}


def record_receipt(manager: SessionManager, order_id: int) -> None:
    """A background task: its own session (the request's is closed when it runs)."""
    with manager.session() as session:
        session.execute(INSERT_RECEIPT, {"id": order_id})


@orders.post("/{order_id}/receipt", status_code=202)
def send_receipt(order_id: int, manager: ManagerDep,
                 tasks: BackgroundTasks) -> dict[str, object]:
    """Answer 202, then record the receipt in a background task with its own session."""
    tasks.add_task(record_receipt, manager, order_id)
    return {"order_id": order_id, "receipt": "queued"}


# --- payments -----------------------------------------------------------------------------

payments = APIRouter(prefix="/payments", tags=["payments"])


@payments.post("")
def create_payment(amount_cents: int, key: IdempotencyKey, session: SessionDep,
                   response: Response) -> dict[str, object]:
    """Store a payment once per ``Idempotency-Key``: 201 the first time, 200 on a retry.

    A client that lost the answer sends the same request with the same key again;
    ``ON CONFLICT DO NOTHING`` makes the second insert a no-op, even when both arrive at
    once. The same key with another amount is a 422.
    """
    inserted = session.execute(INSERT_PAYMENT, {"key": key, "amount": amount_cents}
                               ).first() is not None
    stored = None if inserted else session.execute(GET_PAYMENT, {"key": key}).scalar()
    return payment_answer(response, key, amount_cents, inserted, stored)


# --- reports ------------------------------------------------------------------------------

reports = APIRouter(prefix="/reports", tags=["reports"])


@reports.get("/slow")
def slow_report(session: SessionDep, seconds: ReportSeconds = 1.0) -> dict[str, object]:
    """A query ``seconds`` long. A ``def`` handler runs in the threadpool: the event loop
    (and ``/live``) keeps answering meanwhile."""
    count = session.execute(SLOW_REPORT, {"seconds": seconds}).one().orders
    return {"orders": count, "seconds": seconds}


@reports.get("/feed")
def report_feed(manager: ManagerDep, chunks: FeedChunks = 3,
                seconds: ReportSeconds = 0.5) -> StreamingResponse:
    """Stream a report in ``chunks`` NDJSON lines, each one a ``seconds``-long query.

    Each chunk is read by a short session of its own, closed before its line is sent:
    between chunks the stream holds no connection.
    """
    def lines() -> Iterator[str]:
        for chunk in range(chunks):
            with manager.session() as session:
                count = session.execute(SLOW_REPORT, {"seconds": seconds}).one().orders
            yield feed_line(chunk, count)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


routers = (probes, orders, payments, reports)
