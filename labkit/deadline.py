"""Client-side statement deadlines (psycopg2, psycopg 3): bound a dead or hung server.

Optional. ``statement_timeout`` is the server's, and a hung server enforces nothing; TCP
keepalives do not notice a server that still ACKs. ``bound_statements(engine, seconds)``
gives every statement a deadline: at the deadline the connection's socket is cut, the
statement fails with ``QueryTimeoutError`` and the pool discards the connection.
``COMMIT`` and ``ROLLBACK`` are not statements SQLAlchemy has events around, so they
are not bounded here: TCP keepalives and ``tcp_user_timeout`` are their only bound.

Set the deadline well above ``statement_timeout`` so the server cancels first. A
statement allowed to run longer names its own deadline, which then holds alone:

```python
bound_statements(engine, 10.0)
with engine.connect() as conn:
    conn.execute(text("SET LOCAL statement_timeout = '120s'"))
    conn.execution_options(deadline=130.0).execute(text("SELECT slow_report()"))
```

An ``executemany`` (what the ORM does when it flushes many rows) gets the deadline per
parameter set, never one deadline for the whole batch. For psycopg 3 behind an async
engine, pass ``engine.sync_engine``. asyncpg has its own deadline instead:
``create_async_engine(settings, connect_args={"command_timeout": seconds})``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from . import watchdog
from .errors import QueryTimeoutError

__all__ = ["DEADLINE_OPTION", "bound_statements"]

DEADLINE_OPTION = "deadline"  # execution option: this statement's deadline in seconds
_KEY = "labkit_deadline_ticket"


def bound_statements(engine: Engine, seconds: float) -> None:
    """Give every statement of a psycopg2 or psycopg 3 engine (an async one's
    ``sync_engine``) a client-side deadline of ``seconds``.

    Raises ``QueryTimeoutError`` from the statement whose answer did not come in time.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if engine.dialect.driver == "asyncpg":
        raise ValueError("asyncpg has a deadline of its own: create_async_engine(settings, "
                         "connect_args={'command_timeout': seconds})")

    @event.listens_for(engine, "before_cursor_execute")
    def arm(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
            executemany: bool) -> None:
        limit = conn.get_execution_options().get(DEADLINE_OPTION, seconds)
        if limit is None:
            return
        if executemany and isinstance(parameters, (list, tuple)):
            limit *= max(1, len(parameters))
        dbapi = conn.connection.dbapi_connection  # psycopg 3's async one: its driver's socket
        conn.info[_KEY] = (watchdog.arm(getattr(dbapi, "driver_connection", dbapi).fileno(),
                                        limit), limit)

    @event.listens_for(engine, "after_cursor_execute")
    def disarm(conn: Any, *_: Any) -> None:
        armed = conn.info.pop(_KEY, None)
        if armed is not None:
            armed[0].disarm()

    @event.listens_for(engine, "handle_error")
    def timed_out(context: Any) -> Any:
        conn = context.connection
        armed = conn.info.pop(_KEY, None) if conn is not None else None
        if armed is None or not armed[0].disarm():
            return None
        context.is_disconnect = True  # the socket is cut: discard this connection only
        context.invalidate_pool_on_disconnect = False
        error = QueryTimeoutError(
            f"The statement got no answer within {armed[1]:g} s (labkit.deadline): the "
            "server or the network stopped answering, and the connection was closed. A "
            "statement that may run longer names its own deadline: "
            f"conn.execution_options({DEADLINE_OPTION}=seconds), or None for none.")
        error.__cause__ = context.original_exception
        return error
