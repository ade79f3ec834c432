"""Engine factories, sync (psycopg2) and async (asyncpg), or psycopg 3 for both: one engine per
process from [`Settings`][labkit.Settings], made at start-up, shared, ``dispose()``-d at exit."""

from __future__ import annotations

import math
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
from .errors import ConfigurationError, DatabaseUnavailableError, is_database_error
from .metrics import install as install_metrics
from .metrics import timed_pool_class

__all__ = ["create_async_engine", "create_engine", "engine_kwargs"]

_FRESH = "labkit_fresh"  # on a new connection's record: no ping at its first checkout
_ERROR_SEEN = "labkit_error_in_transaction"  # see session.py: an error inside a transaction


def engine_kwargs(settings: Settings, *, is_async: bool = False,
                  pool: PoolProfile | None = None) -> dict[str, Any]:
    """Return the keyword arguments labkit passes to SQLAlchemy's ``create_engine``."""
    profile = pool or settings.pool
    queue = sa_pool.AsyncAdaptedQueuePool if is_async else sa_pool.QueuePool
    classes = {"queue": queue, "null": sa_pool.NullPool, "static": sa_pool.StaticPool}
    kwargs: dict[str, Any] = {"echo": settings.echo,
                              "poolclass": timed_pool_class(classes[profile.poolclass])}
    if profile.poolclass == "queue":
        kwargs.update({name: getattr(profile, name) for name in (
            "pool_size", "max_overflow", "pool_timeout", "pool_recycle", "pool_use_lifo")})
    options, timeout = str(settings.url.query.get("options") or ""), settings.statement_timeout_ms
    if is_async and settings.driver is None:  # asyncpg
        kwargs["connect_args"] = {"timeout": settings.connect_timeout, "server_settings": {
            **server_settings(options), "application_name": settings.application_name or "labkit",
            **({} if timeout is None else {"statement_timeout": str(timeout)})}}
    else:  # libpq: psycopg2 and psycopg 3
        if timeout is not None:
            options = " ".join(filter(None, (options, f"-c statement_timeout={timeout}")))
        kwargs["connect_args"] = {  # libpq takes whole seconds, at least 2
            "connect_timeout": max(2, math.ceil(settings.connect_timeout or 5)),
            "application_name": settings.application_name,
            **({"options": options} if options else {})}
    return kwargs


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; ``connect_args`` merge key by key, and their ``options`` after labkit's."""
    merged = {**base, **overrides}
    if "connect_args" in overrides:
        ours, extra = base["connect_args"], dict(overrides["connect_args"])
        if "server_settings" in extra:
            extra["server_settings"] = {**ours.get("server_settings", {}),
                                        **extra["server_settings"]}
        if extra.get("options") and ours.get("options"):
            extra["options"] = f"{ours['options']} {extra['options']}"
        merged["connect_args"] = {**ours, **extra}
    if isinstance(merged.get("poolclass"), type) and issubclass(
            merged["poolclass"], (sa_pool.NullPool, sa_pool.StaticPool)):
        for key in ("pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"):
            merged.pop(key, None)
    return merged


def _build(factory: Any, url: Any, settings: Settings, pool: PoolProfile | None,
           overrides: dict[str, Any], is_async: bool) -> Any:
    profile = pool or settings.pool
    kwargs = _merge(engine_kwargs(settings, is_async=is_async, pool=profile), overrides)
    pre_ping = kwargs.pop("pool_pre_ping", profile.pool_pre_ping)
    try:
        engine = factory(url, **kwargs)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, TypeError, ImportError) as exc:
        raise ConfigurationError(f"cannot create an engine for {mask_url(url)}: "
                                 f"{type(exc).__name__}: {exc}") from None
    _install(engine.sync_engine if is_async else engine, settings, pre_ping)
    return engine


def create_engine(settings: Settings, *, pool: PoolProfile | None = None,
                  **overrides: Any) -> Engine:
    """Create the sync engine (psycopg2 or 3), opening no connection; ``pool`` replaces the profile,
    ``overrides`` go to SQLAlchemy. With pre-ping, a checkout on a hung server fails within
    ``connect_timeout``."""
    return _build(sqlalchemy.create_engine, settings.sync_url, settings, pool, overrides,
                  is_async=False)  # type: ignore[no-any-return]


def create_async_engine(settings: Settings, *, pool: PoolProfile | None = None,
                        **overrides: Any) -> AsyncEngine:
    """Async twin of ``create_engine`` (asyncpg, or psycopg 3); events on ``engine.sync_engine``."""
    url = settings.async_url.difference_update_query(["options"])  # in connect_args
    return _build(sa_create_async_engine, url, settings, pool, overrides,
                  is_async=True)  # type: ignore[no-any-return]


def _install(engine: Engine, settings: Settings, pre_ping: bool) -> None:
    """Add labkit's listeners: metrics, error tracking, bounded pre-ping (documented events)."""
    if hasattr(engine.pool, "labkit_collectors"):
        install_metrics(engine)
    if pre_ping:
        _bounded_pre_ping(engine, settings.connect_timeout or 5.0)

    @event.listens_for(engine, "begin")
    def new_transaction(conn: sqlalchemy.Connection) -> None:
        conn.info.pop(_ERROR_SEEN, None)

    @event.listens_for(engine, "handle_error")
    def error_seen(context: Any) -> None:
        if context.connection is not None and not context.connection.closed:
            context.connection.info[_ERROR_SEEN] = True

    if engine.dialect.driver == "asyncpg":
        @event.listens_for(engine, "checkin")
        def discard_lost_transaction(dbapi_connection: Any, record: Any) -> None:
            if _private.asyncpg_lost_transaction(dbapi_connection):
                record.invalidate()  # never lend a connection out idle in transaction


def _bounded_pre_ping(engine: Engine, seconds: float) -> None:
    """Ping an idle connection at checkout within ``seconds`` (SQLAlchemy's has no deadline)."""
    dialect, asyncpg = engine.dialect, engine.dialect.driver == "asyncpg"
    message = (f"The server accepted the connection but did not answer the pool's pre-ping within "
               f"{seconds:g} s (connect_timeout): hung, overloaded, or packets dropped.")

    @event.listens_for(engine, "connect")
    def fresh(dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH] = True

    @event.listens_for(engine, "checkout")
    def ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_FRESH, False):
            return  # just opened: nothing to check
        ticket = None
        try:
            if asyncpg:
                dbapi_connection.run_async(lambda conn: conn.fetchval("SELECT 1", timeout=seconds))
            else:  # libpq's socket, psycopg 3's async one too
                driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
                ticket = watchdog.arm(driver.fileno(), seconds)
                dialect.do_ping(dbapi_connection)
        except Exception as exc:
            if (ticket is not None and ticket.disarm()) or (
                    asyncpg and isinstance(exc, TimeoutError)):
                if asyncpg:  # no polite close: it would wait on the hung server again
                    dbapi_connection.driver_connection.terminate()
                raise DatabaseUnavailableError(message) from exc
            if not is_database_error(exc):
                raise  # not the server's doing (an event loop closed under the pool: a bug)
            raise sa_exc.InvalidatePoolError() from exc  # unusable: the pool replaces it
        if ticket is not None and ticket.disarm():  # answered as the socket was cut
            raise DatabaseUnavailableError(message)
