"""Network faults against the real server: each one happens, and each one is undone.

The proxy tests (no root) relay psycopg2 and asyncpg connections to the shared server
through ``labkit.lab.network.FaultProxy``. The namespace tests (Linux, root; CI runs as
root) start a throwaway server inside a private network namespace and drop packets there
with nftables; without root they are skipped, with the reason. Every fault is left by an
exception once, to prove that it undoes itself however its block ends.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

import labkit
import labkit.tcp
from labkit import ConnectionLostError, Settings, create_async_engine
from labkit.engine import engine_kwargs
from labkit.errors import translate_error
from labkit.lab.faults import throwaway_server
from labkit.lab.network import (
    CUTS,
    OPEN_CONNECTIONS,
    REAPED,
    REQUESTS,
    FaultProxy,
    NetworkNamespace,
    namespace_unavailable,
)
from labkit.lab.server import LocalServer
from labkit.tcp import PRODUCTION_TCP, TcpSettings

ONE = labkit.DEVELOPMENT_POOL.replace(pool_size=1, max_overflow=0, pool_pre_ping=False)


class Boom(Exception):
    pass


def connect(url: URL, port: int, **options: Any) -> Any:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=url.username,
                            password=url.password, dbname=url.database, connect_timeout=5,
                            **options)
    conn.autocommit = True
    return conn


def query(conn: Any, sql: str = "SELECT 1") -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def round_trip(conn: Any, times: int = 5) -> float:
    """Median seconds of ``times`` one-round-trip statements."""
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        query(conn)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@pytest.fixture
def proxy(db_url: URL) -> Iterator[FaultProxy]:
    with FaultProxy(str(db_url.host), int(db_url.port or 5432)) as fault_proxy:
        yield fault_proxy


# --- the proxy ----------------------------------------------------------------------------

def test_added_latency_slows_every_round_trip_and_is_undone_when_the_block_raises(
        proxy: FaultProxy, db_url: URL):
    conn = connect(db_url, proxy.port)
    try:
        before = round_trip(conn)
        proxy.pop_stats()
        with pytest.raises(Boom):
            with proxy.added_latency(0.05):
                assert proxy.latency == pytest.approx(0.05)
                slowed = round_trip(conn)
                # A query's answer is several messages: delayed once, not per message.
                assert 0.045 < slowed < 0.05 + 0.04, slowed
                raise Boom
        assert proxy.latency == 0
        after = round_trip(conn)
        assert before < 0.02 and after < 0.02, (before, after)
        assert proxy.get_stats()[REQUESTS] == 10    # one Query message per statement
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["reset", "close"])
def test_cut_all_breaks_every_open_connection_and_new_ones_still_work(
        proxy: FaultProxy, db_url: URL, how: str):
    import psycopg2

    first, second = connect(db_url, proxy.port), connect(db_url, proxy.port)
    try:
        assert proxy.cut_all(how) == 2  # type: ignore[arg-type]
        for conn in (first, second):
            with pytest.raises(psycopg2.OperationalError):
                query(conn)
        assert proxy.get_stats()[CUTS] == 2
        fresh = connect(db_url, proxy.port)
        assert query(fresh) == 1
        fresh.close()
    finally:
        first.close()
        second.close()


def test_idle_reaper_cuts_only_flows_idle_past_the_limit_and_stops_when_the_block_raises(
        proxy: FaultProxy, db_url: URL):
    import psycopg2

    idle, busy = connect(db_url, proxy.port), connect(db_url, proxy.port)
    try:
        with pytest.raises(Boom):
            with proxy.reaping_idle(0.5, "reset"):
                for _ in range(10):             # 1 s: busy talks every 0.1 s, idle never
                    query(busy)
                    time.sleep(0.1)
                with pytest.raises(psycopg2.OperationalError):
                    query(idle)
                assert query(busy) == 1
                assert proxy.get_stats()[REAPED] == 1
                raise Boom
        survivor = connect(db_url, proxy.port)
        time.sleep(0.8)                          # idle past the old limit: nobody reaps now
        assert query(survivor) == 1
        survivor.close()
        assert proxy.get_stats()[REAPED] == 1
    finally:
        idle.close()
        busy.close()


def test_silent_reaper_leaves_the_client_waiting_and_closes_the_server_side(
        proxy: FaultProxy, db_url: URL, observer: Engine):
    conn = connect(db_url, proxy.port, application_name="labkit-test-silent")
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = query(conn)
        except Exception as exc:  # noqa: BLE001 - what the client finally sees
            box["error"] = exc

    with proxy.reaping_idle(0.3, "silent"):
        time.sleep(0.8)
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and not box     # no answer, no error: still waiting
        assert proxy.get_stats()[REAPED] == 1
        with observer.connect() as seen:
            backends = seen.execute(text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'labkit-test-silent'")).scalar_one()
        assert backends == 0                     # the server side was closed
    proxy.close()                                # leaving the proxy ends the flow
    worker.join(5.0)
    assert not worker.is_alive() and "error" in box
    conn.close()


def test_leaving_the_proxy_by_an_exception_closes_every_link_and_resets_its_faults(db_url: URL):
    import psycopg2

    with pytest.raises(Boom):
        with FaultProxy(str(db_url.host), int(db_url.port or 5432)) as proxy:
            conn = connect(db_url, proxy.port)
            proxy.drop_commit_reply(times=2)
            with proxy.added_latency(0.01), proxy.reaping_idle(30, "silent"):
                assert proxy.get_stats()[OPEN_CONNECTIONS] == 1
                raise Boom
    assert proxy.armed == 0 and proxy.latency == 0
    with pytest.raises(psycopg2.OperationalError):
        query(conn)
    conn.close()


# --- TCP settings reach both drivers --------------------------------------------------------

def _tcp_options(sock: socket.socket) -> tuple[int, int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


TCP = TcpSettings(keepalive_idle=7, keepalive_interval=3, keepalive_count=2, user_timeout=4.5)


def test_tcp_settings_are_set_on_psycopg2_sockets(db_url: URL):
    engine = labkit.tcp.create_engine(Settings(url=db_url), TCP, pool=ONE)
    try:
        with engine.connect() as conn:
            fileno = conn.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
            sock = socket.socket(fileno=os.dup(fileno))
            try:
                assert _tcp_options(sock) == (1, 7, 3, 2, 4500)
            finally:
                sock.close()
    finally:
        engine.dispose()


async def test_tcp_settings_are_set_on_asyncpg_sockets(db_url: URL):
    engine = labkit.tcp.create_async_engine(Settings(url=db_url), TCP, pool=ONE)
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            transport = raw.driver_connection._transport  # type: ignore[union-attr]
            sock = transport.get_extra_info("socket")
            assert _tcp_options(sock) == (1, 7, 3, 2, 4500)
    finally:
        await engine.dispose()


def test_the_core_sets_no_tcp_options_and_the_kernel_defaults_stay(db_url: URL):
    assert not any(k.startswith(("keepalives", "tcp_"))
                   for k in engine_kwargs(Settings(url=db_url))["connect_args"])
    engine = labkit.tcp.create_engine(Settings(url=db_url), TcpSettings(), pool=ONE)
    try:
        with engine.connect() as conn:
            fileno = conn.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
            sock = socket.socket(fileno=os.dup(fileno))
            try:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
            finally:
                sock.close()
    finally:
        engine.dispose()


def test_production_tcp_from_the_environment_reaches_libpq_and_the_socket_options():
    prod = TcpSettings.from_env({"ENVIRONMENT": "production"})
    assert prod == PRODUCTION_TCP
    assert (prod.keepalive_idle, prod.keepalive_interval, prod.keepalive_count,
            prod.user_timeout) == (60, 10, 3, 30.0)
    assert TcpSettings.from_env({}) == TcpSettings()
    tuned = TcpSettings.from_env({"ENVIRONMENT": "production", "DB_TCP_KEEPALIVE_IDLE": "20",
                                  "DB_TCP_USER_TIMEOUT": "5"})
    assert tuned.libpq_args() == {"keepalives": 1, "keepalives_idle": 20,
                                  "keepalives_interval": 10, "keepalives_count": 3,
                                  "tcp_user_timeout": 5000}
    assert tuned.socket_options() == [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 20),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000)]
    assert TcpSettings().libpq_args() == {} and TcpSettings().socket_options() == []
    assert TcpSettings(user_timeout=2).libpq_args() == {"tcp_user_timeout": 2000}


# --- a private network namespace (root) ---------------------------------------------------

WHY_NOT = namespace_unavailable()
needs_namespace = pytest.mark.skipif(WHY_NOT is not None, reason=f"needs root: {WHY_NOT}")


@pytest.fixture(scope="module")
def inside() -> Iterator[tuple[NetworkNamespace, LocalServer]]:
    """A throwaway server listening on a private namespace's loopback."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    with NetworkNamespace() as ns, throwaway_server(netns=ns) as server:
        yield ns, server


