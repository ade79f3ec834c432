"""Network faults against the real server: each one happens, and each one is undone.

The proxy tests relay psycopg2 and asyncpg connections to the shared server through
``labkit.lab.proxy.FaultProxy``. The namespace tests start a throwaway server inside a
private network namespace (``labkit.lab.netns``: root, or an ordinary user in a user
namespace of its own) and drop packets there with nftables; their clients run inside the
namespace's helper process. Where no namespace can be created (a kernel without
unprivileged user namespaces, no ``nft``), they are skipped with the reason. Every fault
is left by an exception once, to prove that it undoes itself however its block ends.
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
import labkit.network.tcp
from labkit import ConnectionLostError, Settings, create_async_engine
from labkit.engine import engine_kwargs
from labkit.errors import translate_error
from labkit.lab.faults import throwaway_server
from labkit.lab.netns import NetworkNamespace, namespace_unavailable
from labkit.lab.proxy import (
    CUTS,
    OPEN_CONNECTIONS,
    REAPED,
    REPLIES_DROPPED,
    REQUESTS,
    FaultProxy,
)
from labkit.lab.server import LocalServer
from labkit.network.tcp import PRODUCTION_TCP, TcpSettings

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


def _waits(fn: Any, seconds: float) -> dict[str, Any]:
    """Run ``fn`` on a thread for up to ``seconds``; return its result, error or neither."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - what the client finally sees
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    box["waiting"] = worker.is_alive()
    box["thread"] = worker
    return box


def test_black_hole_leaves_every_client_waiting_even_with_tcp_timers_and_ends_with_its_block(
        proxy: FaultProxy, db_url: URL):
    # tcp_user_timeout and keepalives see nothing: the proxy's kernel ACKs and answers probes.
    conn = connect(db_url, proxy.port, tcp_user_timeout=500, keepalives=1, keepalives_idle=1,
                   keepalives_interval=1, keepalives_count=1)
    try:
        with pytest.raises(Boom):
            with proxy.black_hole():
                box = _waits(lambda: query(conn), 2.5)
                assert box["waiting"], box
                late = _waits(lambda: connect(db_url, proxy.port), 1.0)  # accepted, never relayed
                assert late["waiting"], late
                raise Boom
        fresh = connect(db_url, proxy.port)
        assert query(fresh) == 1                       # new connections are relayed again
        fresh.close()
    finally:
        proxy.close()                                  # ends the waits
        conn.close()
    box["thread"].join(5)
    late["thread"].join(5)
    assert not box["thread"].is_alive() and not late["thread"].is_alive()


def test_silently_lost_commit_reply_commits_and_leaves_the_client_waiting(
        proxy: FaultProxy, db_url: URL, observer: Engine):
    conn = connect(db_url, proxy.port, application_name="labkit-test-silent-commit")
    conn.autocommit = False
    with observer.begin() as admin:
        admin.execute(text("CREATE TABLE IF NOT EXISTS labkit_silent_commit (n int)"))
        admin.execute(text("TRUNCATE labkit_silent_commit"))
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO labkit_silent_commit VALUES (1)")
        proxy.drop_commit_reply(how="silent")
        box = _waits(conn.commit, 1.5)
        assert box["waiting"], box                      # no answer, no error
        with observer.connect() as seen:
            assert seen.execute(text("SELECT count(*) FROM labkit_silent_commit")).scalar_one() == 1
        stats = proxy.get_stats()
        assert stats[REPLIES_DROPPED] == 1 and stats[CUTS] == 0
    finally:
        proxy.close()
        box["thread"].join(5)
        conn.close()
        with observer.begin() as admin:
            admin.execute(text("DROP TABLE IF EXISTS labkit_silent_commit"))


# --- TCP settings (tests/test_tcp_settings.py reads them back from every driver's socket) --

def test_the_core_sets_no_tcp_options_and_the_kernel_defaults_stay(db_url: URL):
    assert not any(k.startswith(("keepalives", "tcp_"))
                   for k in engine_kwargs(Settings(url=db_url))["connect_args"])
    engine = labkit.network.tcp.create_engine(Settings(url=db_url), TcpSettings(), pool=ONE)
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


# --- a private network namespace (root, or an ordinary user) -------------------------------

WHY_NOT = namespace_unavailable()
needs_namespace = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespace: {WHY_NOT}")


