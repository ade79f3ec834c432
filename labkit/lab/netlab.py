"""Notebook 08's network experiments, run where the faults happen.

``fault_network()`` gives a throwaway server behind a network that can fail, and says
how it fails:

- **in the kernel** (``kernel=True``) where a network namespace can be created (root,
  or an ordinary user where the kernel allows user namespaces: ``labkit.lab.netns``):
  the server listens in the namespace, nftables rules drop packets, and the clients
  of each experiment run inside the namespace's helper process;
- **in the fault proxy** otherwise (``kernel=False``): the proxy black-holes flows
  (``labkit.lab.proxy``). The experiment runs and charts the same way, but the
  proxy's kernel ACKs every byte and answers keepalive probes, so the settings that
  rely on TCP's own timers (``tcp_user_timeout``, keepalives) see a healthy connection.
  ``why`` says why the kernel was not used. ``LABKIT_NETNS=off`` chooses the proxy.

Each experiment is a module-level function ``experiment(net, ...)`` run with
``net.run(experiment, ...)``; it returns plain data (seconds, error class names,
counts) for the notebook to print, chart and check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sqlalchemy
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import URL

import labkit
import labkit.network.tcp
from labkit import (Settings, async_run_in_transaction, create_async_engine,
                    create_async_sessionmaker, create_engine, create_sessionmaker, health_check,
                    run_in_transaction)
from labkit.deadline import bound_statements
from labkit.errors import translate_error
from labkit.lab.faults import throwaway_server
from labkit.lab.netns import NetworkNamespace, namespace_unavailable
from labkit.lab.proxy import OPEN_CONNECTIONS, REAPED, REPLIES_DROPPED, FaultProxy
from labkit.network.tcp import TcpSettings

__all__ = ["FaultNetwork", "fault_network", "idle_reaped", "lost_commit_reply",
           "partition_mid_query"]

T = TypeVar("T")
STILL_WAITING = "still waiting"
ONE = labkit.DEVELOPMENT_POOL.replace(pool_size=1, max_overflow=0, pool_pre_ping=False)


class Counted(Protocol):
    def dropped(self) -> int:
        """Packets dropped (kernel) or flows stopped (proxy) by the fault so far."""
        ...


@dataclass(frozen=True)
class FaultNetwork:
    """A throwaway server behind a network that fails on demand (see the module)."""

    url: URL
    """Where the clients connect (the server, or the proxy in front of it)."""
    kernel: bool
    """True: packets are dropped in the kernel; False: the fault proxy stands in."""
    why: str | None = None
    """Why the kernel is not used (None when it is)."""
    ns: NetworkNamespace | None = None
    port: int = 0
    proxy: FaultProxy | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Only the kernel's network travels to the namespace's helper.
        return (FaultNetwork, (self.url, self.kernel, self.why, self.ns, self.port, None))

    def run(self, experiment: Callable[..., T], **kwargs: Any) -> T:
        """Run ``experiment(self, **kwargs)`` where its clients can reach the server."""
        if self.ns is not None:
            return self.ns.call(experiment, self, **kwargs)
        return experiment(self, **kwargs)

    @contextlib.contextmanager
    def partition(self) -> Iterator[Counted]:
        """Nothing gets through either way for the duration of the block."""
        if self.ns is not None:
            with self.ns.partition(self.port) as table:
                yield table
            return
        assert self.proxy is not None
        caught = _Caught(self.proxy.get_stats()[OPEN_CONNECTIONS])
        with self.proxy.black_hole():
            yield caught

    @contextlib.contextmanager
    def replies_lost(self, commits: int) -> Iterator[Counted]:
        """Requests arrive and run; the server's answers (the next ``commits``) are lost."""
        if self.ns is not None:
            with self.ns.partition(self.port, "replies") as table:
                yield table
            return
        assert self.proxy is not None
        before = self.proxy.get_stats()[REPLIES_DROPPED]
        self.proxy.drop_commit_reply(times=commits, how="silent")
        proxy = self.proxy
        try:
            yield _Counter(lambda: proxy.get_stats()[REPLIES_DROPPED] - before)
        finally:
            proxy.disarm()

    @contextlib.contextmanager
    def reaping_idle(self, after: int) -> Iterator[Counted]:
        """Flows idle for ``after`` seconds are forgotten silently (arm before connecting)."""
        if self.ns is not None:
            with self.ns.reaping_idle(self.port, after) as table:
                yield table
            return
        assert self.proxy is not None
        before = self.proxy.get_stats()[REAPED]
        proxy = self.proxy
        with proxy.reaping_idle(after, "silent"):
            yield _Counter(lambda: proxy.get_stats()[REAPED] - before)


