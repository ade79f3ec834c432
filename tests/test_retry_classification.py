"""Only database errors are classified and retried; the caller's own exceptions pass through.

Issue 10, item 3. Each "caller's own" error is produced for real by the caller's code
(a missing file, a socket to a port where nothing listens, a read that times out),
inside a unit of work that has already talked to the real server.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from labkit import (
    DEFAULT_RETRY,
    TEST_POOL,
    DatabaseUnavailableError,
    RetryExhaustedError,
    RetryPolicy,
    Settings,
    TransientError,
    async_run_in_transaction,
    create_async_engine,
    create_async_sessionmaker,
    create_engine,
    create_sessionmaker,
    run_in_transaction,
)
from labkit.errors import is_database_error, translate_error

# Five quick attempts: a wrongly retried error shows as attempts > 1 within a second.
QUICK = RetryPolicy(max_attempts=5, initial_delay=0.01, max_delay=0.02, deadline=10.0)


def missing_file(_: int, __: int) -> None:
    """The caller's code reads a configuration file that is not there."""
    with open("/nonexistent/labkit-test/config.yaml", encoding="utf-8") as f:
        f.read()


def refused(closed: int, _: int) -> None:
    """The caller's code calls another service (not the database) that is down."""
    socket.create_connection(("127.0.0.1", closed), timeout=1.0).close()


def timed_out(_: int, hung: int) -> None:
    """The caller's code waits for another service that never answers."""
    with socket.create_connection(("127.0.0.1", hung), timeout=1.0) as sock:
        sock.settimeout(0.2)
        sock.recv(1)


USER_ERRORS = [
    pytest.param(missing_file, FileNotFoundError, id="FileNotFoundError"),
    pytest.param(refused, ConnectionRefusedError, id="ConnectionRefusedError"),
    pytest.param(timed_out, TimeoutError, id="TimeoutError"),
]


@pytest.mark.parametrize(("fail", "expected"), USER_ERRORS)
def test_callers_own_error_in_run_in_transaction_propagates_after_one_attempt(
        engine: Engine, closed_port: int, hung_port: int,
        fail: Callable[[int, int], None], expected: type[BaseException]) -> None:
    """Pins: a non-database error raised by ``work`` is neither translated nor retried.

    Before the fix every ``OSError``/``TimeoutError`` counted as a database error: the
    work ran five times and ended as ``RetryExhaustedError`` ("Could not connect to
    PostgreSQL" / a query timeout).
    """
    attempts: list[int] = []
    raised: list[BaseException] = []

    def work(session: Session) -> None:
        attempts.append(1)
        session.execute(text("SELECT 1"))  # the database is fine
        try:
            fail(closed_port, hung_port)
        except BaseException as exc:
            raised.append(exc)
            raise

    with pytest.raises(expected) as info:
        run_in_transaction(create_sessionmaker(engine), work, policy=QUICK)
    assert len(attempts) == 1
    assert info.value is raised[0]  # the caller's exception itself, unchanged
    assert not is_database_error(info.value)


@pytest.mark.parametrize(("fail", "expected"), USER_ERRORS)
async def test_callers_own_error_in_async_run_in_transaction_propagates_after_one_attempt(
        async_engine: AsyncEngine, closed_port: int, hung_port: int,
        fail: Callable[[int, int], None], expected: type[BaseException]) -> None:
    """Pins: async twin: a non-database error raised by ``work`` is neither translated nor retried.

    Before the fix it was retried five times and ended as ``RetryExhaustedError``.
    """
    attempts: list[int] = []
    raised: list[BaseException] = []

    async def work(session: AsyncSession) -> None:
        attempts.append(1)
        await session.execute(text("SELECT 1"))
        try:
            fail(closed_port, hung_port)
        except BaseException as exc:
            raised.append(exc)
            raise

    with pytest.raises(expected) as info:
        await async_run_in_transaction(create_async_sessionmaker(async_engine), work,
                                       policy=QUICK)
    assert len(attempts) == 1
    assert info.value is raised[0]


async def test_callers_own_error_called_back_by_sqlalchemy_stays_the_callers(
        async_engine: AsyncEngine) -> None:
    """Pins: the frame that raised decides, not any SQLAlchemy frame on the way.

    ``AsyncSession.run_sync`` runs the caller's function from inside SQLAlchemy; a
    ``FileNotFoundError`` raised there is still the caller's own (one attempt, unchanged),
    where the old code retried it as "Could not connect to PostgreSQL".
    """
    attempts: list[int] = []

    def sync_part(session: Session) -> None:
        session.execute(text("SELECT 1"))
        missing_file(0, 0)

    async def work(session: AsyncSession) -> None:
        attempts.append(1)
        await session.run_sync(sync_part)

    with pytest.raises(FileNotFoundError):
        await async_run_in_transaction(create_async_sessionmaker(async_engine), work,
                                       policy=QUICK)
    assert len(attempts) == 1


@pytest.mark.parametrize(("fail", "expected"), USER_ERRORS)
def test_the_callers_own_oserror_in_a_connection_block_is_not_a_database_error(
        engine: Engine, closed_port: int, hung_port: int,
        fail: Callable[[int, int], None], expected: type[BaseException]) -> None:
    """Pins: ``is_database_error`` says no to the caller's own error, so nothing translates it.

    The old code turned the caller's ``FileNotFoundError`` into ``DatabaseUnavailableError``.
    """
    with pytest.raises(expected) as info:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            fail(closed_port, hung_port)
    assert type(info.value) is expected
    assert not is_database_error(info.value)


