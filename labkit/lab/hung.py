"""Notebook 07's hung server, driver by driver: which setting ends which wait?

The server is frozen with ``SIGSTOP`` (``labkit.lab.faults.paused``): its kernel still
accepts connections and ACKs every byte, and nothing ever answers. Every client is set up
first (an engine, a warm connection); then, inside one freeze, all of them act at once,
each with one driver and one setting, and each caller's wait is timed. A wait still
running at ``cap`` is reported as ``"still waiting"``; the server is then resumed and
every wait ends.

```python
waits = hung_server_waits(server, url, seconds=1.0, cap=12.5)
charts.wait_matrix_chart(waits, cap=12.5, title="...")
```
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL

import labkit
import labkit.network.tcp
from labkit import (Settings, async_health_check, create_async_engine, create_engine,
                    health_check)
from labkit.deadline import bound_statements
from labkit.errors import translate_error
from labkit.lab.server import LocalServer
from labkit.network.tcp import TcpSettings

__all__ = ["ASYNCIO", "CHECKOUT", "COMMIT", "DEADLINE", "DRIVERS", "HEALTH", "POOL_TIMEOUT",
           "STATEMENT_TIMEOUT", "STILL_WAITING", "TCP", "hung_server_waits"]

STILL_WAITING = "still waiting"
#: column name: (Settings.driver, async engine?)
DRIVERS: dict[str, tuple[str | None, bool]] = {
    "psycopg2": (None, False), "psycopg 3 sync": ("psycopg", False),
    "asyncpg": (None, True), "psycopg 3 async": ("psycopg", True)}
# The cases, in the chart's order; "the deadline" is hung_server_waits' ``seconds``.
CHECKOUT = "checkout from a warm pool (labkit's pre-ping, connect_timeout)"
STATEMENT_TIMEOUT = "statement, statement_timeout 500 ms"
POOL_TIMEOUT = "statement, pool_timeout = the deadline"
TCP = "statement, keepalives + tcp_user_timeout 1 s"
DEADLINE = "statement, client deadline (labkit.deadline; asyncpg: command_timeout)"
ASYNCIO = "statement, asyncio.wait_for(the deadline)"
COMMIT = "COMMIT, client deadline (as above)"
HEALTH = "health check, timeout = the deadline"
_CASES = (CHECKOUT, STATEMENT_TIMEOUT, POOL_TIMEOUT, TCP, DEADLINE, ASYNCIO, COMMIT, HEALTH)
_TCP = TcpSettings(keepalive_idle=1, keepalive_interval=1, keepalive_count=1, user_timeout=1.0)
_ONE = labkit.DEVELOPMENT_POOL.replace(pool_size=1, max_overflow=0)  # with pre-ping


def _classify(exc: BaseException) -> str:
    return type(translate_error(exc)).__name__  # type: ignore[arg-type]


def _settings(url: URL, case: str, driver: str | None, connect_timeout: float) -> Settings:
    return Settings(url=url, driver="psycopg" if driver == "psycopg" else None,
                    connect_timeout=connect_timeout,
                    application_name="labkit-nb07-hung",
                    statement_timeout_ms=500 if case == STATEMENT_TIMEOUT else None)


def _pool(case: str) -> labkit.PoolProfile:
    return _ONE.replace(pool_timeout=1.0) if case == POOL_TIMEOUT else _ONE


def _sync_client(url: URL, case: str, driver: str | None, seconds: float,
                 connect_timeout: float) -> tuple[Callable[[], str | None], Callable[[], None]]:
    """Set one sync client up; return its action (the wait to time) and its clean-up."""
    settings = _settings(url, case, driver, connect_timeout)
    eng = (labkit.network.tcp.create_engine(settings, _TCP, pool=_pool(case)) if case == TCP
           else create_engine(settings, pool=_pool(case)))
    if case in (DEADLINE, COMMIT):
        bound_statements(eng, seconds)                       # labkit.deadline
    if case == HEALTH:
        if not health_check(eng, timeout=connect_timeout).ok:   # the probe's connection opens
            raise RuntimeError("the server did not answer before the freeze")
        return lambda: health_check(eng, timeout=seconds).error, eng.dispose
    if case == CHECKOUT:
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))                   # an idle connection in the pool

        def checkout() -> None:
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
        return _failure(checkout), eng.dispose
    conn = eng.connect()
    conn.execute(text("SELECT 1"))                           # checked out, in a transaction

    def clean_up() -> None:
        with contextlib.suppress(Exception):
            conn.close()
        eng.dispose()
    return _failure(conn.commit if case == COMMIT else
                    lambda: conn.execute(text("SELECT 2"))), clean_up


def _failure(action: Callable[[], Any]) -> Callable[[], str | None]:
    def run() -> str | None:
        try:
            action()
            return None
        except Exception as exc:  # noqa: BLE001 - classified
            return _classify(exc)
    return run


async def _async_client(url: URL, case: str, driver: str | None, seconds: float,
                        connect_timeout: float,
                        ) -> tuple[Callable[[], Awaitable[str | None]], Callable[[], Awaitable[None]]]:
    """Set one async client up; return its action and its clean-up."""
    settings = _settings(url, case, driver, connect_timeout)
    asyncpg_deadline = driver is None and case in (DEADLINE, COMMIT)
    connect_args = {"connect_args": {"command_timeout": seconds}} if asyncpg_deadline else {}
    eng = (labkit.network.tcp.create_async_engine(settings, _TCP, pool=_pool(case)) if case == TCP
           else create_async_engine(settings, pool=_pool(case), **connect_args))
    if driver == "psycopg" and case in (DEADLINE, COMMIT):
        bound_statements(eng.sync_engine, seconds)           # the same watchdog, on libpq's socket
    if case == HEALTH:
        if not (await async_health_check(eng, timeout=connect_timeout)).ok:
            raise RuntimeError("the server did not answer before the freeze")

        async def probe() -> str | None:
            return (await async_health_check(eng, timeout=seconds)).error
        return probe, eng.dispose
    if case == CHECKOUT:
        async with eng.connect() as conn:
            await conn.execute(text("SELECT 1"))

        async def checkout() -> None:
            async with eng.connect() as conn:
                await conn.execute(text("SELECT 1"))
        return _async_failure(checkout), eng.dispose
    conn = await eng.connect()
    await conn.execute(text("SELECT 1"))

    async def statement() -> None:
        if case == COMMIT:
            await conn.commit()
        elif case == ASYNCIO:
            await asyncio.wait_for(conn.execute(text("SELECT 2")), seconds)
        else:
            await conn.execute(text("SELECT 2"))

    async def clean_up() -> None:
        with contextlib.suppress(Exception):
            await conn.close()
        await eng.dispose()
    return _async_failure(statement), clean_up


def _async_failure(action: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[str | None]]:
    async def run() -> str | None:
        try:
            await action()
            return None
        except Exception as exc:  # noqa: BLE001 - classified
            return _classify(exc)
    return run


def hung_server_waits(server: LocalServer, url: URL, *, seconds: float = 1.0,
                      connect_timeout: float = 2.0, cap: float = 12.5,
                      ) -> dict[str, dict[str, tuple[float, str | None]]]:
    """Freeze ``server`` once; every driver's clients wait at once, one setting each.

    Args:
        server: The server to freeze (``SIGSTOP``), resumed before returning.
        url: Where the clients connect.
        seconds: The deadlines and timeouts under test (client deadline, asyncio, health
            check, ``pool_timeout``); ``connect_timeout`` bounds the pre-ping.
        connect_timeout: ``Settings.connect_timeout`` of every client.
        cap: Seconds after which we stop looking and resume the server.

    Returns:
        ``{case: {driver: (seconds waited, error class, None or "still waiting")}}``; the
        asyncio case only for the async drivers.
    """
    sync_drivers = {name: d for name, (d, is_async) in DRIVERS.items() if not is_async}
    async_drivers = {name: d for name, (d, is_async) in DRIVERS.items() if is_async}
    go, async_ready, resumed = threading.Event(), threading.Event(), threading.Event()
    ended: dict[tuple[str, str], tuple[float, str | None]] = {}
    failures: list[BaseException] = []

    def sync_run(key: tuple[str, str], action: Callable[[], str | None]) -> None:
        go.wait()
        began = time.perf_counter()
        outcome = action()
        ended[key] = (time.perf_counter() - began, outcome)

    async def async_main() -> None:
        actions, clean_ups = {}, []
        try:
            for case in _CASES:
                for name, driver in async_drivers.items():
                    action, clean_up = await _async_client(url, case, driver, seconds,
                                                           connect_timeout)
                    actions[case, name] = action
                    clean_ups.append(clean_up)
        except BaseException as exc:
            failures.append(exc)
            async_ready.set()
            raise
        async_ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)

        async def timed(key: tuple[str, str]) -> None:
            began = time.perf_counter()
            outcome = await actions[key]()
            ended[key] = (time.perf_counter() - began, outcome)

        await asyncio.gather(*(timed(key) for key in actions))   # all end once resumed
        await asyncio.get_running_loop().run_in_executor(None, resumed.wait)
        for clean_up in clean_ups:
            with contextlib.suppress(Exception):
                await clean_up()

    sync_clients = {(case, name): _sync_client(url, case, driver, seconds, connect_timeout)
                    for case in _CASES if case != ASYNCIO for name, driver in sync_drivers.items()}
    async_thread = threading.Thread(target=asyncio.run, args=(async_main(),), daemon=True)
    async_thread.start()
    async_ready.wait()
    if failures:
        for _, clean_up in sync_clients.values():
            clean_up()
        raise RuntimeError("an async client could not be set up") from failures[0]
    threads = [threading.Thread(target=sync_run, args=(key, action), daemon=True)
               for key, (action, _) in sync_clients.items()]
    for thread in threads:
        thread.start()
    everyone = len(sync_clients) + len(_CASES) * len(async_drivers)
    server.pause()
    try:
        start = time.perf_counter()
        go.set()
        while time.perf_counter() - start < cap and len(ended) < everyone:
            time.sleep(0.05)
        seen = dict(ended)                                   # what ended while frozen
    finally:
        server.resume()
        resumed.set()
    for thread in [*threads, async_thread]:
        thread.join(30)
    for _, clean_up in sync_clients.values():
        clean_up()
    waits: dict[str, dict[str, tuple[float, str | None]]] = {}
    for case in _CASES:
        for name, (_, is_async) in DRIVERS.items():
            if case == ASYNCIO and not is_async:
                continue
            waited, outcome = seen.get((case, name), (cap, STILL_WAITING))
            waits.setdefault(case, {})[name] = ((cap, STILL_WAITING) if waited >= cap
                                                else (waited, outcome))
    return waits