def _engine(ns: NetworkNamespace, server: LocalServer, **tcp: Any) -> Engine:
    # No client-side statement deadline (labkit.deadline): only TCP settings end a wait.
    settings = Settings(url=server.info().url(), connect_timeout=2)
    return ns.attach(labkit.tcp.create_engine(settings, TcpSettings(**tcp), pool=ONE))


def _timed(engine: Engine, sql: str = "SELECT 1", cap: float = 8.0) -> tuple[float, str | None]:
    """Run ``sql`` on a thread; return seconds until it ended and its error (None: ok)."""
    box: dict[str, Any] = {}

    def run() -> None:
        start = time.perf_counter()
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
            box["error"] = None
        except Exception as exc:  # noqa: BLE001 - classified below
            box["error"] = type(translate_error(exc)).__name__
        box["t"] = time.perf_counter() - start

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(cap)
    return (box["t"], box["error"]) if "t" in box else (cap, "still waiting")


@needs_namespace
def test_the_namespace_server_is_private_and_the_host_ruleset_is_untouched(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    port = server.info().port
    host_rules = _host_ruleset()
    assert ns.call(lambda: socket.create_connection(("127.0.0.1", port), 2).close()) is None
    with pytest.raises(OSError):                   # not on the host's loopback
        socket.create_connection(("127.0.0.1", port), 2).close()
    with ns.partition(port):
        assert _host_ruleset() == host_rules
        assert "labkit_partition" in ns.nft("list ruleset")


@needs_namespace
def test_partition_drops_packets_in_the_kernel_and_is_lifted_when_the_block_raises(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    port = server.info().port
    # A statement sent into the partition is never ACKed: TCP_USER_TIMEOUT ends it. Only
    # the kernel dropping packets does that (a userspace proxy ACKs everything), and
    # nothing else bounds it here.
    engine = _engine(ns, server, user_timeout=1.5)
    try:
        assert _timed(engine)[1] is None
        with pytest.raises(Boom):
            with ns.partition(port) as table:
                elapsed, error = _timed(engine, "SELECT pg_sleep(0.2)")
                assert error == "ConnectionLostError" and 1.0 < elapsed < 6.0, (elapsed, error)
                assert table.dropped() > 0
                raise Boom
        assert "labkit_partition" not in ns.nft("list ruleset")
        assert _timed(engine) == (pytest.approx(0, abs=2.0), None)
    finally:
        engine.dispose()


@needs_namespace
def test_kernel_idle_reaper_forgets_idle_flows_keepalives_keep_them_and_it_restores_conntrack(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    port = server.info().port
    path = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"
    idle = busy = None
    with pytest.raises(Boom):
        with ns.reaping_idle(port, after=2) as table:
            before = ns.call(lambda: open(path).read().strip())
            assert before == "2"
            idle = _engine(ns, server, user_timeout=1.0)   # ends a send nobody ACKs
            busy = _engine(ns, server, keepalive_idle=1, keepalive_interval=1)
            assert _timed(idle)[1] is None and _timed(busy)[1] is None
            time.sleep(3.5)                      # idle past 2 s; busy probes every 1 s
            elapsed, error = _timed(idle)        # its flow was forgotten: dropped, silently
            assert error == "ConnectionLostError" and elapsed < 4.0, (elapsed, error)
            assert _timed(busy) == (pytest.approx(0, abs=1.0), None)  # probes kept it known
            assert table.dropped() > 0
            raise Boom
    assert idle is not None and busy is not None
    idle.dispose()
    busy.dispose()
    assert ns.call(lambda: open(path).read().strip()) != "2"
    assert "labkit_reaper" not in ns.nft("list ruleset")


@needs_namespace
def test_async_code_runs_inside_with_run_async(inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside

    async def version() -> str:
        engine = create_async_engine(Settings(url=server.info().url()), pool=ONE)
        try:
            async with engine.connect() as conn:
                return str((await conn.execute(text("SHOW server_version"))).scalar_one())
        finally:
            await engine.dispose()

    assert ns.run_async(version)
    with pytest.raises(TypeError):
        ns.attach(create_async_engine(Settings(url=server.info().url())))  # type: ignore[arg-type]


def _host_ruleset() -> str:
    import subprocess

    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                          check=True).stdout
