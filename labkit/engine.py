"""Engine factories, sync (psycopg2) and async (asyncpg), from [`Settings`][labkit.Settings].

Create one engine per process at start-up, share it, ``dispose()`` it at shutdown. Both
factories apply the pool profile, timeouts and TCP settings, and take overrides:

```python
engine = create_engine(settings, pool=settings.pool.replace(pool_size=2))
```
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from . import _private, watchdog
from .config import PoolProfile, Settings, mask_url, server_settings
from .metrics import install as install_metrics
from .metrics import timed_pool_class
from .errors import ConfigurationError, DatabaseUnavailableError, is_database_error

__all__ = ["create_async_engine", "create_engine", "engine_kwargs"]

_FRESH = "labkit_fresh"  # set on a new connection's record: no ping at its first checkout
_ERROR_SEEN = "labkit_error_in_transaction"  # see session.py: an error inside a transaction


def _pool_kwargs(profile: PoolProfile, *, is_async: bool) -> dict[str, Any]:
    if profile.poolclass == "null":
        return {"poolclass": timed_pool_class(sa_pool.NullPool)}
    if profile.poolclass == "static":
        return {"poolclass": timed_pool_class(sa_pool.StaticPool)}
    queue = sa_pool.AsyncAdaptedQueuePool if is_async else sa_pool.QueuePool
    return {"poolclass": timed_pool_class(queue),
            "pool_size": profile.pool_size, "max_overflow": profile.max_overflow,
            "pool_timeout": profile.pool_timeout, "pool_recycle": profile.pool_recycle,
            "pool_use_lifo": profile.pool_use_lifo}


def _pooler_statement_name() -> str:
    # Unique across processes: a transaction-mode pooler may run the next transaction on
    # a server connection another client prepared statements on.
    return f"__labkit_{uuid.uuid4().hex}__"


def _connect_args(settings: Settings, *, is_async: bool) -> dict[str, Any]:
    options = settings.url.query.get("options")
    at_connect = settings.statement_timeout_ms is not None and not settings.behind_pooler
    if is_async:
        extra = server_settings(options) if isinstance(options, str) else {}
        extra["application_name"] = settings.application_name or "labkit"
        if at_connect:
            extra["statement_timeout"] = str(settings.statement_timeout_ms)
        args: dict[str, Any] = {"timeout": settings.connect_timeout, "server_settings": extra}
        if settings.behind_pooler:  # no prepared statement outlives its transaction
            args.update(statement_cache_size=0, prepared_statement_cache_size=0,
                        prepared_statement_name_func=_pooler_statement_name)
        return args
    args = {"connect_timeout": max(2, math.ceil(settings.connect_timeout or 5)),  # libpq: >= 2
            "application_name": settings.application_name}
    words = [options] if isinstance(options, str) and options else []
    if at_connect:
        words.append(f"-c statement_timeout={settings.statement_timeout_ms}")
    if words:
        args["options"] = " ".join(words)
    if any(v is not None for v in (settings.tcp_keepalive_idle, settings.tcp_keepalive_interval,
                                   settings.tcp_keepalive_count)):
        args["keepalives"] = 1
        for name in ("idle", "interval", "count"):
            if getattr(settings, f"tcp_keepalive_{name}") is not None:
                args[f"keepalives_{name}"] = getattr(settings, f"tcp_keepalive_{name}")
    if settings.tcp_user_timeout is not None:
        args["tcp_user_timeout"] = max(1, round(settings.tcp_user_timeout * 1000))  # ms
    return args


def engine_kwargs(settings: Settings, *, is_async: bool = False,
                  pool: PoolProfile | None = None) -> dict[str, Any]:
    """Return the keyword arguments labkit passes to SQLAlchemy's ``create_engine``."""
    return {**_pool_kwargs(pool or settings.pool, is_async=is_async), "echo": settings.echo,
            "connect_args": _connect_args(settings, is_async=is_async)}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; ``connect_args`` and asyncpg's ``server_settings`` merge key by key."""
    merged = {**base, **overrides}
    if "connect_args" in overrides:
        extra = dict(overrides["connect_args"])
        if "server_settings" in extra:
            extra["server_settings"] = {**base["connect_args"].get("server_settings", {}),
                                        **extra["server_settings"]}
        if extra.get("options") and base["connect_args"].get("options"):
            # libpq applies -c switches in order: labkit's first, the caller's win.
            extra["options"] = f"{base['connect_args']['options']} {extra['options']}"
        merged["connect_args"] = {**base["connect_args"], **extra}
    if isinstance(merged.get("poolclass"), type) and issubclass(
            merged["poolclass"], (sa_pool.NullPool, sa_pool.StaticPool)):
        for key in ("pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"):
            merged.pop(key, None)
    return merged


def _build(factory: Any, url: Any, kwargs: dict[str, Any]) -> Any:
    try:
        return factory(url, **kwargs)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, TypeError, ImportError) as exc:
        raise ConfigurationError(f"cannot create an engine for {mask_url(url)}: "
                                 f"{type(exc).__name__}: {exc}") from None


def create_engine(settings: Settings, *, pool: PoolProfile | None = None,
                  **overrides: Any) -> Engine:
    """Create the sync engine (psycopg2). No connection is opened here.

    ``pool`` replaces the settings' profile; ``overrides`` go to SQLAlchemy last. With
    pre-ping on, a checkout from a warm pool fails within ``connect_timeout`` with
    ``DatabaseUnavailableError`` when the server is hung (its socket is cut).
    """
    profile = pool or settings.pool
    kwargs = _merge(engine_kwargs(settings, pool=profile), overrides)
    pre_ping = kwargs.pop("pool_pre_ping", profile.pool_pre_ping)
    engine: Engine = _build(sqlalchemy.create_engine, settings.sync_url, kwargs)
    _install(engine, settings, pre_ping=pre_ping, is_async=False)
    return engine


