"""Every private attribute of SQLAlchemy or a driver that labkit reads, in one place.

Each is used only where no event or public API gives the same, and was checked against
SQLAlchemy 2.1.9 and asyncpg 0.32.0 (the lower bounds in ``requirements.txt``; the
core's tests run on them). Each degrades to "unknown" (``None``) if it disappears.
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool


def pool_creator(engine: Engine) -> Callable[[], Any]:
    """The engine's own connect function: URL, credentials and ``connect_args``, no pool.

    Why: the health probe must open a connection exactly as the application does, yet
    never take one of the application's pooled connections; ``Engine`` exposes no public
    way to open a connection outside its pool with the ``connect_args`` it was given.
    """
    return engine.pool._creator  # type: ignore[attr-defined,no-any-return,return-value]


def max_overflow(pool: Pool) -> int | None:
    """QueuePool's ``max_overflow`` (``-1`` unbounded; ``None`` for other pools).

    Why: ``QueuePool`` exposes ``overflow()`` but not its limit, which a saturation
    gauge needs.
    """
    return getattr(pool, "_max_overflow", None)


def asyncpg_fileno(dbapi_connection: Any) -> int | None:
    """The socket descriptor of an asyncpg connection behind SQLAlchemy's adapter.

    Why: asyncpg has no keepalive or ``TCP_USER_TIMEOUT`` options; labkit sets them on
    the socket, which asyncpg keeps in ``Connection._transport``.
    """
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    transport = getattr(driver, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock.fileno() if sock is not None else None


def asyncpg_lost_transaction(dbapi_connection: Any) -> bool:
    """True when asyncpg has a transaction open that SQLAlchemy's adapter has forgotten.

    Why: after a COMMIT refused with "another operation is in progress" (one session
    shared by concurrent tasks), SQLAlchemy's asyncpg adapter drops its transaction
    (``_transaction``) while the server keeps it; the pool's reset would then roll back
    nothing and lend the connection out idle in transaction.
    """
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is None or not hasattr(driver, "is_in_transaction"):
        return False
    return bool(driver.is_in_transaction()) and \
        getattr(dbapi_connection, "_transaction", 0) is None
