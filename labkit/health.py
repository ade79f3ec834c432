"""Health checks: one primitive that raises, one wrapper that reports.

:func:`check_database` runs ``SELECT version()`` through the engine's pool and either
returns the server version or raises a labkit error. :func:`health_check` turns that
into a :class:`HealthReport` (ok, latency in ms, server version, error class and a
message without secrets, a pool snapshot) and never raises for a database failure.

Every probe is bounded by ``timeout`` (seconds), so a hung server — one that accepts
TCP but never answers — cannot hang the caller:

- sync: the probe runs in a worker thread and the caller stops waiting at the
  deadline; a ``statement_timeout`` set on the probe's transaction also lets a slow
  (not hung) server cancel it.
- async: ``asyncio.wait_for`` cancels the probe; asyncpg then terminates the connection.

Readiness is this check; liveness (is the process alive?) should not touch the database
at all, or a database outage restarts every application instance.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from labkit.errors import HealthCheckTimeoutError, LabkitError, redact, translate_error

__all__ = [
    "DEFAULT_HEALTH_TIMEOUT",
    "HealthReport",
    "async_check_database",
    "async_health_check",
    "async_is_healthy",
    "check_database",
    "health_check",
    "is_healthy",
]

logger = logging.getLogger("labkit")

DEFAULT_HEALTH_TIMEOUT = 5.0
_PROBE = text("SELECT current_setting('server_version')")


@dataclass(frozen=True)
class HealthReport:
    """The outcome of one health check.

    ``latency_ms`` is the whole probe, checkout included. ``error`` is the labkit error
    class name (e.g. ``DatabaseUnavailableError``) and ``message`` says why, with any
    password masked. ``pool`` is a snapshot of the pool's gauges at the end.
    """

    ok: bool
    latency_ms: float
    server_version: str | None = None
    error: str | None = None
    message: str | None = None
    timeout_s: float = DEFAULT_HEALTH_TIMEOUT
    checked_at: float = field(default_factory=time.time)
    pool: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data."""
        return asdict(self)

    def __bool__(self) -> bool:
        return self.ok


def _pool_snapshot(engine: Engine) -> dict[str, Any]:
    pool = engine.pool
    snapshot: dict[str, Any] = {"class": type(pool).__name__}
    for name in ("size", "checkedin", "checkedout", "overflow"):
        method = getattr(pool, name, None)
        if callable(method):
            try:
                snapshot[name] = method()
            except Exception:  # noqa: BLE001 - a snapshot must never fail the report
                continue
    return snapshot


def _secrets(engine: Engine) -> list[str | None]:
    return [engine.url.password]  # type: ignore[list-item]


def _probe_sync(engine: Engine, timeout: float) -> str:
    with engine.connect() as conn:
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text(f"SET LOCAL statement_timeout = {int(timeout * 1000)}"))
                return str(conn.execute(_PROBE).scalar_one())
            return str(conn.execute(text("SELECT sqlite_version()")).scalar_one())


def check_database(engine: Engine, *, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> str:
    """Return the server version, or raise a :class:`LabkitError` within ``timeout`` s.

    Raises :class:`HealthCheckTimeoutError` when the server does not answer in time;
    the worker thread that waits on it is a daemon and ends when the socket does.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["version"] = _probe_sync(engine, timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="labkit-health", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise HealthCheckTimeoutError(
            f"the database did not answer the health check within {timeout:g} s "
            "(server hung, overloaded or unreachable)")
    if "error" in outcome:
        exc = outcome["error"]
        raise translate_error(exc, secrets=_secrets(engine)) from exc
    return str(outcome["version"])


async def async_check_database(engine: AsyncEngine, *,
                               timeout: float = DEFAULT_HEALTH_TIMEOUT) -> str:
    """Async twin of :func:`check_database`."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")

    async def probe() -> str:
        async with engine.connect() as conn:
            async with conn.begin():
                if engine.dialect.name == "postgresql":
                    await conn.execute(
                        text(f"SET LOCAL statement_timeout = {int(timeout * 1000)}"))
                    return str((await conn.execute(_PROBE)).scalar_one())
                return str((await conn.execute(text("SELECT sqlite_version()"))).scalar_one())

    try:
        return await asyncio.wait_for(probe(), timeout)
    except asyncio.TimeoutError:
        raise HealthCheckTimeoutError(
            f"the database did not answer the health check within {timeout:g} s "
            "(server hung, overloaded or unreachable)") from None
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=_secrets(engine.sync_engine)) from exc


def _report(engine: Engine, start: float, timeout: float, version: str | None,
            exc: LabkitError | None) -> HealthReport:
    latency_ms = round((time.perf_counter() - start) * 1000.0, 3)
    if exc is None:
        report = HealthReport(ok=True, latency_ms=latency_ms, server_version=version,
                              timeout_s=timeout, pool=_pool_snapshot(engine))
        logger.debug("health check ok in %.1f ms", latency_ms)
        return report
    message = redact(str(exc), _secrets(engine))
    logger.warning("health check failed after %.1f ms: %s: %s", latency_ms,
                   type(exc).__name__, message)
    return HealthReport(ok=False, latency_ms=latency_ms, error=type(exc).__name__,
                        message=message, timeout_s=timeout, pool=_pool_snapshot(engine))


def health_check(engine: Engine, *, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> HealthReport:
    """Probe the database and return a :class:`HealthReport`; never raises for DB errors."""
    start = time.perf_counter()
    try:
        version = check_database(engine, timeout=timeout)
    except LabkitError as exc:
        return _report(engine, start, timeout, None, exc)
    return _report(engine, start, timeout, version, None)


async def async_health_check(engine: AsyncEngine, *,
                             timeout: float = DEFAULT_HEALTH_TIMEOUT) -> HealthReport:
    """Async twin of :func:`health_check`."""
    start = time.perf_counter()
    try:
        version = await async_check_database(engine, timeout=timeout)
    except LabkitError as exc:
        return _report(engine.sync_engine, start, timeout, None, exc)
    return _report(engine.sync_engine, start, timeout, version, None)


def is_healthy(engine: Engine, *, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> bool:
    """Return True when the database answers within ``timeout`` seconds."""
    return health_check(engine, timeout=timeout).ok


async def async_is_healthy(engine: AsyncEngine, *,
                           timeout: float = DEFAULT_HEALTH_TIMEOUT) -> bool:
    """Async twin of :func:`is_healthy`."""
    return (await async_health_check(engine, timeout=timeout)).ok