def create_async_engine(settings: Settings, *, pool: PoolProfile | None = None,
                        **overrides: Any) -> AsyncEngine:
    """Create the async engine (asyncpg); the twin of ``create_engine``.

    Pool events live on ``engine.sync_engine``. The TCP settings, which asyncpg has no
    argument for, are set on each new connection's socket.
    """
    profile = pool or settings.pool
    kwargs = _merge(engine_kwargs(settings, is_async=True, pool=profile), overrides)
    url = settings.async_url.difference_update_query(["options"])  # now server_settings
    pre_ping = kwargs.pop("pool_pre_ping", profile.pool_pre_ping)
    engine: AsyncEngine = _build(sa_create_async_engine, url, kwargs)
    _install(engine.sync_engine, settings, pre_ping=pre_ping, is_async=True)
    return engine


def _install(engine: Engine, settings: Settings, *, pre_ping: bool, is_async: bool) -> None:
    """Add labkit's listeners: bounded pre-ping, error tracking, pooler and TCP settings."""
    if hasattr(engine.pool, "labkit_collectors"):
        install_metrics(engine)
    if pre_ping:
        _bounded_pre_ping(engine, settings.connect_timeout or 5.0, is_async=is_async)

    @event.listens_for(engine, "begin")
    def new_transaction(conn: sqlalchemy.Connection) -> None:
        conn.info.pop(_ERROR_SEEN, None)
        if settings.behind_pooler and settings.statement_timeout_ms is not None:
            # SET LOCAL ends with the transaction: nothing stays on a shared server connection.
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(f"SET LOCAL statement_timeout = {settings.statement_timeout_ms}")
            finally:
                cursor.close()

    @event.listens_for(engine, "handle_error")
    def error_seen(context: Any) -> None:
        if context.connection is not None and not context.connection.closed:
            context.connection.info[_ERROR_SEEN] = True

    if is_async:
        @event.listens_for(engine, "checkin")
        def discard_lost_transaction(dbapi_connection: Any, record: Any) -> None:
            if _private.asyncpg_lost_transaction(dbapi_connection):
                record.invalidate()
        options = _socket_options(settings)
        if options:
            @event.listens_for(engine, "connect")
            def tune_socket(dbapi_connection: Any, record: Any) -> None:
                fileno = _private.asyncpg_fileno(dbapi_connection)
                if fileno is not None:
                    sock = socket.socket(fileno=os.dup(fileno))
                    try:
                        for level, option, value in options:
                            sock.setsockopt(level, option, value)
                    finally:
                        sock.close()  # the duplicate only


def _socket_options(settings: Settings) -> list[tuple[int, int, int]]:
    """What libpq sets for psycopg2's keepalive and tcp_user_timeout parameters."""
    options = []
    for name, option in (("idle", "TCP_KEEPIDLE"), ("interval", "TCP_KEEPINTVL"),
                         ("count", "TCP_KEEPCNT")):
        value = getattr(settings, f"tcp_keepalive_{name}")
        if value is not None and hasattr(socket, option):
            options.append((socket.IPPROTO_TCP, getattr(socket, option), int(value)))
    if options:
        options.insert(0, (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    if settings.tcp_user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        max(1, round(settings.tcp_user_timeout * 1000))))
    return options


def _ping_timeout(seconds: float) -> DatabaseUnavailableError:
    return DatabaseUnavailableError(
        f"The server accepted the connection but did not answer the pool's pre-ping within "
        f"{seconds:g} s (connect_timeout): it is hung or overloaded, or the network drops "
        "packets. The connection was closed; nothing was sent on it.")


def _bounded_pre_ping(engine: Engine, seconds: float, *, is_async: bool) -> None:
    """Ping an idle connection at checkout, within ``seconds``, however the server is broken.

    SQLAlchemy's own ``pool_pre_ping`` has no deadline. This is the pessimistic check of
    SQLAlchemy's pool documentation, in the ``checkout`` event: a ping that fails on a
    disconnect raises ``InvalidatePoolError`` (the pool reconnects, as pre-ping does); one
    that gets no answer in time raises ``DatabaseUnavailableError`` and the connection is
    discarded.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "connect")
    def fresh(dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH] = True

    @event.listens_for(engine, "checkout")
    def ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_FRESH, False):
            return  # just opened: nothing to check
        ticket = None
        try:
            if is_async:
                dbapi_connection.run_async(
                    lambda conn: conn.fetchval("SELECT 1", timeout=seconds))
            else:
                ticket = watchdog.arm(dbapi_connection.fileno(), seconds)
                dialect.do_ping(dbapi_connection)
        except Exception as exc:
            if (ticket is not None and ticket.disarm()) or (
                    is_async and isinstance(exc, TimeoutError)):
                if is_async:  # no polite close: it would wait on the hung server again
                    dbapi_connection.driver_connection.terminate()
                raise _ping_timeout(seconds) from exc
            if not is_database_error(exc):
                raise  # not the server's doing (an event loop closed under the pool: a bug)
            # The connection is unusable (closed, reset, killed, or the driver left
            # mid-protocol): the pool replaces it, as SQLAlchemy's pre-ping does.
            raise sa_exc.InvalidatePoolError() from exc
        if ticket is not None and ticket.disarm():  # answered as the socket was cut
            raise _ping_timeout(seconds)
