"""The core's promises, against a real PostgreSQL, for ``labkit`` and for a renamed copy.

Each test here imports the core through the ``core`` fixture only, so
``tests/test_copied_core.py`` runs this very file against ``myapp.db``, a copy of the
required core in a virtual environment with nothing but SQLAlchemy and the drivers.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from .conftest import Core, FaultProxy, module

SYNC_ASYNC = pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])


def settings(core: Core, url: URL, **changes: object) -> object:
    return core.Settings(url=url, connect_timeout=2.0, **changes)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture
def table(core_url: URL) -> object:
    """A fresh table ``t(id int primary key)``; dropped after the test."""
    name = f"core_{uuid.uuid4().hex[:10]}"
    observer = sa_create_engine(core_url.set(drivername="postgresql+psycopg2"),
                                poolclass=NullPool)
    with observer.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} (id int PRIMARY KEY)"))
    yield name, observer
    with observer.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    observer.dispose()


def count(observer: object, name: str) -> int:
    with observer.connect() as conn:  # type: ignore[attr-defined]
        return int(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one())


# --- c. no scope reports success for a transaction PostgreSQL rolled back -------------

def _scope_swallowing(core: Core, url: URL, name: str, *, is_async: bool,
                      savepoint: bool, kind: str) -> None:
    insert = text(f"INSERT INTO {name} VALUES (1)")

    def body(session_or_conn: object, execute: object) -> None:
        pass

    if not is_async:
        engine = core.create_engine(settings(core, url))
        factory = core.create_sessionmaker(engine)

        def work(session: object) -> None:
            session.execute(insert)  # type: ignore[attr-defined]
            try:
                if savepoint:
                    with session.begin_nested():  # type: ignore[attr-defined]
                        session.execute(text("SELECT 1/0"))  # type: ignore[attr-defined]
                else:
                    session.execute(text("SELECT 1/0"))  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - the mistake under test
                pass

        try:
            if kind == "scope":
                with core.session_scope(factory) as session:
                    work(session)
            elif kind == "run_in_transaction":
                core.run_in_transaction(factory, work)
            else:
                manager = core.web.SessionManager()
                manager.init(settings(core, url))
                try:
                    with manager.connect() as conn:
                        work(conn)
                finally:
                    manager.close()
        finally:
            engine.dispose()
        return

    async def main() -> None:
        engine = core.create_async_engine(settings(core, url))
        factory = core.create_async_sessionmaker(engine)

        async def work(session: object) -> None:
            await session.execute(insert)  # type: ignore[attr-defined]
            try:
                if savepoint:
                    async with session.begin_nested():  # type: ignore[attr-defined]
                        await session.execute(text("SELECT 1/0"))  # type: ignore[attr-defined]
                else:
                    await session.execute(text("SELECT 1/0"))  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass

        try:
            if kind == "scope":
                async with core.async_session_scope(factory) as session:
                    await work(session)
            elif kind == "run_in_transaction":
                await core.async_run_in_transaction(factory, work)
            else:
                manager = core.web.AsyncSessionManager()
                manager.init(settings(core, url))
                try:
                    async with manager.connect() as conn:
                        await work(conn)
                finally:
                    await manager.close()
        finally:
            await engine.dispose()

    run(main())


@SYNC_ASYNC
@pytest.mark.parametrize("kind", ["scope", "run_in_transaction", "manager"])
def test_a_block_that_swallowed_a_database_error_raises_instead_of_reporting_a_commit(
        core: Core, core_url: URL, table: object, is_async: bool, kind: str) -> None:
    name, observer = table  # type: ignore[misc]
    with pytest.raises(core.errors.ProgrammingError) as caught:
        _scope_swallowing(core, core_url, name, is_async=is_async, savepoint=False, kind=kind)
    assert caught.value.sqlstate == "25P02"
    assert "savepoint" in str(caught.value)
    assert count(observer, name) == 0


@SYNC_ASYNC
@pytest.mark.parametrize("kind", ["scope", "manager"])
def test_a_savepoint_around_the_failing_statement_lets_the_rest_commit(
        core: Core, core_url: URL, table: object, is_async: bool, kind: str) -> None:
    name, observer = table  # type: ignore[misc]
    _scope_swallowing(core, core_url, name, is_async=is_async, savepoint=True, kind=kind)
    assert count(observer, name) == 1


# --- b. work after a commit inside SessionManager.connect() is committed ---------------

@SYNC_ASYNC
def test_work_after_an_inner_commit_in_the_managers_connect_is_committed(
        core: Core, core_url: URL, table: object, is_async: bool) -> None:
    name, observer = table  # type: ignore[misc]
    if not is_async:
        manager = core.web.SessionManager()
        manager.init(settings(core, core_url))
        with manager.connect() as conn:
            conn.execute(text(f"INSERT INTO {name} VALUES (1)"))
            conn.commit()
            conn.execute(text(f"INSERT INTO {name} VALUES (2)"))
        manager.close()
    else:
        async def main() -> None:
            manager = core.web.AsyncSessionManager()
            manager.init(settings(core, core_url))
            async with manager.connect() as conn:
                await conn.execute(text(f"INSERT INTO {name} VALUES (1)"))
                await conn.commit()
                await conn.execute(text(f"INSERT INTO {name} VALUES (2)"))
            await manager.close()
        run(main())
    assert count(observer, name) == 2


# --- e, h. URL parameters: honoured by both drivers, or refused at once ------------------

@pytest.mark.parametrize("query", ["sslmod=require", "statement_cache_size=0",
                                   "keepalives_idle=5", "sslrootcert=/tmp/ca.pem"])
def test_an_unknown_or_one_driver_url_parameter_is_a_configuration_error_at_once(
        core: Core, core_url: URL, query: str) -> None:
    url = core_url.render_as_string(hide_password=False) + "?" + query
    started = time.monotonic()
    with pytest.raises(core.ConfigurationError) as caught:
        core.Settings(url=url)
    assert time.monotonic() - started < 1.0
    assert query.split("=")[0] in str(caught.value)
    assert (core_url.password or "") not in str(caught.value)


@SYNC_ASYNC
def test_application_name_and_connect_timeout_in_the_url_are_honoured_by_both_drivers(
        core: Core, core_url: URL, is_async: bool) -> None:
    app = f"h_{uuid.uuid4().hex[:8]}"
    url = core_url.render_as_string(hide_password=False) + \
        f"?application_name={app}&connect_timeout=3"
    config = core.Settings(url=url)
    assert (config.application_name, config.connect_timeout) == (app, 3.0)
    query = text("SELECT current_setting('application_name')")
    if not is_async:
        engine = core.create_engine(config)
        with engine.connect() as conn:
            assert conn.execute(query).scalar_one() == app
        engine.dispose()
    else:
        async def main() -> str:
            engine = core.create_async_engine(config)
            async with engine.connect() as conn:
                value = (await conn.execute(query)).scalar_one()
            await engine.dispose()
            return value
        assert run(main()) == app


def test_a_setting_given_twice_with_different_values_is_refused(core: Core,
                                                                 core_url: URL) -> None:
    url = core_url.render_as_string(hide_password=False) + "?application_name=a"
    with pytest.raises(core.ConfigurationError, match="given twice"):
        core.Settings(url=url, application_name="b")


# --- f. retry jitter differs between processes forked from one parent -----------------

def test_retry_delays_differ_between_forked_workers(core: Core) -> None:
    core.DEFAULT_RETRY  # imported in the parent, as gunicorn --preload does
    readers = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, repr(list(core.DEFAULT_RETRY.delays())).encode())
            os._exit(0)
        os.close(write)
        readers.append((pid, read))
    seen = []
    for pid, read in readers:
        os.waitpid(pid, 0)
        seen.append(os.read(read, 4096))
        os.close(read)
    assert seen[0] != seen[1]


# --- g. PoolMetrics gauges: right on every pool class, never zeroed by reset() ----------

@pytest.mark.parametrize("poolclass", ["queue", "null", "static"])
def test_in_use_gauge_is_right_on_every_pool_class_and_survives_reset(
        core: Core, core_url: URL, poolclass: str) -> None:
    profile = core.PoolProfile(poolclass=poolclass, pool_size=2, max_overflow=2)
    engine = core.create_engine(settings(core, core_url, pool=profile))
    metrics = core.PoolMetrics.attach(engine)
    held = [engine.connect() for _ in range(2)]
    try:
        assert metrics.gauges()["in_use"] == 2
        stats = metrics.snapshot()
        metrics.reset()
        assert stats["checkouts"] == 2 and stats["in_use"] == 2
        assert metrics.snapshot()["checkouts"] == 0
        assert metrics.gauges()["in_use"] == 2
    finally:
        for conn in held:
            conn.close()
    assert metrics.gauges()["in_use"] == 0
    engine.dispose()


# --- i. errors: one class per SQLSTATE, whatever the driver, with no password -----------

ERRORS = {
    "SELECT 1/0": ("ProgrammingError", "22012"),
    "SELECT * FROM no_such_table_here": ("ProgrammingError", "42P01"),
    "SET LOCAL statement_timeout = 50; SELECT pg_sleep(1)": ("QueryTimeoutError", "57014"),
}


@SYNC_ASYNC
@pytest.mark.parametrize("sql", list(ERRORS))
def test_the_same_sqlstate_gives_the_same_class_through_both_drivers(
        core: Core, core_url: URL, sql: str, is_async: bool) -> None:
    expected, code = ERRORS[sql]
    statements = [text(s) for s in sql.split("; ")]
    if not is_async:
        engine = core.create_engine(settings(core, core_url))
        with engine.connect() as conn:
            with pytest.raises(Exception) as caught:
                for statement in statements:
                    conn.execute(statement)
        engine.dispose()
    else:
        async def main() -> BaseException:
            engine = core.create_async_engine(settings(core, core_url))
            try:
                async with engine.connect() as conn:
                    for statement in statements:
                        await conn.execute(statement)
            except Exception as exc:  # noqa: BLE001
                return exc
            finally:
                await engine.dispose()
            raise AssertionError("no error")
        caught = pytest.raises(Exception)  # type: ignore[assignment]
        error = run(main())
        translated = core.errors.translate_error(error)
        assert (type(translated).__name__, translated.sqlstate) == (expected, code)
        return
    translated = core.errors.translate_error(caught.value)
    assert (type(translated).__name__, translated.sqlstate) == (expected, code)


def test_a_unique_violation_is_an_integrity_error(core: Core, core_url: URL,
                                                  table: object) -> None:
    name, _ = table  # type: ignore[misc]
    engine = core.create_engine(settings(core, core_url))
    factory = core.create_sessionmaker(engine)
    with pytest.raises(Exception) as caught:
        with core.session_scope(factory) as session:
            session.execute(text(f"INSERT INTO {name} VALUES (1), (1)"))
    engine.dispose()
    error = core.errors.translate_error(caught.value)
    assert isinstance(error, core.IntegrityError) and error.sqlstate == "23505"


@SYNC_ASYNC
def test_a_wrong_password_is_an_authentication_error_without_the_password(
        core: Core, core_url: URL, is_async: bool) -> None:
    secret = "Wr0ng-" + uuid.uuid4().hex
    config = settings(core, core_url.set(password=secret))
    report = (core.health_check(core.create_engine(config), timeout=5) if not is_async
              else run(core.async_health_check(core.create_async_engine(config), timeout=5)))
    assert not report.ok and report.error == "AuthenticationError"
    assert secret not in repr(report) and secret not in repr(config)


@SYNC_ASYNC
def test_a_refused_connection_is_unavailable(core: Core, core_url: URL,
                                             is_async: bool) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    config = settings(core, core_url.set(host="127.0.0.1", port=free))
    report = (core.health_check(core.create_engine(config), timeout=5) if not is_async
              else run(core.async_health_check(core.create_async_engine(config), timeout=5)))
    assert report.error == "DatabaseUnavailableError"


def test_the_callers_own_oserror_is_not_a_database_error(core: Core) -> None:
    try:
        open("/nonexistent/labkit/file")  # noqa: SIM115
    except OSError as exc:
        assert not core.errors.is_database_error(exc)


# --- a hung server with a warm pool, and a lost COMMIT answer ----------------------------

@SYNC_ASYNC
def test_a_checkout_from_a_warm_pool_on_a_hung_server_fails_within_connect_timeout(
        core: Core, core_url: URL, proxy: FaultProxy, is_async: bool) -> None:
    config = settings(core, proxy.url(core_url))
    if not is_async:
        engine = core.create_engine(config)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        proxy.frozen.set()
        started = time.monotonic()
        with pytest.raises(core.DatabaseUnavailableError):
            with engine.connect():
                pass
        elapsed = time.monotonic() - started
        report = core.health_check(engine, timeout=1.0)
    else:
        async def main() -> tuple[float, object]:
            engine = core.create_async_engine(config)
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            proxy.frozen.set()
            started = time.monotonic()
            with pytest.raises(core.DatabaseUnavailableError):
                async with engine.connect():
                    pass
            spent = time.monotonic() - started
            return spent, await core.async_health_check(engine, timeout=1.0)
        elapsed, report = run(main())  # type: ignore[misc]
    assert 1.5 < elapsed < 10.0  # connect_timeout 2 s, with margin for a busy machine
    assert not report.ok and report.latency_ms < 5000  # type: ignore[attr-defined]


@SYNC_ASYNC
def test_a_lost_commit_answer_is_outcome_unknown_and_never_stored_twice(
        core: Core, core_url: URL, proxy: FaultProxy, table: object, is_async: bool) -> None:
    name, observer = table  # type: ignore[misc]
    config = settings(core, proxy.url(core_url))
    proxy.drop_commit_answer.set()
    if not is_async:
        engine = core.create_engine(config)
        factory = core.create_sessionmaker(engine)
        with pytest.raises(core.CommitOutcomeUnknownError):
            core.run_in_transaction(
                factory, lambda s: s.execute(text(f"INSERT INTO {name} VALUES (1)")))
        engine.dispose()
    else:
        async def main() -> None:
            engine = core.create_async_engine(config)
            factory = core.create_async_sessionmaker(engine)

            async def work(session: object) -> None:
                await session.execute(text(f"INSERT INTO {name} VALUES (1)"))  # type: ignore[attr-defined]
            with pytest.raises(core.CommitOutcomeUnknownError):
                await core.async_run_in_transaction(factory, work)
            await engine.dispose()
        run(main())
    assert proxy.commits_dropped >= 1
    assert count(observer, name) == 1  # committed once, reported unknown, not run again


# --- a. the pytest plugin never touches a database that is not a test database ---------

@pytest.mark.parametrize("query_or_path", [
    "/app", "/app_test?dbname=app", "/app_test?database=app", "/app_test?service=prod", "/"])
def test_the_test_plugin_refuses_a_database_that_is_not_a_test_database(
        core: Core, core_url: URL, query_or_path: str) -> None:
    base = core_url.render_as_string(hide_password=False).rsplit("/", 1)[0]
    from sqlalchemy.engine import make_url

    url = make_url(base + query_or_path)
    with pytest.raises(core.ConfigurationError):
        core.testing.check_test_database(url)
    with pytest.raises(core.ConfigurationError):
        core.testing.create_database(url)