@dataclass
class _Caught:
    flows: int

    def dropped(self) -> int:
        return self.flows


@dataclass
class _Counter:
    read: Callable[[], int]

    def dropped(self) -> int:
        return self.read()


@contextlib.contextmanager
def fault_network(*, prefix: str = "labkit-netlab-", kernel: bool | None = None,
                  ) -> Iterator[FaultNetwork]:
    """Start a throwaway server behind a failing network; stop everything on exit.

    ``kernel``: None (default) uses a network namespace where one can be created here
    (unless ``LABKIT_NETNS=off``), else the fault proxy; True or False forces one.
    """
    why = namespace_unavailable()
    if os.environ.get("LABKIT_NETNS", "").lower() in ("off", "0", "no"):
        why = why or "LABKIT_NETNS=off"
    if kernel is None:
        kernel = why is None
    if kernel:
        with NetworkNamespace() as ns, throwaway_server(netns=ns, prefix=prefix) as server:
            info = server.info()
            yield FaultNetwork(info.url(), True, None, ns, info.port)
        return
    with throwaway_server(prefix=prefix) as server:
        info = server.info()
        with FaultProxy(info.host, info.port) as proxy:
            yield FaultNetwork(proxy.url(info.url()), False, why or "the fault proxy was chosen",
                               None, info.port, proxy)


# --- clients -------------------------------------------------------------------------------

def _classify(exc: BaseException) -> str:
    return type(translate_error(exc)).__name__  # type: ignore[arg-type]


def _engine(net: FaultNetwork, name: str, pool: labkit.PoolProfile = ONE,
            deadline: float | None = None, tcp: TcpSettings | None = None,
            **settings: Any) -> Engine:
    """A sync engine to the server: labkit.network.tcp's settings, labkit.deadline's bound."""
    options = {"connect_timeout": 2, **settings}
    conf = Settings(url=net.url, application_name=f"labkit-nb08-{name}", **options)
    eng = create_engine(conf, pool=pool) if tcp is None else \
        labkit.network.tcp.create_engine(conf, tcp, pool=pool)
    if deadline is not None:
        bound_statements(eng, deadline)
    return _tracked(eng)


def _async_engine(net: FaultNetwork, name: str, tcp: TcpSettings | None,
                  connect_args: dict[str, Any], driver: str | None) -> Any:
    """An async engine to the server (asyncpg, or psycopg 3 if ``driver == "psycopg"``),
    with labkit.network.tcp's settings if given."""
    settings = Settings(url=net.url, application_name=f"labkit-nb08-{name}",
                        driver="psycopg" if driver == "psycopg" else None)
    if tcp is None:
        return create_async_engine(settings, pool=ONE, connect_args=connect_args)
    return labkit.network.tcp.create_async_engine(settings, tcp, pool=ONE,
                                                  connect_args=connect_args)


def _tracked(eng: Engine) -> Engine:
    """Keep a duplicate of each connection's socket, so that a stuck request can be cut."""
    sockets: list[socket.socket] = []
    eng.labkit_sockets = sockets  # type: ignore[attr-defined]

    @event.listens_for(eng, "connect")
    def remember(dbapi_connection: Any, record: Any) -> None:
        sockets.append(socket.socket(fileno=os.dup(dbapi_connection.fileno())))

    return eng


