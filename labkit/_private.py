"""Every private attribute of SQLAlchemy or a driver that labkit reads, in one place.

Each is used only where no event or public API gives the same, was checked against SQLAlchemy
2.1.9 and asyncpg 0.32.0 (``requirements.txt``), and degrades to "unknown" if it disappears.
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool


def pool_creator(engine: Engine) -> Callable[[], Any]:
    """The engine's own connect function (URL, credentials, ``connect_args``), outside its
    pool: the health probe connects as the application does without taking its connections."""
    return engine.pool._creator  # type: ignore[attr-defined,no-any-return,return-value]


def max_overflow(pool: Pool) -> int | None:
    """QueuePool's ``max_overflow`` (``-1`` unbounded; ``None``: another pool), not public."""
    return getattr(pool, "_max_overflow", None)


def asyncpg_fileno(dbapi_connection: Any) -> int | None:
    """The socket descriptor of an asyncpg connection (``_transport``), for the keepalive
    and ``TCP_USER_TIMEOUT`` options asyncpg does not offer."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    transport = getattr(driver, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock.fileno() if sock is not None else None


def asyncpg_lost_transaction(dbapi_connection: Any) -> bool:
    """True when asyncpg has a transaction open that SQLAlchemy's adapter forgot (its
    ``_transaction`` dropped after a refused COMMIT): the pool's reset would miss it."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    is_open = getattr(driver, "is_in_transaction", None)  # None: not asyncpg
    return bool(is_open and is_open()) and getattr(dbapi_connection, "_transaction", 0) is None
