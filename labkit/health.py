"""Health checks: ``check_database`` raises, ``health_check`` reports (docs/concepts/health.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from concurrent import futures
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_, greenlet_spawn

from . import _private, errors, watchdog
from .errors import DatabaseUnavailableError, LabkitError, redact, translate_error

__all__ = ["HealthReport", "async_check_database", "async_health_check", "check_database",
           "health_check"]

logger = logging.getLogger("labkit")
DEFAULT_TIMEOUT = 5.0
_VERSION_SQL = "SELECT current_setting('server_version')"


@dataclass(frozen=True)
class HealthReport:
    """One probe: ``ok``, latency, version or error (no secrets), the application's pool."""

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
    """One engine's probe connection (outside its pool) and its in-flight probe."""

    _all: weakref.WeakKeyDictionary[Engine, _Probe] = weakref.WeakKeyDictionary()
    _all_lock = threading.Lock()

    @classmethod
    def of(cls, engine: Engine, timeout: float) -> _Probe:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        with cls._all_lock:
            return cls._all.get(engine) or cls._all.setdefault(engine, cls(engine))

    def __init__(self, engine: Engine) -> None:
        self.connect = _private.pool_creator(engine)
        self.lock, self.generation = threading.Lock(), 0
        self.connection: Any = None
        self.pending: Any = None  # the in-flight probe: a Future (sync) or a Task (async)
        self.loop: asyncio.AbstractEventLoop | None = None
        event.listen(engine, "engine_disposed", self.discard)

    def discard(self, *_: Any) -> None:
        with self.lock:
            self.generation, kept, self.connection = self.generation + 1, self.connection, None
        _close(kept)

    def run(self, timeout: float, query: Callable[[Any, float], str],
            loop: asyncio.AbstractEventLoop | None = None) -> str:
        """Query the kept connection or a fresh one; one fresh try if it died idle (no timeout)."""
        with self.lock:
            connection, self.connection = self.connection, None
            generation, stale = self.generation, None
            if loop is not self.loop:  # an async connection belongs to its loop
                self.loop, stale, connection = loop, connection, None
        _close(stale)
        while True:
            fresh = connection is None
            connection = self.open() if fresh else connection
            try:
                version = query(connection, timeout)
                with self.lock:  # keep it, unless disposed meanwhile
                    if generation == self.generation and self.connection is None:
                        self.connection, connection = connection, None
                return version
            except Exception as exc:
                if fresh or isinstance(exc, TimeoutError):
                    raise
            finally:
                _close(connection)  # unless kept
            connection = None

    def run_sync(self, future: futures.Future[str], timeout: float) -> None:
        try:
            future.set_result(self.run(timeout, _query))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            future.set_exception(exc)

    def open(self) -> Any:
        try:
            return self.connect()
        except Exception as exc:
            error = translate_error(exc)
            if isinstance(error, errors.ConnectionLostError):  # nothing was open to lose
                error = DatabaseUnavailableError(str(error), sqlstate=error.sqlstate)
            raise error from exc


def _close(connection: Any) -> None:
    driver: Any = getattr(connection, "driver_connection", connection)
    with contextlib.suppress(Exception):  # it is being thrown away
        if hasattr(driver, "terminate"):
            driver.terminate()  # asyncpg: no round trip to a server that may hang
        elif connection is not None:
            connection.close()


def _outcome(done: bool, future: Any, engine: Engine | AsyncEngine, timeout: float) -> str:
    """The shared probe's result for one caller, or its error as a labkit error."""
    exc = future.exception() if done else TimeoutError(f"no answer within {timeout:g} s")
    if isinstance(exc, TimeoutError):
        raise DatabaseUnavailableError(
            f"the database did not answer the health check within {timeout:g} s") from exc
    if exc is not None:  # labkit errors pass as they are; others get theirs as __cause__
        raise translate_error(exc, secrets=[engine.url.password])
    return str(future.result())


def _query(connection: Any, timeout: float) -> str:
    driver = getattr(connection, "driver_connection", connection)
    if hasattr(driver, "fetchval"):  # asyncpg: its timeout raises TimeoutError
        return str(await_(driver.fetchval(_VERSION_SQL, timeout=timeout)))
    connection.autocommit = True  # libpq: psycopg2, psycopg 3 (sync or async)
    ticket = watchdog.arm(driver.fileno(), timeout)  # cuts the socket at the deadline
    try:
        with connection.cursor() as cursor:
            cursor.execute(_VERSION_SQL)
            return str(cursor.fetchone()[0])
    finally:
        if ticket.disarm():  # the socket was cut: whatever happened, it is a timeout
            raise TimeoutError


def check_database(engine: Engine, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Return the server version, or raise a labkit error within ``timeout`` seconds."""
    probe = _Probe.of(engine, timeout)
    with probe.lock:
        future = probe.pending
        if future is None or future.done():
            future = probe.pending = futures.Future()
            threading.Thread(target=probe.run_sync, args=(future, timeout), daemon=True,
                             name="labkit-health").start()
    return _outcome(bool(futures.wait({future}, timeout=timeout).done), future, engine, timeout)


async def async_check_database(engine: AsyncEngine, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Async twin of ``check_database``: returns at the deadline, never later."""
    probe = _Probe.of(engine.sync_engine, timeout)
    task = probe.pending
    if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
        task = probe.pending = asyncio.ensure_future(greenlet_spawn(
            probe.run, timeout, _query, asyncio.get_running_loop()))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return _outcome(bool((await asyncio.wait({task}, timeout=timeout))[0]), task, engine, timeout)


def _report(engine: Engine, timeout: float, check: Callable[[], str]) -> HealthReport:
    start, version, error, message = time.perf_counter(), None, None, None
    try:
        version = check()
    except LabkitError as exc:
        error, message = type(exc).__name__, redact(str(exc), [engine.url.password])
    ms = round((time.perf_counter() - start) * 1000.0, 3)
    if error is not None:
        logger.warning("health check failed after %.1f ms: %s: %s", ms, error, message)
    pool, limit = engine.pool, _private.max_overflow(engine.pool)
    state = {"class": type(pool).__name__, **{n: getattr(pool, n)() for n in (
        "size", "checkedin", "checkedout", "overflow") if callable(getattr(pool, n, None))}}
    full = limit is not None and 0 <= limit <= state.get("checkedout", 0) - state.get("size", 0)
    return HealthReport(ok=error is None, latency_ms=ms, server_version=version, error=error,
                        message=message, timeout_s=timeout, pool=state, pool_saturated=full)


def health_check(engine: Engine, *, timeout: float = DEFAULT_TIMEOUT) -> HealthReport:
    """Probe the database and return a ``HealthReport``; never raises for database errors."""
    return _report(engine, timeout, lambda: check_database(engine, timeout=timeout))


async def async_health_check(engine: AsyncEngine, *,
                             timeout: float = DEFAULT_TIMEOUT) -> HealthReport:
    """Async twin of ``health_check`` (the check awaited from a greenlet)."""
    return await greenlet_spawn(_report, engine.sync_engine, timeout, lambda: await_(
        async_check_database(engine, timeout=timeout)))
