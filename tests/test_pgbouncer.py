"""labkit through a real PgBouncer (Debian's package) in front of a throwaway server.

What ``labkit.network.pooler``'s engines change is proven in both directions: with them, many
transactions of both drivers pass through transaction mode and the statement timeout
still holds; with the core's engines, PgBouncer refuses labkit's connect-time
``statement_timeout`` and asyncpg's named prepared statements clash between worker
processes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from labkit import (
    TEST_POOL,
    ConfigurationError,
    Settings,
    create_async_engine,
    create_engine,
)
from labkit.engine import engine_kwargs
from labkit.network import pooler
from labkit.lab import pgbouncer as pgbouncer_module
from labkit.lab.faults import throwaway_server
from labkit.lab.pgbouncer import PgBouncer, PgBouncerError, pgbouncer, run_async_workers
from labkit.lab.server import LocalServer
from tests.conftest import DRIVERS, for_driver, is_async

APP = "labkit-pgb-test"


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with throwaway_server(prefix="labkit-pgbouncer-test-") as server:
        yield server


@pytest.fixture(scope="module")
def admin(server: LocalServer) -> Iterator[Engine]:
    """A direct connection to the server, to count what PgBouncer opened there."""
    engine = create_engine(Settings(url=server.info().url(), application_name="labkit-admin"),
                           pool=TEST_POOL)
    yield engine
    engine.dispose()


@pytest.fixture
def transaction_pooler(server: LocalServer) -> Iterator[PgBouncer]:
    with pgbouncer(server.info(), mode="transaction", pool_size=2) as bouncer:
        yield bouncer


def server_backends(admin: Engine, application_name: str | None = None) -> int:
    """Client backends on the server other than the admin's own."""
    with admin.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid() AND datname = current_database()"
            " AND (CAST(:app AS text) IS NULL OR application_name = :app)"),
            {"app": application_name}).scalar_one())


# --- the module itself ----------------------------------------------------------------

@pytest.mark.parametrize("factory", ["create_engine", "create_async_engine"])
def test_pooler_engines_refuse_url_options(factory: str) -> None:
    with pytest.raises(ConfigurationError, match="ALTER ROLE"):
        getattr(pooler, factory)(
            Settings(url="postgresql://u:p@db/x?options=-c%20search_path%3Dapp"))


class Captured(Exception):
    """Raised in ``do_connect``: the arguments were seen, nothing was connected."""


def _capture(engine: Engine) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    @event.listens_for(engine, "do_connect")
    def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.update(cparams)
        raise Captured

    return seen


def connect_params(engine: Engine) -> dict[str, Any]:
    """The keyword arguments the engine hands psycopg2 at connect, without connecting."""
    seen = _capture(engine)
    with pytest.raises(Captured):
        engine.raw_connection()
    return seen


async def async_connect_params(engine: AsyncEngine) -> dict[str, Any]:
    """The keyword arguments the engine hands asyncpg at connect, without connecting."""
    seen = _capture(engine.sync_engine)
    with pytest.raises(Captured):
        async with engine.connect():
            pass
    return seen


async def test_pooler_engines_send_no_session_state_at_connect() -> None:
    """What each engine hands its driver at connect (captured in ``do_connect``)."""
    settings = Settings(url="postgresql://u:p@db/x", statement_timeout_ms=1500)
    sync_engine = pooler.create_engine(settings)
    async_engine = pooler.create_async_engine(settings)
    try:
        sync_args = connect_params(sync_engine)
        assert "options" not in sync_args
        assert sync_args["application_name"] == "labkit"
        async_args = await async_connect_params(async_engine)
        assert async_args["server_settings"] == {"application_name": "labkit"}
        assert async_args["statement_cache_size"] == 0
        assert async_args["prepared_statement_cache_size"] == 0
        names = {async_args["prepared_statement_name_func"]() for _ in range(100)}
        assert len(names) == 100 and all(name.startswith("__labkit_") for name in names)
    finally:
        sync_engine.dispose()
        await async_engine.dispose()
    # The core's engines are unchanged: the timeout still goes at connect time.
    assert "statement_timeout=1500" in engine_kwargs(settings)["connect_args"]["options"]
    assert "statement_cache_size" not in engine_kwargs(settings, is_async=True)["connect_args"]
    assert settings.statement_timeout_ms == 1500    # the caller's settings are not changed


async def test_caller_connect_args_join_the_pooler_ones() -> None:
    settings = Settings(url="postgresql://u:p@db/x")
    engine = pooler.create_async_engine(settings, connect_args={"command_timeout": 5})
    try:
        args = await async_connect_params(engine)
        assert args["command_timeout"] == 5 and args["statement_cache_size"] == 0
    finally:
        await engine.dispose()


def test_missing_binary_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(pgbouncer_module, "_CANDIDATES", ())
    with pytest.raises(PgBouncerError, match="apt-get install -y pgbouncer"):
        pgbouncer_module.find_pgbouncer()


# --- the core's engines: what goes wrong ---------------------------------------------

