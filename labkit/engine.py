"""Engine factories, sync (psycopg2) and async (asyncpg), from [`Settings`][labkit.Settings].

An engine owns a pool; create one per process at start-up, share it, and dispose of
it at shutdown. Both factories apply the settings' [`PoolProfile`][labkit.PoolProfile],
the connect timeout and the statement timeout, and let any value be overridden per call:

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
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from labkit.config import (
    ASYNC_DRIVER,
    PoolProfile,
    Settings,
    _server_settings_from_options,
    mask_url,
)
from labkit.deadline import bound_pre_ping, bound_statements, connection_fileno
from labkit.errors import ConfigurationError

__all__ = [
    "async_dispose_engine",
    "create_async_engine",
    "create_engine",
    "dispose_engine",
    "engine_kwargs",
]

def _pool_kwargs(profile: PoolProfile, url: URL, *, is_async: bool) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return _sqlite_pool_kwargs(url)
    if profile.poolclass == "null":
        return {"poolclass": sa_pool.NullPool, "pool_pre_ping": profile.pool_pre_ping}
    if profile.poolclass == "static":
        return {"poolclass": sa_pool.StaticPool, "pool_pre_ping": profile.pool_pre_ping}
    return {
        "poolclass": sa_pool.AsyncAdaptedQueuePool if is_async else sa_pool.QueuePool,
        "pool_size": profile.pool_size,
        "max_overflow": profile.max_overflow,
        "pool_timeout": profile.pool_timeout,
        "pool_recycle": profile.pool_recycle,
        "pool_pre_ping": profile.pool_pre_ping,
        "pool_use_lifo": profile.pool_use_lifo,
    }


def _sqlite_pool_kwargs(url: URL) -> dict[str, Any]:
    # An in-memory SQLite database lives inside one connection: share that connection
    # across threads (StaticPool) or every checkout would see an empty database.
    if url.database in (None, "", ":memory:"):
        return {"poolclass": sa_pool.StaticPool,
                "connect_args": {"check_same_thread": False}}
    return {"connect_args": {"check_same_thread": False}}


def _unique_statement_name() -> str:
    # Unique across processes and connections: a transaction-mode pooler may run this
    # client's next transaction on a server connection another client prepared on.
    return f"__labkit_{uuid.uuid4().hex}__"


# asyncpg arguments that keep prepared statements from outliving their transaction:
# asyncpg's own cache off (pre-ping and introspection then use unnamed statements),
# SQLAlchemy's adapter cache off, and unique names for what it still prepares.
_POOLER_SAFE_ASYNCPG: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": _unique_statement_name,
}


def _connect_args(settings: Settings, url: URL, *, is_async: bool) -> dict[str, Any]:
    """Driver arguments from the settings, merged with the URL's ``options``.

    A ``connect_args`` value replaces the URL parameter of the same name, so the URL's
    ``options`` (``-c search_path=...``) are carried over here, not lost: psycopg2
    gets them joined with the statement timeout; asyncpg, which has no ``options``,
    gets them as ``server_settings``. The settings come last and win.
    """
    if url.get_backend_name() == "sqlite":
        return {}
    url_options = url.query.get("options")
    url_options = url_options if isinstance(url_options, str) else None
    # Behind a transaction-mode pooler the statement timeout is set per transaction
    # (_timeout_per_transaction), never at connect: see Settings.behind_pooler.
    timeout_at_connect = (settings.statement_timeout_ms is not None
                          and not settings.behind_pooler)
    if is_async:
        server_settings = (_server_settings_from_options(url_options)
                           if url_options is not None else {})
        server_settings["application_name"] = settings.application_name
        if timeout_at_connect:
            server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        args_async: dict[str, Any] = {"timeout": settings.connect_timeout,
                                      "server_settings": server_settings}
        if settings.behind_pooler:
            args_async.update(_POOLER_SAFE_ASYNCPG)
        if settings.effective_command_timeout is not None:
            # asyncpg's own client-side deadline for every statement.
            args_async["command_timeout"] = settings.effective_command_timeout
        return args_async  # TCP settings: socket options at connect (_tune_async_sockets)
    args: dict[str, Any] = {
        # libpq takes whole seconds and treats values below 2 as 2.
        "connect_timeout": max(2, math.ceil(settings.connect_timeout)),
        "application_name": settings.application_name,
    }
    options = [url_options] if url_options else []
    if timeout_at_connect:
        # PostgreSQL applies '-c' switches in order: the last statement_timeout wins.
        options.append(f"-c statement_timeout={settings.statement_timeout_ms}")
    if options:
        args["options"] = " ".join(options)
    if settings.tcp_keepalive:
        args["keepalives"] = 1
        for name in ("idle", "interval", "count"):
            value = getattr(settings, f"tcp_keepalive_{name}")
            if value is not None:
                args[f"keepalives_{name}"] = int(value)
    if settings.tcp_user_timeout is not None:
        args["tcp_user_timeout"] = max(1, round(settings.tcp_user_timeout * 1000))  # ms
    return args


def engine_kwargs(settings: Settings, *, is_async: bool = False,
                  pool: PoolProfile | None = None) -> dict[str, Any]:
    """Return the keyword arguments labkit passes to SQLAlchemy's ``create_engine``.

    ``connect_args`` hold the connect timeout, ``application_name``, the statement
    timeout and the URL's ``options``: for psycopg2 as one ``options`` string, for
    asyncpg as ``server_settings`` (so the ``options`` parameter must then leave the
    URL, as ``create_async_engine`` does). With ``settings.behind_pooler`` the statement
    timeout is left out (the engine factories set it per transaction) and asyncpg gets
    its statement caches off and unique prepared-statement names.
    """
    url = settings.async_url if is_async else settings.sync_url
    kwargs = _pool_kwargs(pool or settings.pool, url, is_async=is_async)
    connect_args = {**_connect_args(settings, url, is_async=is_async),
                    **kwargs.pop("connect_args", {})}
    return {**kwargs, "echo": settings.echo, "connect_args": connect_args}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Lay ``overrides`` over labkit's engine arguments.

    ``connect_args`` merge key by key, and so do asyncpg's ``server_settings``; a
    psycopg2 ``options`` string is joined after labkit's, so that its ``-c`` settings
    win without dropping the others (``search_path``, the statement timeout).
    """
    merged = {**base, **overrides}
    if "connect_args" in overrides:
        base_args = base.get("connect_args", {})
        extra = dict(overrides["connect_args"])
        if "server_settings" in extra and "server_settings" in base_args:
            extra["server_settings"] = {**base_args["server_settings"],
                                        **extra["server_settings"]}
        if extra.get("options") and base_args.get("options"):
            extra["options"] = f"{base_args['options']} {extra['options']}"
        merged["connect_args"] = {**base_args, **extra}
    if merged.get("poolclass") in (sa_pool.NullPool, sa_pool.StaticPool):
        for key in ("pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"):
            merged.pop(key, None)
    return merged