def _cut(eng: Engine) -> None:
    """End every wait on the engine's connections (we stopped looking)."""
    for sock in eng.labkit_sockets:  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _shut(raw: Any) -> None:
    """End an async connection's wait: asyncpg's terminate(), or psycopg 3's socket shut down."""
    driver = raw.driver_connection
    if hasattr(driver, "terminate"):
        driver.terminate()
        return
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(driver.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _dispose(eng: Engine) -> None:
    eng.dispose()
    for sock in eng.labkit_sockets:  # type: ignore[attr-defined]
        sock.close()


# --- 1. idle flows reaped ----------------------------------------------------------------------

def _requests_in_a_row(eng: Engine, count: int, cap: float) -> dict[str, Any]:
    """Requests one after another: each one's seconds and outcome, and the first success."""
    outcomes: list[str | None] = []
    seconds: list[float] = []
    first_ok, start = None, time.perf_counter()
    for _ in range(count):
        box: dict[str, str | None] = {}

        def run() -> None:
            try:
                with eng.connect() as conn:
                    conn.execute(text("SELECT 1"))
                box["error"] = None
            except Exception as exc:  # noqa: BLE001 - classified
                box["error"] = _classify(exc)

        began = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(cap)
        if worker.is_alive():
            outcomes.append(STILL_WAITING)
            seconds.append(cap)
            _cut(eng)
            worker.join(5)
            continue
        outcomes.append(box["error"])
        seconds.append(time.perf_counter() - began)
        if box["error"] is None and first_ok is None:
            first_ok = time.perf_counter() - start
    return {"first_ok": first_ok, "outcomes": outcomes, "seconds": seconds}


def idle_reaped(net: FaultNetwork, *, reap_after: int = 2, idle: float = 3.5,
                cap: float = 6.0) -> dict[str, Any]:
    """Pools of one connection idle past the reaper's limit, then three requests each.

    Returns ``{"cases": {name: {"first_ok": seconds to the first success or None,
    "outcomes": [...], "seconds": [...], "opened": connections}}, "dropped": n}``; a
    request still waiting after ``cap`` seconds is cut and counted as ``"still waiting"``.
    """
    ping = ONE.replace(pool_pre_ping=True)
    cases: dict[str, Callable[[], Engine]] = {
        "no pre-ping": lambda: _engine(net, "reap-none"),
        "SQLAlchemy pre-ping (no deadline)": lambda: _tracked(sqlalchemy.create_engine(
            net.url.set(drivername="postgresql+psycopg2"), pool_size=1, max_overflow=0,
            pool_pre_ping=True)),
        "labkit pre-ping (connect_timeout 2 s)": lambda: _engine(net, "reap-ping", ping),
        "pre-ping + tcp_user_timeout 1 s": lambda: _engine(
            net, "reap-uto", ping, tcp=TcpSettings(user_timeout=1.0)),
        f"pool_recycle 1 s (< {reap_after} s limit)": lambda: _engine(
            net, "reap-recycle", ping.replace(pool_recycle=1)),
        "TCP keepalives every 1 s": lambda: _engine(net, "reap-keepalive", ping, tcp=TcpSettings(
            keepalive_idle=1, keepalive_interval=1, keepalive_count=3)),
    }
    results: dict[str, dict[str, Any]] = {}
    with net.reaping_idle(reap_after) as reaper:        # before any connection opens
        engines = {name: make() for name, make in cases.items()}
        for eng in engines.values():
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
        time.sleep(idle)
        threads = [threading.Thread(
            target=lambda n=name: results.__setitem__(n, _requests_in_a_row(engines[n], 3, cap)))
            for name in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        dropped = reaper.dropped()
    report = {name: {**results[name], "opened": len(eng.labkit_sockets)}  # type: ignore[attr-defined]
              for name, eng in engines.items()}
    for eng in engines.values():
        _dispose(eng)
    return {"cases": report, "dropped": dropped}


# --- 2. a partition in the middle of a query ------------------------------------------------

_KEEPALIVE = TcpSettings(keepalive_idle=1, keepalive_interval=1, keepalive_count=2)
_USER_TIMEOUT = TcpSettings(user_timeout=1.0)
_SYNC_CASES: dict[str, tuple[dict[str, Any], float, str]] = {
    # name: (_engine's arguments, delay after the go signal, statement)
    "psycopg2: no client deadline": ({}, 0.0, "SELECT pg_sleep(1)"),
    "psycopg2: statement_timeout 600 ms": ({"statement_timeout_ms": 600}, 0.0,
                                            "SELECT pg_sleep(1)"),
    "psycopg2: tcp_user_timeout 1 s": ({"tcp": _USER_TIMEOUT}, 0.0, "SELECT pg_sleep(1)"),
    "psycopg2: keepalives 1 s × 2 probes": ({"tcp": _KEEPALIVE}, 0.0, "SELECT pg_sleep(1)"),
    "psycopg2: labkit.deadline 1.5 s": ({"deadline": 1.5}, 0.0, "SELECT pg_sleep(1)"),
    "psycopg2: tcp_user_timeout 1 s, sent into it": ({"tcp": _USER_TIMEOUT}, 0.6, "SELECT 1"),
    "psycopg 3: tcp_user_timeout 1 s": ({"tcp": _USER_TIMEOUT, "driver": "psycopg"}, 0.0,
                                        "SELECT pg_sleep(1)"),
    "psycopg 3: keepalives 1 s × 2 probes": ({"tcp": _KEEPALIVE, "driver": "psycopg"}, 0.0,
                                             "SELECT pg_sleep(1)"),
    "psycopg 3: labkit.deadline 1.5 s": ({"deadline": 1.5, "driver": "psycopg"}, 0.0,
                                         "SELECT pg_sleep(1)"),
}
_HEALTH = "health check, timeout 1 s"
_ASYNC_CASES: dict[str, tuple[TcpSettings | None, dict[str, Any], str | None, float | None]] = {
    # name: (TCP settings, connect_args, driver (None: asyncpg), asyncio.wait_for's timeout)
    "asyncpg: no command_timeout": (None, {}, None, None),
    "asyncpg: command_timeout 1.5 s": (None, {"command_timeout": 1.5}, None, None),
    "asyncpg: asyncio.wait_for 1.5 s": (None, {}, None, 1.5),
    "asyncpg: keepalives 1 s × 2 probes": (_KEEPALIVE, {}, None, None),
    "psycopg 3 async: asyncio.wait_for 1.5 s": (None, {}, "psycopg", 1.5),
    "psycopg 3 async: keepalives 1 s × 2 probes": (_KEEPALIVE, {}, "psycopg", None),
}


def partition_mid_query(net: FaultNetwork, *, start_after: float = 0.3,
                        cap: float = 6.0) -> dict[str, Any]:
    """Clients of each driver wait on a statement when a partition starts; when does each
    get control back?

    Each client has one setting (see the names). Returns ``{"bounds": {name: (seconds
    from the start of the partition, error class or None or "still waiting")},
    "dropped": n}``.
    """
    go, ended = threading.Event(), {}
    clock: dict[str, float] = {}

    def sync_client(name: str, conn: Any, delay: float, sql: str) -> None:
        go.wait()
        time.sleep(delay)
        try:
            conn.execute(text(sql))
            error = None
        except Exception as exc:  # noqa: BLE001 - classified
            error = _classify(exc)
        ended[name] = (time.perf_counter(), error)

    def health_client(eng: Engine) -> None:
        go.wait()
        time.sleep(start_after + 0.05)             # just after the partition began
        report = health_check(eng, timeout=1.0)
        ended[_HEALTH] = (time.perf_counter(), report.error)

    async def async_clients() -> None:
        engines, conns = {}, {}
        for name, (tcp, connect_args, driver, _) in _ASYNC_CASES.items():
            engines[name] = _async_engine(net, "part-async", tcp, connect_args, driver)
            conns[name] = await engines[name].connect()
            await conns[name].execute(text("SELECT 1"))   # warm, inside a transaction
        await asyncio.get_running_loop().run_in_executor(None, go.wait)

        async def client(name: str) -> None:
            try:
                await asyncio.wait_for(conns[name].execute(text("SELECT pg_sleep(1)")),
                                       _ASYNC_CASES[name][3])
                error = None
            except Exception as exc:  # noqa: BLE001 - classified
                error = _classify(exc)
            ended[name] = (time.perf_counter(), error)

        tasks = {name: asyncio.ensure_future(client(name)) for name in _ASYNC_CASES}
        await asyncio.wait(tasks.values(), timeout=start_after + cap + 0.5)
        for name, task in tasks.items():
            if not task.done():                          # end the wait we gave up on
                _shut(await conns[name].get_raw_connection())
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for name in _ASYNC_CASES:
            with contextlib.suppress(Exception):
                await conns[name].close()
            await engines[name].dispose()

    sync_engines = {name: _engine(net, "part", **changes)
                    for name, (changes, _, _) in _SYNC_CASES.items()}
    sync_conns = {name: eng.connect() for name, eng in sync_engines.items()}
    for conn in sync_conns.values():
        conn.execute(text("SELECT 1"))                   # warm, inside a transaction
    health_engine = _engine(net, "part-health")
    if not health_check(health_engine, timeout=2).ok:    # the probe's connection is open
        raise RuntimeError("the server did not answer before the partition")
    threads = [threading.Thread(target=sync_client, args=(name, sync_conns[name], delay, sql),
                                daemon=True)
               for name, (_, delay, sql) in _SYNC_CASES.items()]
    threads.append(threading.Thread(target=health_client, args=(health_engine,), daemon=True))
    threads.append(threading.Thread(target=asyncio.run, args=(async_clients(),), daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(0.5)                                      # every client waits for "go"
    go.set()
    time.sleep(start_after)                              # the statements reach the server
    everyone = len(_SYNC_CASES) + 1 + len(_ASYNC_CASES)
    with net.partition() as partition:
        clock["start"] = time.perf_counter()
        while time.perf_counter() - clock["start"] < cap and len(ended) < everyone:
            time.sleep(0.05)
        dropped = partition.dropped()
    for eng in [*sync_engines.values(), health_engine]:
        _cut(eng)                                        # end the waits we gave up on
    for thread in threads:
        thread.join(10)
    bounds: dict[str, tuple[float, str | None]] = {}
    for name in [*_SYNC_CASES, _HEALTH, *_ASYNC_CASES]:
        at, error = ended.get(name, (None, None))
        waited = None if at is None else at - clock["start"]
        bounds[name] = (cap, STILL_WAITING) if waited is None or waited >= cap else (waited, error)
    for conn in sync_conns.values():
        with contextlib.suppress(Exception):
            conn.close()
    for eng in [*sync_engines.values(), health_engine]:
        _dispose(eng)
    return {"bounds": bounds, "dropped": dropped}


# --- 3. the answer to COMMIT lost on the way back --------------------------------------------

_COMMIT_SYNC_CASES: dict[str, dict[str, Any]] = {
    # name: _engine's arguments
    "psycopg2: kernel defaults": {},
    "psycopg2: keepalives 1 s × 2 probes": {"tcp": _KEEPALIVE},
    "psycopg2: labkit.deadline 1.5 s": {"deadline": 1.5},
    "psycopg2: tcp_user_timeout 1 s": {"tcp": _USER_TIMEOUT},
    "psycopg 3: kernel defaults": {"driver": "psycopg"},
    "psycopg 3: keepalives 1 s × 2 probes": {"tcp": _KEEPALIVE, "driver": "psycopg"},
    "psycopg 3: labkit.deadline 1.5 s": {"deadline": 1.5, "driver": "psycopg"},
    "psycopg 3: tcp_user_timeout 1 s": {"tcp": _USER_TIMEOUT, "driver": "psycopg"},
}
_COMMIT_ASYNC_CASES: dict[str, tuple[TcpSettings | None, dict[str, Any], str | None,
                                     float | None]] = {
    # name: (TCP settings, connect_args, driver (None: asyncpg), labkit.deadline's seconds)
    "asyncpg: kernel defaults": (None, {}, None, None),
    "asyncpg: keepalives 1 s × 2 probes": (_KEEPALIVE, {}, None, None),
    "asyncpg: command_timeout 1.5 s": (None, {"command_timeout": 1.5}, None, None),
    "asyncpg: tcp_user_timeout 1 s": (_USER_TIMEOUT, {}, None, None),
    "psycopg 3 async: kernel defaults": (None, {}, "psycopg", None),
    "psycopg 3 async: keepalives 1 s × 2 probes": (_KEEPALIVE, {}, "psycopg", None),
    "psycopg 3 async: labkit.deadline 1.5 s": (None, {}, "psycopg", 1.5),
    "psycopg 3 async: tcp_user_timeout 1 s": (_USER_TIMEOUT, {}, "psycopg", None),
}


def lost_commit_reply(net: FaultNetwork, *, cap: float = 6.0) -> dict[str, Any]:
    """Clients send COMMIT; the server commits; its answers are lost on the way back.

    Each client (psycopg2, psycopg 3, asyncpg, psycopg 3 async, through
    ``run_in_transaction`` or ``async_run_in_transaction``: labkit's default policy) has
    one setting (see the names). Returns ``{"waits": {name: (seconds from COMMIT to the
    caller's error, error class or "still waiting")}, "committed": rows the server
    stored, "clients": n, "dropped": n}``.
    """
    admin = create_engine(Settings(url=net.url, application_name="labkit-nb08-admin"),
                          pool=labkit.TEST_POOL)
    with admin.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS nb07_lost_commit"))
        conn.execute(text("CREATE TABLE nb07_lost_commit (client text PRIMARY KEY)"))
    everyone = len(_COMMIT_SYNC_CASES) + len(_COMMIT_ASYNC_CASES)
    # every sync client, the async clients' loop, and this thread
    inserted = threading.Barrier(len(_COMMIT_SYNC_CASES) + 2, timeout=30)
    go, gave_up, async_done = threading.Event(), threading.Event(), threading.Event()
    committing: dict[str, float] = {}
    ended: dict[str, tuple[float, str | None]] = {}
    engines = {name: _engine(net, "commit", **changes)
               for name, changes in _COMMIT_SYNC_CASES.items()}

    def client(name: str) -> None:
        def work(session: Any) -> None:
            session.execute(text("INSERT INTO nb07_lost_commit VALUES (:c)"), {"c": name})
            inserted.wait()
            go.wait()
            committing[name] = time.perf_counter()        # the COMMIT follows at once

        try:
            run_in_transaction(create_sessionmaker(engines[name]), work)
            error = None
        except Exception as exc:  # noqa: BLE001 - CommitOutcomeUnknownError expected
            error = type(exc).__name__
        ended[name] = (time.perf_counter(), error)

    async def async_clients() -> None:
        loop = asyncio.get_running_loop()
        aengines: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        for name, (tcp, connect_args, driver, deadline) in _COMMIT_ASYNC_CASES.items():
            aengines[name] = _async_engine(net, "commit-async", tcp, connect_args, driver)
            if deadline is not None:
                bound_statements(aengines[name].sync_engine, deadline)
            event.listen(aengines[name].sync_engine, "connect",
                         lambda dbapi, record, n=name: raw.__setitem__(n, dbapi))
        all_in, go_async, count = asyncio.Event(), asyncio.Event(), [0]

        async def aclient(name: str) -> None:
            async def work(session: Any) -> None:
                await session.execute(text("INSERT INTO nb07_lost_commit VALUES (:c)"),
                                      {"c": name})
                count[0] += 1
                if count[0] == len(_COMMIT_ASYNC_CASES):
                    all_in.set()
                await go_async.wait()
                committing[name] = time.perf_counter()    # the COMMIT follows at once

            try:
                await async_run_in_transaction(create_async_sessionmaker(aengines[name]), work)
                error = None
            except Exception as exc:  # noqa: BLE001 - CommitOutcomeUnknownError expected
                error = type(exc).__name__
            ended[name] = (time.perf_counter(), error)

        tasks = {name: asyncio.ensure_future(aclient(name)) for name in _COMMIT_ASYNC_CASES}
        await asyncio.wait_for(all_in.wait(), 10)
        await loop.run_in_executor(None, inserted.wait)   # every INSERT answered
        await loop.run_in_executor(None, go.wait)
        go_async.set()
        await loop.run_in_executor(None, gave_up.wait)
        for name, task in tasks.items():
            if not task.done() and name in raw:             # end the waits we gave up on
                with contextlib.suppress(Exception):
                    _shut(raw[name])
        async_done.set()
        await asyncio.wait(tasks.values(), timeout=10)
        for aengine in aengines.values():
            with contextlib.suppress(Exception):
                await aengine.dispose()

    threads = [threading.Thread(target=client, args=(name,), daemon=True) for name in engines]
    threads.append(threading.Thread(target=asyncio.run, args=(async_clients(),), daemon=True))
    for thread in threads:
        thread.start()
    inserted.wait()                                        # every INSERT answered
    with net.replies_lost(everyone) as fault:
        go.set()
        start = time.perf_counter()
        while time.perf_counter() - start < cap + 0.2 and len(ended) < everyone:
            time.sleep(0.05)
        dropped = fault.dropped()
        gave_up.set()
        for eng in engines.values():
            _cut(eng)                                      # end the waits we gave up on
        async_done.wait(5)
    for thread in threads:
        thread.join(10)
    waits: dict[str, tuple[float, str | None]] = {}
    for name in [*_COMMIT_SYNC_CASES, *_COMMIT_ASYNC_CASES]:
        at, error = ended.get(name, (None, None))
        waited = None if at is None else at - committing.get(name, start)
        waits[name] = (cap, STILL_WAITING) if waited is None or waited >= cap else (waited, error)
    with admin.connect() as conn:
        committed = conn.execute(text("SELECT count(*) FROM nb07_lost_commit")).scalar_one()
    for eng in engines.values():
        _dispose(eng)
    admin.dispose()
    return {"waits": waits, "committed": int(committed), "clients": everyone,
            "dropped": dropped}
