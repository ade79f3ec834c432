"""A FastAPI service using labkit: session manager in the lifespan, get_db, /health.

Run it against the kit's database::

    DATABASE_URL=... uvicorn examples.fastapi_app:app      # or create_app(settings)

Nothing connects at import: ``app`` is built by :func:`create_app`, and the engine is
created when the application starts and disposed of when it stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Response
from sqlalchemy import text
from sqlalchemy.orm import Session

from labkit import IntegrityError, SessionManager, Settings, get_db, health_check
from labkit.errors import translating_errors

HEALTH_TIMEOUT = 2.0
SessionDep = Annotated[Session, Depends(get_db)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; ``settings`` default to ``Settings.from_env(env_file='.env')``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = SessionManager()
        manager.init(settings or Settings.from_env(env_file=".env"))
        app.state.db = manager
        with manager.connect() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS example_orders "
                              "(id int PRIMARY KEY, item text NOT NULL)"))
        yield
        manager.close()

    app = FastAPI(title="labkit example", lifespan=lifespan)

    @app.post("/orders/{order_id}", status_code=201)
    def create_order(order_id: int, item: str, session: SessionDep) -> dict[str, object]:
        """Insert an order; committed by get_db after this returns."""
        try:
            with translating_errors():
                session.execute(text("INSERT INTO example_orders VALUES (:id, :item)"),
                                {"id": order_id, "item": item})
                session.flush()
        except IntegrityError:
            raise HTTPException(status_code=409, detail=f"order {order_id} exists") from None
        return {"id": order_id, "item": item}

    @app.post("/orders/{order_id}/fail")
    def create_then_fail(order_id: int, session: SessionDep) -> None:
        """Write, then fail: get_db rolls the write back."""
        session.execute(text("INSERT INTO example_orders VALUES (:id, 'doomed')"),
                        {"id": order_id})
        raise HTTPException(status_code=500, detail="handler failed after writing")

    @app.get("/orders")
    def list_orders(session: SessionDep) -> list[dict[str, object]]:
        rows = session.execute(text("SELECT id, item FROM example_orders ORDER BY id"))
        return [{"id": r.id, "item": r.item} for r in rows]

    @app.get("/health")
    def health(response: Response) -> dict[str, object]:
        """Readiness: 200 when the database answers within the timeout, else 503."""
        report = health_check(app.state.db.engine, timeout=HEALTH_TIMEOUT)
        response.status_code = 200 if report.ok else 503
        return report.to_dict()

    return app