@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_pgbouncer_refuses_connect_time_statement_timeout_through_libpq(
        transaction_pooler: PgBouncer, driver: str) -> None:
    settings = for_driver(Settings(url=transaction_pooler.info.url(), statement_timeout_ms=2000),
                          driver)
    engine = create_engine(settings)
    try:
        with pytest.raises(exc.OperationalError, match="unsupported startup parameter: options"):
            with engine.connect():
                pass
    finally:
        engine.dispose()


async def test_pgbouncer_refuses_connect_time_statement_timeout_asyncpg(
        transaction_pooler: PgBouncer) -> None:
    settings = Settings(url=transaction_pooler.info.url(), statement_timeout_ms=2000)
    engine = create_async_engine(settings)
    try:
        with pytest.raises(exc.DBAPIError,
                           match="unsupported startup parameter: statement_timeout"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()


@pytest.mark.slow
def test_asyncpg_prepared_statements_clash_between_processes_without_labkit_pooler(
        server: LocalServer) -> None:
    # One server connection: the second worker's transactions run on the connection the
    # first one left its named prepared statements on (transaction mode resets nothing).
    with pgbouncer(server.info(), mode="transaction", pool_size=1) as bouncer:
        first, second = run_async_workers(bouncer.info.url(), processes=2, transactions=20,
                                          use_pooler=False)
    assert first == {"ok": 20, "errors": {}}
    assert second["ok"] < 20
    assert any('prepared statement "__asyncpg_stmt_' in message and "already exists" in message
               for message in second["errors"]), second


@pytest.mark.slow
def test_asyncpg_workers_with_labkit_pooler_never_clash(server: LocalServer) -> None:
    with pgbouncer(server.info(), mode="transaction", pool_size=1) as bouncer:
        results = run_async_workers(bouncer.info.url(), processes=3, transactions=30,
                                    use_pooler=True)
    assert results == [{"ok": 30, "errors": {}}] * 3


# --- labkit.network.pooler's engines: transaction mode works ----------------------------------

def test_psycopg2_many_transactions_share_two_server_connections(
        transaction_pooler: PgBouncer, admin: Engine) -> None:
    settings = Settings(url=transaction_pooler.info.url(), statement_timeout_ms=3000,
                        application_name=f"{APP}-sync")
    engine = pooler.create_engine(settings,
                                  pool=settings.pool.replace(pool_size=8, max_overflow=0))
    errors: list[BaseException] = []
    timeouts: set[str] = set()
    peak = [0]
    barrier = threading.Barrier(8)

    def client() -> None:
        try:
            barrier.wait(10)
            for i in range(25):
                with engine.begin() as conn:
                    timeouts.add(conn.execute(text("SHOW statement_timeout")).scalar_one())
                    conn.execute(text("SELECT pg_sleep(0.001)"))
                    assert conn.execute(text("SELECT CAST(:i AS int)"), {"i": i}).scalar() == i
                peak[0] = max(peak[0], transaction_pooler.pools()["cl_active"])
        except BaseException as error:  # noqa: BLE001  (collected, asserted below)
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert timeouts == {"3s"}
        # 8 client connections to PgBouncer, never more than 2 on the server.
        assert peak[0] >= 2
        assert server_backends(admin, f"{APP}-sync") <= 2
        assert transaction_pooler.pools()["sv_used"] + transaction_pooler.pools()["sv_idle"] <= 2
    finally:
        engine.dispose()


async def test_asyncpg_many_transactions_through_transaction_mode(
        transaction_pooler: PgBouncer, admin: Engine) -> None:
    settings = Settings(url=transaction_pooler.info.url(), statement_timeout_ms=3000,
                        application_name=f"{APP}-async")
    engine = pooler.create_async_engine(settings,
                                        pool=settings.pool.replace(pool_size=10, max_overflow=0))

    async def client(n: int) -> set[str]:
        seen = set()
        for i in range(20):
            async with engine.begin() as conn:
                seen.add((await conn.execute(text("SHOW statement_timeout"))).scalar_one())
                value = (await conn.execute(text("SELECT CAST(:i AS int) + :n"),
                                            {"i": i, "n": n})).scalar_one()
                assert value == i + n
        return seen

    try:
        seen = await asyncio.gather(*(client(n) for n in range(10)))
        assert set().union(*seen) == {"3s"}
        assert await asyncio.to_thread(server_backends, admin, f"{APP}-async") <= 2
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
def test_statement_timeout_per_transaction_cancels_and_leaves_nothing_behind(
        transaction_pooler: PgBouncer, driver: str) -> None:
    settings = for_driver(Settings(url=transaction_pooler.info.url(), statement_timeout_ms=200),
                          driver)
    plain = for_driver(Settings(url=transaction_pooler.info.url()), driver)

    def run_sync() -> str:
        engine, other = pooler.create_engine(settings), pooler.create_engine(plain)
        try:
            with pytest.raises(exc.OperationalError, match="statement timeout"):
                with engine.begin() as conn:
                    conn.execute(text("SELECT pg_sleep(2)"))
            # SET LOCAL ended with the transaction: the server connections are clean.
            with other.begin() as conn:
                return str(conn.execute(text("SHOW statement_timeout")).scalar_one())
        finally:
            engine.dispose()
            other.dispose()

    async def run_async() -> str:
        engine, other = pooler.create_async_engine(settings), pooler.create_async_engine(plain)
        try:
            with pytest.raises(exc.DBAPIError, match="statement timeout"):
                async with engine.begin() as conn:
                    await conn.execute(text("SELECT pg_sleep(2)"))
            async with other.begin() as conn:
                return str((await conn.execute(text("SHOW statement_timeout"))).scalar_one())
        finally:
            await engine.dispose()
            await other.dispose()

    left = asyncio.run(run_async()) if is_async(driver) else run_sync()
    assert left == "0"


def test_session_mode_holds_a_server_connection_per_client_transaction_mode_does_not(
        server: LocalServer, admin: Engine) -> None:
    held: dict[str, int] = {}
    for mode in ("session", "transaction"):
        with pgbouncer(server.info(), mode=mode, pool_size=10) as bouncer:
            info = bouncer.info
            clients = [info.connect(application_name=f"{APP}-{mode}") for _ in range(6)]
            try:
                for conn in clients:  # one finished transaction each, then idle
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                    conn.commit()
                held[mode] = server_backends(admin, f"{APP}-{mode}")
            finally:
                for conn in clients:
                    conn.close()
    assert held["session"] == 6
    assert held["transaction"] <= 1


@pytest.mark.parametrize("driver", DRIVERS)
def test_health_check_leaves_no_statement_timeout_behind_a_pooler(
        server: LocalServer, driver: str) -> None:
    """Pins: the probe sets no timeout on the connection, so a pooler hands on nothing.

    Before, the probe ran a session-level ``SET statement_timeout`` on its connection;
    behind PgBouncer's transaction mode the next client of that server connection
    inherited it.
    """
    from labkit import async_health_check, health_check

    with pgbouncer(server.info(), mode="transaction", pool_size=1) as bouncer:
        settings = for_driver(Settings(url=bouncer.info.url()), driver)
        if not is_async(driver):
            engine = pooler.create_engine(settings)
            try:
                assert health_check(engine, timeout=3).ok
                with engine.begin() as conn:
                    left = conn.execute(text("SHOW statement_timeout")).scalar_one()
            finally:
                engine.dispose()
        else:
            async def probe_then_show() -> str:
                async_engine = pooler.create_async_engine(settings)
                try:
                    assert (await async_health_check(async_engine, timeout=3)).ok
                    async with async_engine.begin() as conn:
                        return str((await conn.execute(text("SHOW statement_timeout"))).scalar_one())
                finally:
                    await async_engine.dispose()
            left = asyncio.run(probe_then_show())
    assert left == "0"


# --- psycopg 3: prepared statements from the sixth run, unless the pooler engine says none

def _psycopg_prepared_clash(url: Any, engine_factory: Any, is_async: bool) -> list[str]:
    """Two client connections, one server connection: each runs one query 8 times, in
    turn (psycopg 3 prepares a query on its 6th run, as ``_pg3_0`` on every connection)."""
    settings = Settings(url=url, driver="psycopg", application_name=f"{APP}-pg3")
    errors: list[str] = []

    def run_sync() -> None:
        engine = engine_factory(settings)
        try:
            with engine.connect() as first, engine.connect() as second:
                for conn in [first] * 8 + [second] * 8:
                    try:
                        with conn.begin():
                            conn.execute(text("SELECT CAST(:i AS int)"), {"i": 1})
                    except exc.DBAPIError as error:
                        errors.append(str(error.orig))
        finally:
            engine.dispose()

    async def run_async() -> None:
        engine = engine_factory(settings)
        try:
            async with engine.connect() as first, engine.connect() as second:
                for conn in [first] * 8 + [second] * 8:
                    try:
                        async with conn.begin():
                            await conn.execute(text("SELECT CAST(:i AS int)"), {"i": 1})
                    except exc.DBAPIError as error:
                        errors.append(str(error.orig))
        finally:
            await engine.dispose()

    asyncio.run(run_async()) if is_async else run_sync()
    return errors


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_psycopg_prepared_statements_clash_in_transaction_mode_unless_the_pooler_engine(
        server: LocalServer, is_async: bool) -> None:
    """Pins: psycopg 3's automatic prepared statements break behind PgBouncer's transaction
    mode (1.18: no prepared-statement support) with the core's engine, and
    ``labkit.network.pooler`` (``prepare_threshold=None``) prepares none."""
    core = create_async_engine if is_async else create_engine
    through_pooler = pooler.create_async_engine if is_async else pooler.create_engine
    with pgbouncer(server.info(), mode="transaction", pool_size=1) as bouncer:
        clashes = _psycopg_prepared_clash(bouncer.info.url(), core, is_async)
        clean = _psycopg_prepared_clash(bouncer.info.url(), through_pooler, is_async)
    assert clashes and all('prepared statement "_pg3_0" already exists' in message
                           for message in clashes), clashes
    assert clean == []
