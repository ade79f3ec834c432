"""Engine factories, sync (psycopg2) and async (asyncpg), from :class:`Settings`.

An engine owns a pool; create one per process at start-up, share it, and dispose of
it at shutdown. Both factories apply the settings' :class:`PoolProfile`, the connect
timeout and the statement timeout, and let any value be overridden per call::

    engine = create_engine(settings, pool=settings.pool.replace(pool_size=2))
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from labkit.config import PoolProfile, Settings, mask_url
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


def _connect_args(settings: Settings, url: URL, *, is_async: bool) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return {}
    if is_async:
        server_settings = {"application_name": settings.application_name}
        if settings.statement_timeout_ms is not None:
            server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        return {"timeout": settings.connect_timeout, "server_settings": server_settings}
    args: dict[str, Any] = {
        # libpq takes whole seconds and treats values below 2 as 2.
        "connect_timeout": max(2, math.ceil(settings.connect_timeout)),
        "application_name": settings.application_name,
    }
    if settings.statement_timeout_ms is not None:
        args["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
    return args


def engine_kwargs(settings: Settings, *, is_async: bool = False,
                  pool: PoolProfile | None = None) -> dict[str, Any]:
    """Return the keyword arguments labkit passes to SQLAlchemy's ``create_engine``."""
    url = settings.async_url if is_async else settings.sync_url
    kwargs = _pool_kwargs(pool or settings.pool, url, is_async=is_async)
    connect_args = {**_connect_args(settings, url, is_async=is_async),
                    **kwargs.pop("connect_args", {})}
    return {**kwargs, "echo": settings.echo, "connect_args": connect_args}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **overrides}
    if "connect_args" in overrides:
        merged["connect_args"] = {**base.get("connect_args", {}), **overrides["connect_args"]}
    if merged.get("poolclass") in (sa_pool.NullPool, sa_pool.StaticPool):
        for key in ("pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"):
            merged.pop(key, None)
    return merged


def create_engine(settings: Settings, *, pool: PoolProfile | None = None,
                  **overrides: Any) -> Engine:
    """Create the sync engine (psycopg2) with the settings' pool profile.

    ``pool`` replaces the profile; ``overrides`` go to SQLAlchemy's ``create_engine``
    last (e.g. ``pool_reset_on_return=None``). No connection is opened here.
    """
    url = settings.sync_url
    kwargs = _merge(engine_kwargs(settings, pool=pool), overrides)
    return _build(sqlalchemy.create_engine, url, kwargs)


def create_async_engine(settings: Settings, *, pool: PoolProfile | None = None,
                        **overrides: Any) -> AsyncEngine:
    """Create the async engine (asyncpg) with the settings' pool profile.

    Pool events live on ``engine.sync_engine``. No connection is opened here.
    """
    url = settings.async_url
    kwargs = _merge(engine_kwargs(settings, is_async=True, pool=pool), overrides)
    return _build(sa_create_async_engine, url, kwargs)


def _build(factory: Any, url: URL, kwargs: dict[str, Any]) -> Any:
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
    """Close every pooled connection; connections checked out are closed on return.

    Call it at shutdown so the server sees clean disconnects rather than dropped
    sockets. The engine stays usable: it opens new connections on demand.
    """
    engine.dispose()


async def async_dispose_engine(engine: AsyncEngine) -> None:
    """Async twin of :func:`dispose_engine`; await it before the event loop closes."""
    await engine.dispose()
