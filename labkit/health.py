"""Health checks: one primitive that raises, one wrapper that reports.

``check_database`` asks the server for its version and either returns it or raises a
labkit error. ``health_check`` turns that into a ``HealthReport`` (ok, latency in ms,
server version, error class and a message without secrets, a pool snapshot, whether the
application's pool is saturated) and never raises for a database failure.

What a probe promises, however the server is broken:

- **It answers within ``timeout``.** The probe's socket is cut by a watchdog at the
  deadline (``labkit.deadline``), so a server that accepts TCP but never answers cannot
  hold it; the caller stops waiting at the deadline even while a connection is still
  being opened (that attempt ends by itself within ``connect_timeout``).
- **It never takes the application's connections.** It uses one connection of its own,
  opened with the engine's own connect function (same URL, credentials and settings)
  and kept between probes, outside the application's pool. An exhausted pool therefore
  does not make the database look down: the report says ``ok`` and, separately,
  ``pool_saturated``.
- **At most one probe is in flight per engine.** A caller that arrives while a probe is
  still waiting shares that probe's outcome instead of starting another; timed-out probes
  cannot pile up threads, tasks or connections.

Readiness is this check; liveness (is the process alive?) should not touch the database
at all, or a database outage restarts every application instance.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from labkit.deadline import connection_fileno, watchdog
from labkit.errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    HealthCheckTimeoutError,
    LabkitError,
    redact,
    translate_error,
)

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
_VERSION_SQL = "SELECT current_setting('server_version')"


@dataclass(frozen=True)
class HealthReport:
    """The outcome of one health check.

    ``ok`` says whether the database answered within ``timeout_s``; ``latency_ms`` is
    the whole probe. ``error`` is the labkit error class name (e.g.
    ``DatabaseUnavailableError``) and ``message`` says why, with any password masked.
    ``pool`` is a snapshot of the application pool's gauges; ``pool_saturated`` is True
    when every connection the pool may open is checked out (the next request waits up
    to ``pool_timeout``) — a different problem from an unreachable database.
    """

    ok: bool
    latency_ms: float
    server_version: str | None = None
    error: str | None = None
    message: str | None = None
    timeout_s: float = DEFAULT_HEALTH_TIMEOUT
    checked_at: float = field(default_factory=time.time)
    pool: dict[str, Any] = field(default_factory=dict)
    pool_saturated: bool = False

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
    if isinstance(pool, QueuePool):
        snapshot["max_overflow"] = pool._max_overflow
    return snapshot


def _saturated(snapshot: dict[str, Any]) -> bool:
    if "max_overflow" not in snapshot or snapshot["max_overflow"] < 0:
        return False  # unbounded or not a queue pool: never saturated
    return int(snapshot.get("checkedout", 0)) >= snapshot["size"] + snapshot["max_overflow"]


def _secrets(engine: Engine) -> list[str | None]:
    return [engine.url.password]  # type: ignore[list-item]


def _timeout_error(timeout: float) -> HealthCheckTimeoutError:
    return HealthCheckTimeoutError(
        f"the database did not answer the health check within {timeout:g} s (server hung "
        "or overloaded, or the network between drops packets)")


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")


# --- the probe's own connection ------------------------------------------------------

class _Prober:
    """One engine's probe connection and its in-flight probe (sync or async)."""

    def __init__(self, engine: Engine) -> None:
        # The engine's own connect function: the URL, credentials and connect_args of
        # the application's connections, without going through its pool.
        self.creator: Callable[[], Any] = engine.pool._creator  # type: ignore[assignment]
        self.dialect_name = engine.dialect.name
        self.lock = threading.Lock()
        self.connection: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.in_flight: concurrent.futures.Future[str] | None = None
        self.task: asyncio.Task[str] | None = None
        self.generation = 0  # bumped by dispose(): older probes must not keep connections
        event.listen(engine, "engine_disposed", self._on_dispose)

    def _on_dispose(self, engine: Engine) -> None:
        with self.lock:
            self.generation += 1
        self.discard()

    def take(self) -> Any:
        with self.lock:
            connection, self.connection = self.connection, None
            return connection

    def keep(self, connection: Any, generation: int) -> None:
        with self.lock:
            if generation != self.generation:  # the engine was disposed meanwhile
                old = connection
            else:
                old, self.connection = self.connection, connection
        if old is not None:
            _close_quietly(old)

    def discard(self) -> None:
        connection = self.take()
        if connection is not None:
            _close_quietly(connection)


