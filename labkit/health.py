"""Health checks: one primitive that raises, one wrapper that reports.

``check_database`` returns the server version or raises a labkit error; ``health_check``
turns that into a ``HealthReport`` and never raises for a database failure. A probe:

- answers within ``timeout`` however the server is broken (its socket is cut at the
  deadline; a probe still opening a connection is simply no longer waited for);
- never takes the application's connections: it keeps one of its own, opened with the
  engine's own connect function, outside the pool (count it in the connection budget);
- is shared: a caller arriving while a probe is in flight waits for that one.

Readiness is this check; liveness should not touch the database at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _private, watchdog
from .config import Settings
from .errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    LabkitError,
    redact,
    translate_error,
)

__all__ = ["ConnectionBudget", "HealthReport", "async_check_connection_budget",
           "async_check_database", "async_health_check", "check_connection_budget",
           "check_database", "health_check"]

logger = logging.getLogger("labkit")
DEFAULT_TIMEOUT = 5.0
_VERSION_SQL = "SELECT current_setting('server_version')"


@dataclass(frozen=True)
class HealthReport:
    """One health check: ``ok``, ``latency_ms``, the server version or the error class
    and a message without secrets, and a snapshot of the application's pool.

    ``pool_saturated`` is True when every connection the pool may open is checked out: a
    different problem from an unreachable database, which leaves ``ok`` True.
    """

    ok: bool
    latency_ms: float
    server_version: str | None = None
    error: str | None = None
    message: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT
    checked_at: float = field(default_factory=time.time)
    pool: dict[str, Any] = field(default_factory=dict)
    pool_saturated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data."""
        return asdict(self)

    def __bool__(self) -> bool:
        return self.ok


class _Probe:
    """One engine's probe connection and its in-flight probe."""

    def __init__(self, engine: Engine) -> None:
        self.connect = _private.pool_creator(engine)
        self.lock = threading.Lock()
        self.connection: Any = None
        self.future: concurrent.futures.Future[str] | None = None
        self.task: asyncio.Task[str] | None = None
        self.generation = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        event.listen(engine, "engine_disposed", self.discard)

    def discard(self, *_: Any) -> None:
        with self.lock:
            self.generation += 1
            connection, self.connection = self.connection, None
        _close(connection)

    def take(self) -> tuple[Any, int]:
        with self.lock:
            connection, self.connection = self.connection, None
            return connection, self.generation

    def keep(self, connection: Any, generation: int) -> None:
        with self.lock:
            if generation == self.generation and self.connection is None:
                self.connection, connection = connection, None
        _close(connection)


def _close(connection: Any) -> None:
    if connection is None:
        return
    try:
        driver = getattr(connection, "driver_connection", None)
        if driver is not None and hasattr(driver, "terminate"):
            driver.terminate()  # asyncpg: no round trip to a server that may hang
        else:
            connection.close()
    except Exception:  # noqa: BLE001 - it is being thrown away
        pass


_probes: weakref.WeakKeyDictionary[Engine, _Probe] = weakref.WeakKeyDictionary()
_probes_lock = threading.Lock()


def _probe_for(engine: Engine) -> _Probe:
    with _probes_lock:
        if engine not in _probes:
            _probes[engine] = _Probe(engine)
        return _probes[engine]


def _timeout_error(timeout: float) -> DatabaseUnavailableError:
    return DatabaseUnavailableError(
        f"the database did not answer the health check within {timeout:g} s (server hung or "
        "overloaded, or the network drops packets)")


def _opening_failed(exc: Exception) -> LabkitError:
    error = translate_error(exc)
    if isinstance(error, ConnectionLostError):  # nothing was open to lose
        error = DatabaseUnavailableError(str(error), sqlstate=error.sqlstate)
        error.__cause__ = exc
    return error


def _probe_sync(probe: _Probe, timeout: float) -> str:
    connection, generation = probe.take()
    for attempt in (1, 2):  # a kept connection that died idle earns one fresh try
        fresh = connection is None
        if fresh:
            try:
                connection = probe.connect()
                connection.autocommit = True
            except Exception as exc:
                raise _opening_failed(exc) from exc
        ticket = watchdog.arm(connection.fileno(), timeout)
        try:
            cursor = connection.cursor()
            # SET LOCAL: the server cancels a merely slow probe and nothing stays behind.
            cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}; "
                           f"{_VERSION_SQL}")
            version = str(cursor.fetchone()[0])
            cursor.close()
        except Exception as exc:
            _close(connection)
            connection = None
            if ticket.disarm():
                raise _timeout_error(timeout) from exc
            if fresh or attempt == 2:
                raise
            continue
        if ticket.disarm():
            _close(connection)
            raise _timeout_error(timeout)
        probe.keep(connection, generation)
        return version
    raise AssertionError("unreachable")


def check_database(engine: Engine, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Return the server version, or raise a labkit error within ``timeout`` seconds."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    probe = _probe_for(engine)
    with probe.lock:
        future = probe.future
        if future is None or future.done():
            future = probe.future = concurrent.futures.Future()
            threading.Thread(target=_run, args=(probe, future, timeout), daemon=True,
                             name="labkit-health").start()
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise _timeout_error(timeout) from None
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=[engine.url.password]) from exc


def _run(probe: _Probe, future: concurrent.futures.Future[str], timeout: float) -> None:
    try:
        future.set_result(_probe_sync(probe, timeout))
    except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
        future.set_exception(exc)


