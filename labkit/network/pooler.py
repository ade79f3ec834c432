"""Engines for a transaction-mode pooler (PgBouncer ``pool_mode = transaction``; optional).

Consecutive transactions of one client connection may run on different server
connections, so nothing may be left on a server connection: no session state at connect
(PgBouncer refuses unknown startup parameters such as ``options``), the statement timeout
set per transaction with ``SET LOCAL``, and no prepared statement kept: asyncpg's neither
cached nor reused by name ("prepared statement ... already exists"), psycopg 3's never
prepared (``prepare_threshold=None``). psycopg2 prepares none and needs nothing else.

```python
engine = labkit.network.pooler.create_async_engine(Settings(url=BOUNCER_URL, statement_timeout_ms=5000))
```
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import engine as _engine
from ..config import Settings
from ..errors import ConfigurationError

__all__ = ["ASYNCPG_ARGS", "PSYCOPG_ARGS", "create_async_engine", "create_engine"]


def _statement_name() -> str:
    # Unique across processes: the next transaction may run where another client prepared.
    return f"__labkit_{uuid.uuid4().hex}__"


ASYNCPG_ARGS: dict[str, Any] = {"statement_cache_size": 0, "prepared_statement_cache_size": 0,
                                "prepared_statement_name_func": _statement_name}
PSYCOPG_ARGS: dict[str, Any] = {"prepare_threshold": None}  # psycopg 3, sync and async


def _prepare(settings: Settings, engine: Engine) -> None:
    timeout = settings.statement_timeout_ms
    if timeout is None:
        return

    @event.listens_for(engine, "begin")
    def set_local_timeout(conn: Connection) -> None:
        # Through the driver's cursor: it opens the transaction SET LOCAL ends with.
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(f"SET LOCAL statement_timeout = {int(timeout)}")
        finally:
            cursor.close()


def _check(settings: Settings) -> Settings:
    if "options" in settings.url.query:
        raise ConfigurationError(
            "behind a transaction-mode pooler the URL's 'options' would be sent at connect "
            "time, which PgBouncer refuses; set them on the role (ALTER ROLE ... SET)")
    return settings.replace(statement_timeout_ms=None)  # per transaction instead


def create_engine(settings: Settings, **overrides: Any) -> Engine:
    """``labkit.create_engine`` for a pooler: the statement timeout set per transaction."""
    if settings.driver == "psycopg":
        overrides["connect_args"] = {**PSYCOPG_ARGS, **overrides.get("connect_args", {})}
    engine = _engine.create_engine(_check(settings), **overrides)
    _prepare(settings, engine)
    return engine


def create_async_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """``labkit.create_async_engine`` for a pooler: no statement cache, unique names."""
    ours = PSYCOPG_ARGS if settings.driver == "psycopg" else ASYNCPG_ARGS
    connect_args = {**ours, **overrides.pop("connect_args", {})}
    engine = _engine.create_async_engine(_check(settings), connect_args=connect_args,
                                         **overrides)
    _prepare(settings, engine.sync_engine)
    return engine