def _close_quietly(connection: Any) -> None:
    driver = getattr(connection, "driver_connection", None)
    try:
        if driver is not None and hasattr(driver, "terminate"):
            driver.terminate()  # asyncpg: closes the socket without a round trip
        else:
            connection.close()
    except Exception:  # noqa: BLE001 - it is being thrown away
        pass


_probers: weakref.WeakKeyDictionary[Engine, _Prober] = weakref.WeakKeyDictionary()
_probers_lock = threading.Lock()


def _prober_for(engine: Engine) -> _Prober:
    with _probers_lock:
        prober = _probers.get(engine)
        if prober is None:
            prober = _probers[engine] = _Prober(engine)
        return prober


# --- sync -----------------------------------------------------------------------------

def _query_sync(connection: Any, dialect_name: str, timeout: float) -> str:
    cursor = connection.cursor()
    try:
        if dialect_name == "postgresql":
            # One round trip, one implicit transaction: the server also cancels a probe
            # that is merely slow, and SET LOCAL leaves nothing behind on the connection
            # (which a pooler in transaction mode would hand to another client).
            cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}; "
                           f"{_VERSION_SQL}")
        else:
            cursor.execute("SELECT sqlite_version()")
        return str(cursor.fetchone()[0])
    finally:
        cursor.close()


def _probe_sync(prober: _Prober, timeout: float) -> str:
    # The query gets ``timeout`` from when it is sent; opening a connection is bounded
    # by the engine's connect_timeout. Callers stop waiting at their own deadline.
    generation = prober.generation
    connection = prober.take()
    reused = connection is not None
    while True:
        if connection is None:
            try:
                connection = prober.creator()
            except Exception as exc:
                raise _connect_error(exc) from exc
            if prober.dialect_name == "postgresql":
                connection.autocommit = True
        ticket = _arm(connection, timeout)
        try:
            version = _query_sync(connection, prober.dialect_name, timeout)
        except Exception as exc:
            _after_failure(connection, ticket, exc, timeout, fresh_try=reused)
            connection, reused = None, False  # the kept connection died while idle
            continue
        _after_success(prober, connection, ticket, generation, timeout)
        return version


def _arm(connection: Any, timeout: float) -> Any:
    """Let the watchdog cut the probe's socket if no answer comes within ``timeout``."""
    fileno = connection_fileno(connection)
    return watchdog.arm(fileno, timeout) if fileno is not None else None


def _after_failure(connection: Any, ticket: Any, exc: Exception, timeout: float, *,
                   fresh_try: bool) -> None:
    """Close a probe connection that failed; raise unless a fresh connection may try.

    A kept connection that died while idle earns one try on a new connection; a failure
    the watchdog caused is the probe's timeout.
    """
    fired = ticket.disarm() if ticket is not None else False
    _close_quietly(connection)
    if fired:
        raise _timeout_error(timeout) from exc
    if not fresh_try:
        raise exc


def _after_success(prober: _Prober, connection: Any, ticket: Any, generation: int,
                   timeout: float) -> None:
    """Keep the connection for the next probe, unless the answer came after the deadline."""
    if ticket is not None and ticket.disarm():
        _close_quietly(connection)
        raise _timeout_error(timeout)
    prober.keep(connection, generation)


def _connect_error(exc: BaseException) -> LabkitError:
    """A failure while opening the probe's connection is never a "lost" connection."""
    error = translate_error(exc)
    if isinstance(error, ConnectionLostError):
        unavailable = DatabaseUnavailableError(str(error))
        unavailable.__cause__ = exc
        return unavailable
    return error


