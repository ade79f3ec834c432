"""Retry: transient failures only, within a budget; waiting for a database at start-up."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from labkit import (
    DEFAULT_RETRY,
    TEST_POOL,
    ConnectionLostError,
    DatabaseUnavailableError,
    IntegrityError,
    PoolTimeoutError,
    QueryTimeoutError,
    RetryExhaustedError,
    RetryPolicy,
    SerializationError,
    Settings,
    TransientError,
    async_run_in_transaction,
    async_wait_for_database,
    create_async_engine,
    create_async_sessionmaker,
    create_engine,
    create_sessionmaker,
    run_in_transaction,
    wait_for_database,
)
from labkit.lab.faults import connections_exhausted
from labkit.retry import STARTUP_RETRY, Attempt, async_retry, retry
from tests.conftest import count_rows

FAST = RetryPolicy(max_attempts=4, initial_delay=0.01, max_delay=0.05)


def test_delays_grow_exponentially_with_bounded_jitter():
    policy = RetryPolicy(max_attempts=6, initial_delay=0.1, multiplier=2, max_delay=1.0,
                         jitter=0.1)
    delays = list(policy.delays())
    assert len(delays) == 5
    for got, nominal in zip(delays, [0.1, 0.2, 0.4, 0.8, 1.0]):
        assert nominal * 0.9 <= got <= nominal * 1.1


def test_transient_errors_are_retried_until_success():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionLostError("lost")
        return "done"

    seen: list[Attempt] = []
    assert retry(flaky, policy=FAST, on_retry=seen.append) == "done"
    assert len(calls) == 3
    assert [a.number for a in seen] == [1, 2]


def test_retry_gives_up_after_its_attempts_and_says_so():
    calls = []

    def always_down() -> None:
        calls.append(1)
        raise ConnectionLostError("still down")

    with pytest.raises(RetryExhaustedError, match="gave up after 4 attempt") as info:
        retry(always_down, policy=FAST)
    assert len(calls) == 4
    assert isinstance(info.value.last_error, ConnectionLostError)


def test_retry_respects_its_time_budget():
    policy = RetryPolicy(max_attempts=1000, initial_delay=0.05, max_delay=0.05, deadline=0.5)
    start = time.monotonic()
    with pytest.raises(RetryExhaustedError, match=r"0.5 s"):
        retry(lambda: (_ for _ in ()).throw(ConnectionLostError("down")), policy=policy)
    assert time.monotonic() - start < 0.5 + 0.5


def test_non_transient_database_errors_are_not_retried(labkit_connection, labkit_sessionmaker):
    """Runs inside ``labkit.testing``'s rolled-back transaction, though the work commits."""
    labkit_connection.execute(text("CREATE TABLE dup_orders (id int PRIMARY KEY, note text)"))
    calls = []

    def duplicate(session) -> None:
        calls.append(1)
        session.execute(text("INSERT INTO dup_orders VALUES (1, 'a'), (1, 'b')"))

    with pytest.raises(IntegrityError):
        run_in_transaction(labkit_sessionmaker, duplicate, policy=FAST)
    assert len(calls) == 1


def test_programming_bugs_pass_through_untouched():
    calls = []

    def bug() -> None:
        calls.append(1)
        raise KeyError("not a database problem")

    with pytest.raises(KeyError):
        retry(bug, policy=FAST)
    assert len(calls) == 1


def test_wait_for_database_gives_up_on_a_stopped_server(stopped_server_url):
    engine = create_engine(Settings(url=stopped_server_url, pool=TEST_POOL))
    policy = RetryPolicy(max_attempts=100, initial_delay=0.05, max_delay=0.2, deadline=1.0)
    start = time.monotonic()
    with pytest.raises(RetryExhaustedError) as info:
        wait_for_database(engine, policy=policy)
    assert time.monotonic() - start < 1.0 + 1.5
    assert info.value.attempts >= 3
    assert stopped_server_url.password not in str(info.value)