@pytest.fixture(scope="module")
def inside() -> Iterator[tuple[NetworkNamespace, LocalServer]]:
    """A throwaway server listening on a private namespace's loopback."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    with NetworkNamespace() as ns, throwaway_server(netns=ns) as server:
        yield ns, server


# Run inside the namespace's helper (by reference: module-level functions only).

def _engine(url: URL, **tcp: Any) -> Engine:
    # No client-side statement deadline (labkit.deadline): only TCP settings end a wait.
    return labkit.network.tcp.create_engine(Settings(url=url, connect_timeout=2), TcpSettings(**tcp),
                                    pool=ONE)


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


def _connect_probe(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), 2).close()
    return True


def _partition_run(ns: NetworkNamespace, url: URL, port: int) -> dict[str, Any]:
    engine = _engine(url, user_timeout=1.5)
    seen: dict[str, Any] = {"before": _timed(engine)}
    try:
        with ns.partition(port) as table:
            # A statement sent into the partition is never ACKed: TCP_USER_TIMEOUT ends it.
            # Only the kernel dropping packets does that (a userspace proxy ACKs everything).
            seen["during"] = _timed(engine, "SELECT pg_sleep(0.2)")
            seen["dropped"] = table.dropped()
            raise Boom
    except Boom:
        seen["raised"] = True
    seen["rules_after"] = ns.nft("list ruleset")
    seen["after"] = _timed(engine)
    engine.dispose()
    return seen


def _reaper_run(ns: NetworkNamespace, url: URL, port: int) -> dict[str, Any]:
    path = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"
    seen: dict[str, Any] = {"initial": open(path).read().strip()}
    idle = busy = None
    try:
        with ns.reaping_idle(port, after=2) as table:
            seen["armed"] = open(path).read().strip()
            idle = _engine(url, user_timeout=1.0)        # ends a send nobody ACKs
            busy = _engine(url, keepalive_idle=1, keepalive_interval=1)
            seen["warm"] = (_timed(idle)[1], _timed(busy)[1])
            time.sleep(3.5)                              # idle past 2 s; busy probes every 1 s
            seen["idle"] = _timed(idle)                  # its flow was forgotten: dropped
            seen["busy"] = _timed(busy)                  # probes kept it known
            seen["dropped"] = table.dropped()
            raise Boom
    except Boom:
        seen["raised"] = True
    for engine in (idle, busy):
        if engine is not None:
            engine.dispose()
    seen["restored"] = open(path).read().strip()
    seen["rules_after"] = ns.nft("list ruleset")
    return seen


def _lost_replies_run(ns: NetworkNamespace, url: URL, port: int) -> dict[str, Any]:
    engine = _engine(url, user_timeout=1.0)
    seen: dict[str, Any] = {}
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS lost_replies (n int)"))
        conn.execute(text("TRUNCATE lost_replies"))
    with ns.partition(port, "replies") as table:
        # Autocommit: the INSERT commits as it runs, as a COMMIT would.
        seen["insert"] = _timed(engine.execution_options(isolation_level="AUTOCOMMIT"),
                                "INSERT INTO lost_replies VALUES (1)")
        seen["dropped"] = table.dropped()
    with engine.connect() as conn:
        seen["rows"] = conn.execute(text("SELECT count(*) FROM lost_replies")).scalar_one()
    engine.dispose()
    return seen


async def _server_version(url: URL) -> str:
    engine = create_async_engine(Settings(url=url), pool=ONE)
    try:
        async with engine.connect() as conn:
            return str((await conn.execute(text("SHOW server_version"))).scalar_one())
    finally:
        await engine.dispose()


@needs_namespace
def test_the_namespace_server_is_private_and_the_host_ruleset_is_untouched(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    port = server.info().port
    host_rules = _host_ruleset()
    assert ns.call(_connect_probe, port) is True
    with pytest.raises(OSError):                   # not on the host's loopback
        _connect_probe(port)
    with ns.partition(port):
        assert _host_ruleset() == host_rules
        assert "labkit_partition" in ns.nft("list ruleset")


@needs_namespace
def test_partition_drops_packets_in_the_kernel_and_is_lifted_when_the_block_raises(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    seen = ns.call(_partition_run, ns, server.info().url(), server.info().port)
    assert seen["before"][1] is None and seen["raised"]
    elapsed, error = seen["during"]
    assert error == "ConnectionLostError" and 1.0 < elapsed < 6.0, seen
    assert seen["dropped"] > 0
    assert "labkit_partition" not in seen["rules_after"]
    assert seen["after"][1] is None and seen["after"][0] < 2.0, seen


@needs_namespace
def test_lost_replies_let_the_statement_run_and_tcp_user_timeout_end_the_wait(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    seen = ns.call(_lost_replies_run, ns, server.info().url(), server.info().port)
    elapsed, error = seen["insert"]
    assert error == "ConnectionLostError" and 0.8 < elapsed < 4.0, seen
    assert seen["rows"] == 1 and seen["dropped"] > 0    # it ran and committed: its answer was lost


@needs_namespace
def test_kernel_idle_reaper_forgets_idle_flows_keepalives_keep_them_and_it_restores_conntrack(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    seen = ns.call(_reaper_run, ns, server.info().url(), server.info().port)
    assert seen["armed"] == "2" and seen["warm"] == (None, None) and seen["raised"]
    elapsed, error = seen["idle"]
    assert error == "ConnectionLostError" and elapsed < 4.0, seen
    assert seen["busy"][1] is None and seen["busy"][0] < 1.0, seen
    assert seen["dropped"] > 0
    assert seen["restored"] == seen["initial"] != "2"
    assert "labkit_reaper" not in seen["rules_after"]


@needs_namespace
def test_code_runs_inside_by_reference_and_its_errors_come_back(
        inside: tuple[NetworkNamespace, LocalServer]):
    ns, server = inside
    assert ns.run_async(_server_version, server.info().url())
    assert ns.call(os.getpid) != os.getpid()           # the helper process
    with pytest.raises(ZeroDivisionError):
        ns.call(divmod, 1, 0)
    with pytest.raises(OSError, match="failed in the namespace"):
        ns.run(["false"])


def _host_ruleset() -> str:
    import subprocess

    from labkit.lab.netns import _nft

    nft = _nft()
    assert nft is not None
    return subprocess.run([nft, "list", "ruleset"], capture_output=True, text=True,
                          check=False).stdout