def check_database(engine: Engine, *, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> str:
    """Return the server version, or raise a labkit error within ``timeout`` seconds.

    Raises ``HealthCheckTimeoutError`` when the server does not answer in time. Uses the
    probe's own connection, never one of the application's pool.
    """
    _check_timeout(timeout)
    prober = _prober_for(engine)
    with prober.lock:
        future = prober.in_flight
        if future is None or future.done():
            future = prober.in_flight = concurrent.futures.Future()
            threading.Thread(target=_run_sync, args=(prober, future, timeout),
                             name="labkit-health", daemon=True).start()
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise _timeout_error(timeout) from None
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=_secrets(engine)) from exc


def _run_sync(prober: _Prober, future: concurrent.futures.Future[str], timeout: float) -> None:
    try:
        future.set_result(_probe_sync(prober, timeout))
    except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
        future.set_exception(exc)


# --- async ----------------------------------------------------------------------------

async def _probe_async(prober: _Prober, timeout: float) -> str:
    from sqlalchemy.util import greenlet_spawn

    loop = asyncio.get_running_loop()
    if prober.loop is not loop:
        prober.discard()  # a connection belongs to the event loop that opened it
        prober.loop = loop
    generation = prober.generation
    connection = prober.take()
    reused = connection is not None
    while True:
        if connection is None:
            try:
                connection = await greenlet_spawn(prober.creator)
            except Exception as exc:
                raise _connect_error(exc) from exc
        driver = connection.driver_connection
        ticket = _arm(connection, timeout)
        try:
            # asyncpg's own timeout cancels a probe that is merely slow (the connection
            # survives); the watchdog ends one the server never answers.
            version = str(await driver.fetchval(_VERSION_SQL, timeout=timeout))
        except Exception as exc:
            _after_failure(connection, ticket, exc, timeout, fresh_try=reused)
            connection, reused = None, False
            continue
        _after_success(prober, connection, ticket, generation, timeout)
        return version


async def async_check_database(engine: AsyncEngine, *,
                               timeout: float = DEFAULT_HEALTH_TIMEOUT) -> str:
    """Async twin of ``check_database``: returns at the deadline, never later.

    A probe still waiting at the deadline is not cancelled (cancelling would wait for
    its cleanup against the hung server): the watchdog cuts its socket and it ends in
    the background, and the next caller shares it while it lasts.
    """
    _check_timeout(timeout)
    sync_engine = engine.sync_engine
    prober = _prober_for(sync_engine)
    task = prober.task
    if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
        task = prober.task = asyncio.ensure_future(_probe_async(prober, timeout))
        task.add_done_callback(_consume)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        raise _timeout_error(timeout)
    try:
        return task.result()
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=_secrets(sync_engine)) from exc


def _consume(task: asyncio.Task[str]) -> None:
    # A probe that outlived its callers still has its outcome read, so asyncio never
    # logs "exception was never retrieved".
    if not task.cancelled():
        task.exception()


# --- reports --------------------------------------------------------------------------

def _report(engine: Engine, start: float, timeout: float, version: str | None,
            exc: LabkitError | None) -> HealthReport:
    latency_ms = round((time.perf_counter() - start) * 1000.0, 3)
    pool = _pool_snapshot(engine)
    saturated = _saturated(pool)
    if exc is None:
        logger.debug("health check ok in %.1f ms", latency_ms)
        return HealthReport(ok=True, latency_ms=latency_ms, server_version=version,
                            timeout_s=timeout, pool=pool, pool_saturated=saturated)
    message = redact(str(exc), _secrets(engine))
    logger.warning("health check failed after %.1f ms: %s: %s", latency_ms,
                   type(exc).__name__, message)
    return HealthReport(ok=False, latency_ms=latency_ms, error=type(exc).__name__,
                        message=message, timeout_s=timeout, pool=pool,
                        pool_saturated=saturated)


def health_check(engine: Engine, *, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> HealthReport:
    """Probe the database and return a ``HealthReport``; never raises for database errors."""
    start = time.perf_counter()
    try:
        version = check_database(engine, timeout=timeout)
    except LabkitError as exc:
        return _report(engine, start, timeout, None, exc)
    return _report(engine, start, timeout, version, None)


async def async_health_check(engine: AsyncEngine, *,
                             timeout: float = DEFAULT_HEALTH_TIMEOUT) -> HealthReport:
    """Async twin of ``health_check``."""
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
    """Async twin of ``is_healthy``."""
    return (await async_health_check(engine, timeout=timeout)).ok