def test_wait_for_database_succeeds_once_the_server_starts(throwaway_server):
    url = throwaway_server.info().url()
    throwaway_server.stop()
    engine = create_engine(Settings(url=url, pool=TEST_POOL))
    starter = threading.Timer(0.8, throwaway_server.start)
    starter.start()
    try:
        attempts = wait_for_database(
            engine, policy=RetryPolicy(max_attempts=200, initial_delay=0.05, max_delay=0.2,
                                       deadline=30))
    finally:
        starter.join()
    assert attempts >= 2
    assert throwaway_server.status() == "running"


async def test_async_retry_gives_up_after_its_attempts():
    calls = []

    async def always_down() -> None:
        calls.append(1)
        raise ConnectionLostError("down")

    with pytest.raises(RetryExhaustedError):
        await async_retry(always_down, policy=FAST)
    assert len(calls) == 4


async def test_async_wait_for_database_gives_up_on_a_stopped_server(stopped_server_url):
    engine = create_async_engine(Settings(url=stopped_server_url, pool=TEST_POOL))
    policy = RetryPolicy(max_attempts=100, initial_delay=0.05, max_delay=0.2, deadline=1.0)
    with pytest.raises(RetryExhaustedError):
        await async_wait_for_database(engine, policy=policy)
    await engine.dispose()


# --- what each policy retries -----------------------------------------------------------

def _failures() -> list:
    return [pytest.param(ConnectionLostError("lost"), id="ConnectionLostError"),
            pytest.param(SerializationError("conflict", sqlstate="40001"),
                         id="SerializationError"),
            pytest.param(QueryTimeoutError("slow", sqlstate="57014"), id="QueryTimeoutError"),
            pytest.param(PoolTimeoutError("pool"), id="PoolTimeoutError"),
            pytest.param(DatabaseUnavailableError("full", sqlstate="53300"),
                         id="too-many-clients")]


DEFAULT_RETRIES = (ConnectionLostError, SerializationError)


@pytest.mark.parametrize("error", _failures())
@pytest.mark.parametrize("policy", [DEFAULT_RETRY, STARTUP_RETRY], ids=["default", "startup"])
def test_each_policy_retries_exactly_the_errors_it_names(policy, error):
    """DEFAULT_RETRY: a lost connection and a serialization failure only (timeouts, an
    exhausted pool, a full server get worse with more attempts); STARTUP_RETRY: any
    transient error."""
    calls = []

    def once_failing() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return "done"

    should_retry = isinstance(error, policy.retry_on)
    assert should_retry == (isinstance(error, DEFAULT_RETRIES) if policy is DEFAULT_RETRY
                            else isinstance(error, TransientError))
    if should_retry:
        assert retry(once_failing, policy=policy) == "done"
        assert len(calls) == 2
    else:
        with pytest.raises(type(error)) as info:
            retry(once_failing, policy=policy)
        assert info.value is error and len(calls) == 1


def test_an_exhausted_pool_is_not_retried_by_default(settings):
    engine = create_engine(settings, pool=settings.pool.replace(
        pool_size=1, max_overflow=0, pool_timeout=0.2))
    factory = create_sessionmaker(engine)
    calls = []

    def work(session) -> None:
        calls.append(1)
        session.execute(text("SELECT 1"))

    try:
        with engine.connect():                     # the only connection is taken
            with pytest.raises(PoolTimeoutError):
                run_in_transaction(factory, work)
        assert len(calls) == 1
        run_in_transaction(factory, work)          # and free again: works
    finally:
        engine.dispose()


def _slow_first_attempt(calls: list[int]):
    def work(session) -> int:
        calls.append(1)
        session.execute(text("SET LOCAL statement_timeout = 50"))
        seconds = 0.5 if len(calls) == 1 else 0
        return session.execute(text("SELECT pg_sleep(:s), 7"), {"s": seconds}).one()[1]
    return work