@pytest.mark.parametrize(("fail", "expected"), USER_ERRORS)
async def test_the_callers_own_oserror_in_an_async_connection_block_is_not_a_database_error(
        async_engine: AsyncEngine, closed_port: int, hung_port: int,
        fail: Callable[[int, int], None], expected: type[BaseException]) -> None:
    """Pins: async twin: the caller's own error is no database error, whatever awaited before."""
    with pytest.raises(expected) as info:
        async with async_engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            fail(closed_port, hung_port)
    assert type(info.value) is expected
    assert not is_database_error(info.value)


# --- what must still be classified --------------------------------------------------

def _dead_url(db_url: URL, closed_port: int, hung_port: int, where: str) -> URL:
    return db_url.set(host="127.0.0.1", port=closed_port if where == "closed" else hung_port)


@pytest.mark.parametrize("where", ["closed", "hung"])
def test_sync_connect_to_a_dead_port_is_still_database_unavailable_and_retried(
        db_url: URL, closed_port: int, hung_port: int, where: str) -> None:
    """Guards the fix: psycopg2's refused or timed-out connect stays a transient database error.

    Passes before and after the fix (it pins that the fix does not overreach).
    """
    url = _dead_url(db_url, closed_port, hung_port, where)
    engine = create_engine(Settings(url=url, pool=TEST_POOL, connect_timeout=1.0))
    attempts: list[int] = []

    def work(session: Session) -> None:
        attempts.append(1)
        session.execute(text("SELECT 1"))

    policy = RetryPolicy(max_attempts=2, initial_delay=0.01, deadline=30.0)
    try:
        with pytest.raises(RetryExhaustedError) as info:
            run_in_transaction(create_sessionmaker(engine), work, policy=policy)
    finally:
        engine.dispose()
    assert len(attempts) == 2
    assert isinstance(info.value.last_error, DatabaseUnavailableError)


@pytest.mark.parametrize("where", ["closed", "hung"])
async def test_async_connect_to_a_dead_port_is_still_database_unavailable_and_retried(
        db_url: URL, closed_port: int, hung_port: int, where: str) -> None:
    """Guards the fix: asyncpg's raw ``ConnectionRefusedError``/``TimeoutError`` at connect.

    asyncpg raises the builtin exceptions and SQLAlchemy does not wrap them (a refused
    connect arrives as ``ConnectionRefusedError``, a hung one as ``TimeoutError``): they
    are raised inside asyncpg, so they stay database errors, ``DatabaseUnavailableError``,
    and are retried. Passes before and after the fix.
    """
    url = _dead_url(db_url, closed_port, hung_port, where)
    engine = create_async_engine(Settings(url=url, pool=TEST_POOL, connect_timeout=1.0))
    attempts: list[int] = []
    raw: list[BaseException] = []

    async def work(session: AsyncSession) -> None:
        attempts.append(1)
        try:
            await session.execute(text("SELECT 1"))
        except BaseException as exc:
            raw.append(exc)
            raise

    policy = RetryPolicy(max_attempts=2, initial_delay=0.01, deadline=30.0)
    try:
        with pytest.raises(RetryExhaustedError) as info:
            await async_run_in_transaction(create_async_sessionmaker(engine), work,
                                           policy=policy)
    finally:
        await engine.dispose()
    assert len(attempts) == 2
    assert isinstance(info.value.last_error, DatabaseUnavailableError)
    expected: Any = ConnectionRefusedError if where == "closed" else TimeoutError
    assert isinstance(raw[0], expected)  # what asyncpg really raises, unwrapped
    assert is_database_error(raw[0])
    assert isinstance(translate_error(raw[0]), DatabaseUnavailableError)


@pytest.mark.parametrize("where", ["closed", "hung"])
def test_default_retry_does_not_retry_an_unavailable_database(
        db_url: URL, closed_port: int, hung_port: int, where: str) -> None:
    """Pins: ``DEFAULT_RETRY`` (a request's policy) retries only a lost connection and a
    serialization failure: a database that cannot be reached fails after one attempt,
    as ``DatabaseUnavailableError``, instead of piling retries on a server in trouble."""
    assert DEFAULT_RETRY.retry_on != (TransientError,)
    url = _dead_url(db_url, closed_port, hung_port, where)
    engine = create_engine(Settings(url=url, pool=TEST_POOL, connect_timeout=1.0))
    attempts: list[int] = []

    def work(session: Session) -> None:
        attempts.append(1)
        session.execute(text("SELECT 1"))

    try:
        with pytest.raises(DatabaseUnavailableError):
            run_in_transaction(create_sessionmaker(engine), work)
    finally:
        engine.dispose()
    assert len(attempts) == 1


def test_retry_on_names_what_is_retried(db_url: URL, closed_port: int) -> None:
    """Pins: ``RetryPolicy.retry_on``: a policy that retries ``DatabaseUnavailableError``
    retries a refused connect; one that names only ``SerializationError`` does not."""
    from labkit import SerializationError

    engine = create_engine(Settings(url=db_url.set(host="127.0.0.1", port=closed_port),
                                    pool=TEST_POOL, connect_timeout=1.0))
    factory = create_sessionmaker(engine)
    attempts: list[str] = []

    def work(session: Session) -> None:
        attempts.append("x")
        session.execute(text("SELECT 1"))

    try:
        retried = RetryPolicy(max_attempts=3, initial_delay=0.01,
                              retry_on=(DatabaseUnavailableError,))
        with pytest.raises(RetryExhaustedError) as info:
            run_in_transaction(factory, work, policy=retried)
        assert len(attempts) == 3
        assert isinstance(info.value.last_error, DatabaseUnavailableError)
        attempts.clear()
        not_retried = RetryPolicy(max_attempts=3, initial_delay=0.01,
                                  retry_on=(SerializationError,))
        with pytest.raises(DatabaseUnavailableError):
            run_in_transaction(factory, work, policy=not_retried)
        assert len(attempts) == 1
    finally:
        engine.dispose()