async def _probe_async(probe: _Probe, timeout: float) -> str:
    from sqlalchemy.util import greenlet_spawn

    connection, generation = probe.take()
    if connection is not None and probe.loop is not asyncio.get_running_loop():
        _close(connection)  # an asyncpg connection belongs to the loop that opened it
        connection = None
    probe.loop = asyncio.get_running_loop()
    for attempt in (1, 2):
        fresh = connection is None
        if fresh:
            try:
                connection = await greenlet_spawn(probe.connect)
            except Exception as exc:
                raise _opening_failed(exc) from exc
        try:  # asyncpg's own timeout ends the wait, even on a hung server
            version = str(await connection.driver_connection.fetchval(_VERSION_SQL,
                                                                      timeout=timeout))
        except Exception as exc:
            _close(connection)
            connection = None
            if isinstance(exc, TimeoutError):
                raise _timeout_error(timeout) from exc
            if fresh or attempt == 2:
                raise
            continue
        probe.keep(connection, generation)
        return version
    raise AssertionError("unreachable")


async def async_check_database(engine: AsyncEngine, *,
                               timeout: float = DEFAULT_TIMEOUT) -> str:
    """Async twin of ``check_database``: returns at the deadline, never later."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    probe = _probe_for(engine.sync_engine)
    task = probe.task
    if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
        task = probe.task = asyncio.ensure_future(_probe_async(probe, timeout))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        raise _timeout_error(timeout)
    try:
        return task.result()
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=[engine.url.password]) from exc


def _report(engine: Engine, start: float, timeout: float, version: str | None,
            exc: LabkitError | None) -> HealthReport:
    latency_ms = round((time.perf_counter() - start) * 1000.0, 3)
    pool, snapshot = engine.pool, {"class": type(engine.pool).__name__}  # type: Any, dict[str, Any]
    for name in ("size", "checkedin", "checkedout", "overflow"):
        if callable(getattr(pool, name, None)):
            snapshot[name] = getattr(pool, name)()
    limit = _private.max_overflow(pool)
    saturated = limit is not None and limit >= 0 and \
        snapshot.get("checkedout", 0) >= snapshot.get("size", 0) + limit
    if exc is None:
        return HealthReport(ok=True, latency_ms=latency_ms, server_version=version,
                            timeout_s=timeout, pool=snapshot, pool_saturated=saturated)
    message = redact(str(exc), [engine.url.password])
    logger.warning("health check failed after %.1f ms: %s: %s", latency_ms,
                   type(exc).__name__, message)
    return HealthReport(ok=False, latency_ms=latency_ms, error=type(exc).__name__,
                        message=message, timeout_s=timeout, pool=snapshot,
                        pool_saturated=saturated)


def health_check(engine: Engine, *, timeout: float = DEFAULT_TIMEOUT) -> HealthReport:
    """Probe the database and return a ``HealthReport``; never raises for database errors."""
    start = time.perf_counter()
    try:
        return _report(engine, start, timeout, check_database(engine, timeout=timeout), None)
    except LabkitError as exc:
        return _report(engine, start, timeout, None, exc)


async def async_health_check(engine: AsyncEngine, *,
                             timeout: float = DEFAULT_TIMEOUT) -> HealthReport:
    """Async twin of ``health_check``."""
    start = time.perf_counter()
    try:
        version = await async_check_database(engine, timeout=timeout)
        return _report(engine.sync_engine, start, timeout, version, None)
    except LabkitError as exc:
        return _report(engine.sync_engine, start, timeout, None, exc)


@dataclass(frozen=True)
class ConnectionBudget:
    """Connections the processes may open against what the server allows.

    ``needed`` is processes × (pool_size + max_overflow + 1 health probe), ``None`` for an
    unbounded pool; ``available`` is ``max_connections`` minus the reserved slots.
    """

    needed: int | None
    available: int
    processes: int
    per_process: int | None

    @property
    def ok(self) -> bool:
        """True when the processes cannot exceed what the server allows."""
        return self.needed is not None and self.needed <= self.available


def check_connection_budget(engine: Engine, settings: Settings) -> ConnectionBudget:
    """Compare the pools' worst case with ``SHOW max_connections``; log a warning if over.

    Counts ``settings.pool`` (pass the settings the engine was made with). Call it at
    start-up: it uses one pooled connection briefly. Raises a labkit error if the database
    cannot be asked.
    """
    try:
        with engine.connect() as conn:
            return _budget(conn, settings)
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=[engine.url.password]) from exc


async def async_check_connection_budget(engine: AsyncEngine,
                                        settings: Settings) -> ConnectionBudget:
    """Async twin of ``check_connection_budget``."""
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_budget, settings)
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=[engine.url.password]) from exc


def _budget(conn: Connection, settings: Settings) -> ConnectionBudget:
    available = conn.exec_driver_sql(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
        " - coalesce(current_setting('reserved_connections', true)::int, 0)").scalar_one()
    limit = settings.pool.max_connections
    per_process = None if limit is None else limit + 1
    budget = ConnectionBudget(
        needed=None if per_process is None else per_process * settings.processes,
        available=int(available), processes=settings.processes, per_process=per_process)
    if not budget.ok:
        logger.warning(
            "connection budget exceeded: %s process(es) x %s connections (pool_size + "
            "max_overflow + 1 probe) = %s, but the server allows %d (max_connections minus "
            "reserved slots); lower the pool or put PgBouncer in front",
            settings.processes, per_process or "unbounded", budget.needed or "unbounded",
            budget.available)
    return budget
