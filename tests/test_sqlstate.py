"""One SQLSTATE table for every driver: the same server error gives the same labkit class.

Issue 10, item 4. Every case is a real error from the real server, raised through a
real driver: each test runs through psycopg2 and psycopg 3 (sync engines) and through
asyncpg and psycopg 3 (async engines), behind the same small interface, and asserts the same
labkit class and the SQLSTATE the server sent. Errors that can be produced safely are
produced naturally (a held row lock, a deadlock, a killed backend, a full connection
limit); the rest (disk full, out of memory) are raised by the server with
``RAISE ... USING ERRCODE``, which sends exactly that SQLSTATE.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from labkit import (
    TEST_POOL,
    CommitOutcomeUnknownError,
    ConnectionLostError,
    DatabaseError,
    DatabaseUnavailableError,
    IntegrityError,
    QueryTimeoutError,
    RetryExhaustedError,
    RetryPolicy,
    SerializationError,
    Settings,
    TransientError,
    async_wait_for_database,
    create_async_engine,
    create_engine,
    wait_for_database,
)
from labkit.errors import AuthenticationError, ProgrammingError
from tests.conftest import DRIVERS, for_driver, is_async, translated


class Conn:
    """One open connection through the driver under test; errors come out translated."""

    def __init__(self, driver: str, conn: Any) -> None:
        self.driver = driver
        self._conn = conn

    async def execute(self, sql: str) -> Any:
        """Run ``sql`` and return the first column of its first row, if any."""
        with translated():
            if not is_async(self.driver):
                result = self._conn.execute(text(sql))
            else:
                result = await self._conn.execute(text(sql))
        return result.scalar() if result.returns_rows else None


@contextlib.asynccontextmanager
async def connect(driver: str, url: URL) -> AsyncIterator[Conn]:
    """Open one connection (no pool) through ``driver``; connect errors are translated."""
    settings = for_driver(Settings(url=url, pool=TEST_POOL, connect_timeout=5.0), driver)
    if not is_async(driver):
        engine = create_engine(settings)
        try:
            with translated():
                conn = engine.connect()
            try:
                yield Conn(driver, conn)
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
        finally:
            engine.dispose()
    else:
        async_engine = create_async_engine(settings)
        try:
            with translated():
                aconn = await async_engine.connect()
            try:
                yield Conn(driver, aconn)
            finally:
                with contextlib.suppress(Exception):
                    await aconn.close()
        finally:
            await async_engine.dispose()


async def fails(conn: Conn, sql: str) -> DatabaseError:
    """Run ``sql``, which must fail; return the labkit error it was translated into."""
    with pytest.raises(DatabaseError) as info:
        await conn.execute(sql)
    return info.value


async def connect_fails(driver: str, url: URL) -> DatabaseError:
    """Connect to ``url``, which must fail; return the labkit error."""
    with pytest.raises(DatabaseError) as info:
        async with connect(driver, url) as conn:
            await conn.execute("SELECT 1")
    return info.value


def is_superuser(observer: Engine) -> bool:
    with observer.connect() as conn:
        return bool(conn.execute(text("SELECT rolsuper FROM pg_roles "
                                      "WHERE rolname = current_user")).scalar())


def wait_until(observer: Engine, sql: str, params: dict[str, Any], *,
               timeout: float = 10.0) -> None:
    """Poll ``sql`` (through the observer) until it returns a true value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with observer.connect() as conn:
            if conn.execute(text(sql), params).scalar():
                return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for: {sql}")


