"""The async twin of ``routes.py``: ``async def`` handlers on an ``AsyncSession`` (asyncpg).

Same paths, same statements, same answers. An ``await`` on the database lets the event
loop serve other requests; a sync ``Session`` here would block them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Response
from fastapi.responses import StreamingResponse

from labkit import async_health_check
from labkit.web import AsyncSessionManager

from .db import AsyncManagerDep, AsyncSessionDep
from .routes import (
    CALLER,
    GET_PAYMENT,
    INSERT_ORDER,
    INSERT_PAYMENT,
    INSERT_RECEIPT,
    LIST_ORDERS,
    READY_TIMEOUT,
    SLOW_REPORT,
    FeedChunks,
    IdempotencyKey,
    ReportSeconds,
    feed_line,
    live,
    paced_lines,
    payment_answer,
)

probes = APIRouter(tags=["probes"])
probes.add_api_route("/live", live)  # the same liveness handler: it never awaits the database


@probes.get("/ready")
async def ready(manager: AsyncManagerDep, response: Response) -> dict[str, object]:
    """Readiness: 200 when the database answers within ``READY_TIMEOUT``, else 503."""
    report = await async_health_check(manager.engine, timeout=READY_TIMEOUT)
    response.status_code = 200 if report.ok else 503
    return report.to_dict()


orders = APIRouter(prefix="/orders", tags=["orders"])


async def get_caller(session: AsyncSessionDep) -> str:
    """The database role serving the request, read on the request's session."""
    return str((await session.execute(CALLER)).scalar_one())


Caller = Annotated[str, Depends(get_caller)]


@orders.post("/{order_id}", status_code=201)
async def create_order(order_id: int, item: str,
                       session: AsyncSessionDep) -> dict[str, object]:
    """Insert an order: committed before the 201 is sent; a duplicate id is a 409."""
    await session.execute(INSERT_ORDER, {"id": order_id, "item": item})
    return {"id": order_id, "item": item}


@orders.post("/{order_id}/fail")
async def create_then_fail(order_id: int, session: AsyncSessionDep) -> None:
    """Write, then fail: nothing is committed."""
    await session.execute(INSERT_ORDER, {"id": order_id, "item": "doomed"})
    raise HTTPException(status_code=500, detail="handler failed after writing")


@orders.get("")
async def list_orders(session: AsyncSessionDep) -> list[dict[str, object]]:
    return [{"id": r.id, "item": r.item} for r in await session.execute(LIST_ORDERS)]


@orders.get("/export")
async def export_orders(session: AsyncSessionDep, delay: float = 0.0) -> StreamingResponse:
    """Stream every order as NDJSON; the session is closed before streaming starts."""
    rows = [{"id": r.id, "item": r.item} for r in await session.execute(LIST_ORDERS)]
    return StreamingResponse(paced_lines(rows, delay), media_type="application/x-ndjson")


@orders.get("/summary")
async def orders_summary(session: AsyncSessionDep, caller: Caller,
                         seconds: ReportSeconds = 0.0) -> dict[str, object]:
    """Count the orders for ``caller``, on the request's one session."""
    row = (await session.execute(SLOW_REPORT, {"seconds": seconds})).one()
    return {"orders": row.orders, "caller": caller}


async def record_receipt(manager: AsyncSessionManager, order_id: int) -> None:
    """A background task: its own session (the request's is closed when it runs)."""
    async with manager.session() as session:
        await session.execute(INSERT_RECEIPT, {"id": order_id})


@orders.post("/{order_id}/receipt", status_code=202)
async def send_receipt(order_id: int, manager: AsyncManagerDep,
                       tasks: BackgroundTasks) -> dict[str, object]:
    """Answer 202, then record the receipt in a background task with its own session."""
    tasks.add_task(record_receipt, manager, order_id)
    return {"order_id": order_id, "receipt": "queued"}


payments = APIRouter(prefix="/payments", tags=["payments"])


@payments.post("")
async def create_payment(amount_cents: int, key: IdempotencyKey, session: AsyncSessionDep,
                         response: Response) -> dict[str, object]:
    """Store a payment once per ``Idempotency-Key``: 201 the first time, 200 on a retry."""
    result = await session.execute(INSERT_PAYMENT, {"key": key, "amount": amount_cents})
    inserted = result.first() is not None
    stored = None if inserted else (await session.execute(GET_PAYMENT, {"key": key})).scalar()
    return payment_answer(response, key, amount_cents, inserted, stored)


reports = APIRouter(prefix="/reports", tags=["reports"])


@reports.get("/slow")
async def slow_report(session: AsyncSessionDep,
                      seconds: ReportSeconds = 1.0) -> dict[str, object]:
    """A query ``seconds`` long, awaited: the event loop serves others meanwhile."""
    row = (await session.execute(SLOW_REPORT, {"seconds": seconds})).one()
    return {"orders": row.orders, "seconds": seconds}


@reports.get("/feed")
async def report_feed(manager: AsyncManagerDep, chunks: FeedChunks = 3,
                      seconds: ReportSeconds = 0.5) -> StreamingResponse:
    """Stream a report in chunks, each read by a short session of its own.

    A client that hangs up cancels the stream (Starlette does, when the server reports
    the disconnect), mid-query if need be: ``manager.session()`` rolls back and closes
    under a shield, and the pool closes a connection cancelled mid-query.
    """
    async def lines() -> AsyncIterator[str]:
        for chunk in range(chunks):
            async with manager.session() as session:
                row = (await session.execute(SLOW_REPORT, {"seconds": seconds})).one()
            yield feed_line(chunk, row.orders)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


routers = (probes, orders, payments, reports)