def create_engine(settings: Settings, *, pool: PoolProfile | None = None,
                  **overrides: Any) -> Engine:
    """Create the sync engine (psycopg2) with the settings' pool profile.

    ``pool`` replaces the profile; ``overrides`` go to SQLAlchemy's ``create_engine``
    last (e.g. ``pool_reset_on_return=None``). No connection is opened here.

    Bounded however the server is broken: the pre-ping fails within ``connect_timeout``
    (``labkit.deadline.bound_pre_ping``), and with a ``command_timeout`` (set, or derived
    from ``statement_timeout``) every statement, COMMIT and ROLLBACK gets a client-side
    deadline (``labkit.deadline.bound_statements``).
    """
    url = settings.sync_url
    kwargs = _merge(engine_kwargs(settings, pool=pool), overrides)
    engine: Engine = _build(sqlalchemy.create_engine, url, kwargs)
    _timeout_per_transaction(engine, settings)
    bound_pre_ping(engine, settings.connect_timeout)
    if settings.effective_command_timeout is not None and url.get_backend_name() != "sqlite":
        bound_statements(engine, settings.effective_command_timeout)
    return engine


def create_async_engine(settings: Settings, *, pool: PoolProfile | None = None,
                        **overrides: Any) -> AsyncEngine:
    """Create the async engine (asyncpg) with the settings' pool profile.

    Pool events live on ``engine.sync_engine``. No connection is opened here. The TCP
    settings (keepalives, ``tcp_user_timeout``), which asyncpg cannot take, are set on
    each new connection's socket as soon as it is open.
    """
    url = settings.async_url
    kwargs = _merge(engine_kwargs(settings, is_async=True, pool=pool), overrides)
    engine: AsyncEngine = _build(sa_create_async_engine, url, kwargs)
    _timeout_per_transaction(engine.sync_engine, settings)
    bound_pre_ping(engine.sync_engine, settings.connect_timeout)
    if url.get_backend_name() != "sqlite":
        _tune_async_sockets(engine.sync_engine, settings)
        _discard_connections_left_in_a_transaction(engine.sync_engine)
    return engine


def _timeout_per_transaction(engine: Engine, settings: Settings) -> None:
    """Behind a pooler, start every transaction with ``SET LOCAL statement_timeout``.

    ``SET LOCAL`` ends with the transaction, so nothing is left on a server connection
    the pooler hands to another client next. It goes through the driver's cursor, which
    opens the transaction (psycopg2's implicit ``BEGIN``, SQLAlchemy's asyncpg adapter's
    transaction) before SQLAlchemy sends the first statement. An engine in
    ``AUTOCOMMIT`` has no transaction to bound: PostgreSQL ignores the ``SET LOCAL``
    there with a warning.
    """
    if not settings.behind_pooler or settings.statement_timeout_ms is None:
        return
    if engine.url.get_backend_name() == "sqlite":
        return
    statement = f"SET LOCAL statement_timeout = {int(settings.statement_timeout_ms)}"

    @event.listens_for(engine, "begin")
    def set_local_timeout(conn: sqlalchemy.Connection) -> None:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(statement)
        finally:
            cursor.close()