def test_a_statement_timeout_is_retried_only_by_a_policy_that_names_it(engine):
    factory = create_sessionmaker(engine)
    calls: list[int] = []
    with pytest.raises(QueryTimeoutError) as info:
        run_in_transaction(factory, _slow_first_attempt(calls))
    assert info.value.sqlstate == "57014" and len(calls) == 1

    calls.clear()
    seen: list[Attempt] = []
    policy = RetryPolicy(max_attempts=3, initial_delay=0.01, retry_on=(QueryTimeoutError,))
    assert run_in_transaction(factory, _slow_first_attempt(calls), policy=policy,
                              on_retry=seen.append) == 7
    assert len(calls) == 2 and [type(a.error) for a in seen] == [QueryTimeoutError]


async def test_async_statement_timeout_is_retried_only_by_a_policy_that_names_it(async_engine):
    factory = create_async_sessionmaker(async_engine)
    calls: list[int] = []

    async def work(session) -> int:
        calls.append(1)
        await session.execute(text("SET LOCAL statement_timeout = 50"))
        seconds = 0.5 if len(calls) == 1 else 0
        return (await session.execute(text("SELECT pg_sleep(:s), 7"),
                                      {"s": seconds})).one()[1]

    with pytest.raises(QueryTimeoutError):
        await async_run_in_transaction(factory, work)
    assert len(calls) == 1
    calls.clear()
    policy = RetryPolicy(max_attempts=3, initial_delay=0.01, retry_on=(QueryTimeoutError,))
    assert await async_run_in_transaction(factory, work, policy=policy) == 7
    assert len(calls) == 2


def test_a_real_serialization_failure_is_retried_by_default_and_stored_once(
        engine, observer, table):
    """Another client changes the row this REPEATABLE READ transaction read: PostgreSQL
    refuses the update (40001), and the default policy runs the whole work again."""
    with observer.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} VALUES (1, 'start')"))
    factory = create_sessionmaker(engine)
    calls: list[int] = []
    seen: list[Attempt] = []

    def work(session) -> None:
        calls.append(1)
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        note = session.execute(text(f"SELECT note FROM {table} WHERE id = 1")).scalar_one()
        if len(calls) == 1:
            with observer.begin() as conn:
                conn.execute(text(f"UPDATE {table} SET note = 'other' WHERE id = 1"))
        session.execute(text(f"UPDATE {table} SET note = :n WHERE id = 1"),
                        {"n": note + "+mine"})
        session.execute(text(f"INSERT INTO {table} VALUES (:id, 'log')"),
                        {"id": 100 + len(calls)})

    run_in_transaction(factory, work, on_retry=seen.append)
    assert len(calls) == 2
    assert [type(a.error) for a in seen] == [SerializationError]
    assert seen[0].error.sqlstate == "40001"
    with observer.connect() as conn:
        assert conn.execute(text(f"SELECT note FROM {table} WHERE id = 1")).scalar_one() \
            == "other+mine"
    assert count_rows(observer, table) == 2       # the row and one log line: stored once


def test_a_full_server_is_not_retried_by_default(throwaway_server):
    """No connection slot left (SQLSTATE 53300): more attempts only add load."""
    engine = create_engine(Settings(url=throwaway_server.info().url(), pool=TEST_POOL))
    factory = create_sessionmaker(engine)
    calls: list[int] = []

    def work(session) -> None:
        calls.append(1)
        session.execute(text("SELECT 1"))

    try:
        with connections_exhausted(throwaway_server):
            with pytest.raises(DatabaseUnavailableError) as info:
                run_in_transaction(factory, work)
        assert info.value.sqlstate == "53300"
        assert len(calls) == 1
        run_in_transaction(factory, work)
    finally:
        engine.dispose()


def test_workers_forked_from_one_parent_do_not_retry_in_lockstep():
    """The jitter comes from the random module, which each forked process reseeds."""
    import os

    delays = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: draw the delays and exit at once
            os.close(read)
            os.write(write, repr(list(DEFAULT_RETRY.delays())).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            delays.append(pipe.read())
        os.waitpid(pid, 0)
    assert delays[0] != delays[1]