@contextlib.contextmanager
def in_thread(target: Any) -> Iterator[None]:
    """Run ``target`` in a thread for the duration of the block; re-raise its error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        yield
    finally:
        worker.join(30)
    assert not worker.is_alive(), "helper thread did not finish"
    if errors:
        raise errors[0]


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rows(observer: Engine, table: str) -> str:
    """The ``table`` fixture with rows 1 and 2."""
    with observer.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')"))
    return table


# --- naturally produced -------------------------------------------------------------

async def test_row_lock_held_elsewhere_with_nowait_is_a_query_timeout_55P03(
        driver: str, db_url: URL, observer: Engine, rows: str) -> None:
    """Pins: 55P03 (lock not available) is ``QueryTimeoutError`` (transient) with
    ``sqlstate == "55P03"``, through both drivers (the old ``LockNotAvailableError``).

    Before: psycopg2 gave ``DatabaseUnavailableError`` ("Is the server running?") and
    asyncpg a plain ``DatabaseError``.
    """
    with observer.connect() as holder:
        holder.execute(text(f"SELECT * FROM {rows} WHERE id = 1 FOR UPDATE"))
        async with connect(driver, db_url) as conn:
            error = await fails(conn, f"SELECT * FROM {rows} WHERE id = 1 FOR UPDATE NOWAIT")
        holder.rollback()
    assert type(error) is QueryTimeoutError and error.sqlstate == "55P03"
    assert isinstance(error, TransientError)
    assert "Is the server running" not in str(error)
    assert "NOWAIT" in str(error)


async def test_concurrent_update_under_serializable_is_a_serialization_error_40001(
        driver: str, db_url: URL, observer: Engine, rows: str) -> None:
    """Guards 40001 (serialization_failure) -> ``SerializationError`` for both drivers."""
    async with connect(driver, db_url) as conn:
        await conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        await conn.execute(f"SELECT note FROM {rows} WHERE id = 1")  # the snapshot
        with observer.begin() as other:
            other.execute(text(f"UPDATE {rows} SET note = 'other' WHERE id = 1"))
        error = await fails(conn, f"UPDATE {rows} SET note = 'mine' WHERE id = 1")
    assert type(error) is SerializationError and error.sqlstate == "40001"


async def test_deadlock_is_a_serialization_error_40P01(
        driver: str, db_url: URL, observer: Engine, rows: str) -> None:
    """Guards 40P01 (deadlock_detected) -> ``SerializationError`` with the deadlock hint.

    The observer waits first with a long ``deadlock_timeout``; the connection under test
    closes the cycle with a short one, so it is the one the server aborts, every time.
    """
    if not is_superuser(observer):
        pytest.skip("SET deadlock_timeout needs a superuser")
    async with connect(driver, db_url) as conn:
        await conn.execute("SET deadlock_timeout = '100ms'")
        await conn.execute(f"SELECT * FROM {rows} WHERE id = 1 FOR UPDATE")
        other_pid: list[int] = []
        locked_2 = threading.Event()

        def other_side() -> None:
            with observer.connect() as other:
                other.execute(text("SET deadlock_timeout = '60s'"))
                other_pid.append(other.execute(text("SELECT pg_backend_pid()")).scalar_one())
                other.execute(text(f"SELECT * FROM {rows} WHERE id = 2 FOR UPDATE"))
                locked_2.set()
                other.execute(text(f"SELECT * FROM {rows} WHERE id = 1 FOR UPDATE"))
                other.rollback()

        with in_thread(other_side):
            assert locked_2.wait(10)
            wait_until(observer, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                       "WHERE pid = :pid", {"pid": other_pid[0]})
            error = await fails(conn, f"SELECT * FROM {rows} WHERE id = 2 FOR UPDATE")
    assert type(error) is SerializationError and error.sqlstate == "40P01"
    assert "Deadlock" in str(error)


@pytest.mark.parametrize(("sql", "sqlstate", "kind"), [
    pytest.param("INSERT INTO {t} VALUES (1, 'again')", "23505", IntegrityError,
                 id="23505-unique"),
    pytest.param("SELECT 1 / 0", "22012", ProgrammingError, id="22012-division-by-zero"),
    pytest.param("SELECT 'abc'::int", "22P02", ProgrammingError, id="22P02-invalid-text"),
    pytest.param("SELECT * FROM labkit_no_such_table", "42P01", ProgrammingError,
                 id="42P01-undefined-table"),
    pytest.param("SELEC 1", "42601", ProgrammingError, id="42601-syntax"),
])
async def test_statement_errors_map_the_same_through_both_drivers(
        driver: str, db_url: URL, rows: str, sql: str, sqlstate: str,
        kind: type[DatabaseError]) -> None:
    """Guards 23505, 22012, 42P01 and 42601: same class through psycopg2 and asyncpg."""
    async with connect(driver, db_url) as conn:
        error = await fails(conn, sql.format(t=rows))
    assert type(error) is kind and error.sqlstate == sqlstate
    assert not isinstance(error, TransientError)


async def test_read_only_transaction_is_a_programming_error_that_names_replicas_25006(
        driver: str, db_url: URL, rows: str) -> None:
    """Pins: 25006 is ``ProgrammingError`` with a hint about replicas and failover.

    Before: a plain ``DatabaseError`` ("The database reported an error").
    """
    async with connect(driver, db_url) as conn:
        await conn.execute("SET TRANSACTION READ ONLY")
        error = await fails(conn, f"INSERT INTO {rows} VALUES (3, 'c')")
    assert type(error) is ProgrammingError and error.sqlstate == "25006"
    assert "replica" in str(error) and "primary" in str(error)


async def test_statement_timeout_is_a_query_timeout_57014(driver: str, db_url: URL) -> None:
    """Guards 57014 (query_canceled by ``statement_timeout``) -> ``QueryTimeoutError``."""
    async with connect(driver, db_url) as conn:
        await conn.execute("SET statement_timeout = '100ms'")
        error = await fails(conn, "SELECT pg_sleep(5)")
    assert type(error) is QueryTimeoutError and error.sqlstate == "57014"
    assert "longer than statement_timeout" in str(error)


async def test_missing_server_file_is_a_plain_database_error_58P01(
        driver: str, db_url: URL, observer: Engine) -> None:
    """Pins: 58P01 (undefined_file, class 58 system error) is a plain ``DatabaseError``
    with ``sqlstate == "58P01"`` (the old ``ServerError``), not retried.

    Before: psycopg2 gave ``DatabaseUnavailableError`` (retried as "Is the server
    running?"), asyncpg a plain ``DatabaseError``.
    """
    if not is_superuser(observer):
        pytest.skip("pg_read_file needs a superuser")
    async with connect(driver, db_url) as conn:
        error = await fails(conn, "SELECT pg_read_file('/nonexistent')")
    assert type(error) is DatabaseError and error.sqlstate == "58P01"
    assert not isinstance(error, TransientError)


async def test_backend_terminated_mid_query_is_a_lost_connection(
        driver: str, db_url: URL, observer: Engine) -> None:
    """Pins: ``pg_terminate_backend`` during a query is ``ConnectionLostError`` for both.

    The drivers see it differently: psycopg2 reports "server closed the connection
    unexpectedly" (no SQLSTATE; SQLAlchemy marks the connection invalidated), asyncpg
    raises ``ConnectionDoesNotExistError`` (08003) caused by the server's
    ``AdminShutdownError`` (57P01, the code kept). Before: asyncpg's case was
    ``DatabaseUnavailableError`` (class 08 meant "cannot connect").
    """
    async with connect(driver, db_url) as conn:
        pid = await conn.execute("SELECT pg_backend_pid()")

        def kill() -> None:
            wait_until(observer, "SELECT query LIKE '%pg_sleep%' AND state = 'active' "
                       "FROM pg_stat_activity WHERE pid = :pid", {"pid": pid})
            with observer.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        with in_thread(kill):
            error = await fails(conn, "SELECT pg_sleep(30)")
    assert type(error) is ConnectionLostError
    assert error.sqlstate in (None, "57P01", "08003", "08006")


# --- errors while connecting --------------------------------------------------------

async def test_unknown_database_fails_as_a_non_transient_error_naming_it_3D000(
        driver: str, db_url: URL) -> None:
    """Pins: 3D000 at connect is ``ProgrammingError`` whose hint says the database does
    not exist, the driver's words naming it.

    psycopg2 carries no SQLSTATE at connect; it is read from the FATAL message. Before:
    psycopg2 gave ``DatabaseUnavailableError`` (transient), asyncpg "The SQL is wrong".
    """
    name = f"labkit_missing_{uuid.uuid4().hex[:8]}"
    error = await connect_fails(driver, db_url.set(database=name))
    assert type(error) is ProgrammingError and error.sqlstate == "3D000"
    hint, _, words = str(error).partition(" [")
    assert "does not exist on this server" in hint
    assert f'"{name}"' in words


async def test_wrong_password_is_an_authentication_error_28P01(
        driver: str, db_url: URL) -> None:
    """Guards 28P01 at connect -> ``AuthenticationError``, the password never shown."""
    if not db_url.password:
        pytest.skip("the server under test uses no password")
    wrong = f"Wr0ng-{uuid.uuid4().hex}"
    error = await connect_fails(driver, db_url.set(password=wrong))
    assert type(error) is AuthenticationError and error.sqlstate == "28P01"
    assert wrong not in str(error) and str(db_url.password) not in str(error)


@pytest.fixture
def limited_role(observer: Engine, db_url: URL) -> Iterator[URL]:
    """A login role with ``CONNECTION LIMIT 1`` (dropped afterwards); yields its URL."""
    role = f"labkit_limit_{uuid.uuid4().hex[:8]}"
    secret = uuid.uuid4().hex
    with observer.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}' CONNECTION LIMIT 1"))
    try:
        yield db_url.set(username=role, password=secret)
    finally:
        with observer.begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE usename = :role"), {"role": role})
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))


async def test_connection_limit_reached_at_connect_is_unavailable_53300(
        driver: str, limited_role: URL) -> None:
    """Pins: 53300 at connect ("too many connections for role") is
    ``DatabaseUnavailableError`` with ``sqlstate == "53300"`` (the old
    ``TooManyConnectionsError``) and a hint about connection slots.

    psycopg2 has no SQLSTATE there; it is read from the FATAL message. Before: psycopg2
    gave ``DatabaseUnavailableError`` ("Is the server running?").
    """
    holder = create_engine(Settings(url=limited_role, pool=TEST_POOL))
    try:
        with holder.connect() as held:
            held.execute(text("SELECT 1"))  # the role's one slot
            error = await connect_fails(driver, limited_role)
    finally:
        holder.dispose()
    assert type(error) is DatabaseUnavailableError and error.sqlstate == "53300"
    assert "no connection slot left" in str(error)
    assert "Is the server running" not in str(error)


async def test_wait_for_database_gives_up_at_once_on_an_unknown_database(
        driver: str, db_url: URL) -> None:
    """Pins: ``wait_for_database`` does not retry a wrong database name until its deadline.

    Before: through psycopg2 the 3D000 was transient, so it retried for the whole
    deadline and ended as ``RetryExhaustedError``.
    """
    url = db_url.set(database=f"labkit_missing_{uuid.uuid4().hex[:8]}")
    policy = RetryPolicy(max_attempts=1000, initial_delay=0.05, max_delay=0.2, deadline=6.0)
    retries: list[Any] = []
    settings = for_driver(Settings(url=url, pool=TEST_POOL), driver)
    start = time.monotonic()
    try:
        if not is_async(driver):
            engine = create_engine(settings)
            try:
                wait_for_database(engine, policy=policy, on_retry=retries.append)
            finally:
                engine.dispose()
        else:
            async_engine = create_async_engine(settings)
            try:
                await async_wait_for_database(async_engine, policy=policy,
                                              on_retry=retries.append)
            finally:
                await async_engine.dispose()
    except RetryExhaustedError as exc:
        pytest.fail(f"retried a missing database until the deadline: {exc}")
    except ProgrammingError as exc:
        assert exc.sqlstate == "3D000"
    else:
        pytest.fail("wait_for_database succeeded on a database that does not exist")
    assert retries == []  # one attempt
    assert time.monotonic() - start < 2.0


# --- SQLSTATEs that cannot be produced safely: the server raises them -----------------

@pytest.mark.parametrize(("errcode", "sqlstate", "kind"), [
    ("disk_full", "53100", DatabaseError),
    ("out_of_memory", "53200", DatabaseError),
    ("configuration_limit_exceeded", "53400", DatabaseError),
    ("too_many_connections", "53300", DatabaseUnavailableError),
    ("statement_too_complex", "54001", ProgrammingError),
    ("io_error", "58030", DatabaseError),
    ("internal_error", "XX000", DatabaseError),
    ("data_corrupted", "XX001", DatabaseError),
    ("config_file_error", "F0000", DatabaseError),
    ("object_in_use", "55006", DatabaseError),
    ("cant_change_runtime_param", "55P02", ProgrammingError),
    ("transaction_integrity_constraint_violation", "40002", IntegrityError),
    ("statement_completion_unknown", "40003", CommitOutcomeUnknownError),
    ("transaction_resolution_unknown", "08007", CommitOutcomeUnknownError),
    ("protocol_violation", "08P01", DatabaseError),
    ("invalid_authorization_specification", "28000", AuthenticationError),
    ("insufficient_privilege", "42501", ProgrammingError),
    ("feature_not_supported", "0A000", ProgrammingError),
    ("cardinality_violation", "21000", ProgrammingError),
    ("in_failed_sql_transaction", "25P02", ProgrammingError),
    ("database_dropped", "57P04", DatabaseError),
    ("cannot_connect_now", "57P03", DatabaseUnavailableError),
    ("lock_not_available", "55P03", QueryTimeoutError),
    ("query_canceled", "57014", QueryTimeoutError),
    ("serialization_failure", "40001", SerializationError),
    ("deadlock_detected", "40P01", SerializationError),
    ("invalid_text_representation", "22P02", ProgrammingError),
    ("foreign_key_violation", "23503", IntegrityError),
    ("raise_exception", "P0001", DatabaseError),
    ("72000", "72000", SerializationError),
])
async def test_server_raised_sqlstate_maps_the_same_through_both_drivers(
        driver: str, db_url: URL, errcode: str, sqlstate: str,
        kind: type[DatabaseError]) -> None:
    """Pins: the SQLSTATE table, each code sent by the real server through each driver.

    ``RAISE EXCEPTION ... USING ERRCODE`` makes the server send exactly that SQLSTATE.
    The classes removed from the old tree map as: ``ServerError`` -> ``DatabaseError``,
    ``TooManyConnectionsError`` -> ``DatabaseUnavailableError`` (53300),
    ``LockNotAvailableError`` -> ``QueryTimeoutError`` (55P03); the code says which.
    """
    async with connect(driver, db_url) as conn:
        error = await fails(conn, "DO $$ BEGIN RAISE EXCEPTION 'raised by the test' "
                                  f"USING ERRCODE = '{errcode}'; END $$")
    assert type(error) is kind and error.sqlstate == sqlstate
    assert "raised by the test" in str(error)