def _tcp_socket_options(settings: Settings) -> list[tuple[int, int, int]]:
    """Return the ``(level, option, value)`` socket options for the settings' TCP values.

    What libpq sets for psycopg2 from its ``keepalives*`` and ``tcp_user_timeout``
    parameters; labkit sets the same on asyncpg's sockets. Empty when none is set.
    """
    options: list[tuple[int, int, int]] = []
    if settings.tcp_keepalive:
        options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for name, option in (("idle", "TCP_KEEPIDLE"), ("interval", "TCP_KEEPINTVL"),
                             ("count", "TCP_KEEPCNT")):
            value = getattr(settings, f"tcp_keepalive_{name}")
            if value is not None and hasattr(socket, option):
                options.append((socket.IPPROTO_TCP, getattr(socket, option), int(value)))
    if settings.tcp_user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        max(1, round(settings.tcp_user_timeout * 1000))))
    return options


def _tune_async_sockets(engine: Engine, settings: Settings) -> None:
    options = _tcp_socket_options(settings)
    if not options:
        return

    @event.listens_for(engine, "connect")
    def tune(dbapi_connection: Any, record: Any) -> None:
        fileno = connection_fileno(dbapi_connection)
        if fileno is None:
            return
        # A duplicate descriptor: options are set on the shared socket, closing the
        # duplicate leaves asyncpg's own open.
        sock = socket.socket(fileno=os.dup(fileno))
        try:
            for level, option, value in options:
                sock.setsockopt(level, option, value)
        finally:
            sock.close()


def _discard_connections_left_in_a_transaction(engine: Engine) -> None:
    """Close a returned asyncpg connection whose transaction its adapter has lost track of.

    When a COMMIT or ROLLBACK is refused because another statement is still running on
    the connection (asyncpg's "another operation is in progress": one session shared by
    concurrent tasks), SQLAlchemy's asyncpg adapter forgets the transaction although the
    server still has it open. The pool's reset on return then rolls nothing back, and the
    connection would be lent out *idle in transaction*, with locks and uncommitted rows,
    to the next, unrelated request. Such a connection is closed here instead (a new one
    is opened on its next checkout).
    """

    @event.listens_for(engine, "checkin")
    def discard(dbapi_connection: Any, record: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        if driver is None or not hasattr(driver, "is_in_transaction"):
            return
        if driver.is_in_transaction() and getattr(dbapi_connection, "_transaction", 0) is None:
            record.invalidate()


def _build(factory: Any, url: URL, kwargs: dict[str, Any]) -> Any:
    if url.get_driver_name() == ASYNC_DRIVER and "options" in url.query:
        # engine_kwargs carried them over as server_settings; asyncpg has no 'options'.
        url = url.difference_update_query(["options"])
    try:
        return factory(url, **kwargs)
    except sa_exc.NoSuchModuleError as exc:
        raise ConfigurationError(
            f"no SQLAlchemy dialect/driver for {mask_url(url)}: {exc}") from None
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the driver for {mask_url(url)} is not installed ({exc.name}); "
            "pip install -r requirements.txt") from None
    except (sa_exc.ArgumentError, TypeError) as exc:
        raise ConfigurationError(
            f"invalid engine option for {mask_url(url)}: {exc}") from None


def dispose_engine(engine: Engine) -> None:
    """Close every idle pooled connection and give the engine a new, empty pool.

    Call it at shutdown, after every session and connection is returned, so the server
    sees clean disconnects rather than dropped sockets. The engine stays usable: it
    opens new connections on demand.

    A connection checked out while ``dispose`` runs is *not* closed, neither then nor
    when it is returned (SQLAlchemy 2.1): it goes back into the discarded pool, stays
    open and idle on the server, and is closed only when the garbage collector frees
    that pool (measured: its backend stays in ``pg_stat_activity`` after the return
    and leaves it after ``gc.collect()``). It never enters the new pool.
    """
    engine.dispose()


async def async_dispose_engine(engine: AsyncEngine) -> None:
    """Async twin of ``dispose_engine``; await it before the event loop closes.

    The same caveat holds: an asyncpg connection checked out during ``dispose`` stays
    open after it is returned, until the garbage collector frees the discarded pool, and
    is then dropped without a clean goodbye (asyncpg warns "unclosed connection").
    Return every ``AsyncSession`` / connection first.
    """
    await engine.dispose()
