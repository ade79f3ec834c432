"""Retry: transient failures only, within a budget; waiting for a database at start-up."""

from __future__ import annotations

import random
import threading
import time

import pytest
from sqlalchemy import text

from labkit import (
    TEST_POOL,
    ConnectionLostError,
    IntegrityError,
    RetryExhaustedError,
    RetryPolicy,
    Settings,
    async_retry,
    async_wait_for_database,
    create_async_engine,
    create_engine,
    create_sessionmaker,
    retry,
    run_in_transaction,
    wait_for_database,
)
from labkit.retry import Attempt

FAST = RetryPolicy(max_attempts=4, initial_delay=0.01, max_delay=0.05, rng=random.Random(1))


def test_delays_grow_exponentially_with_bounded_jitter():
    policy = RetryPolicy(max_attempts=6, initial_delay=0.1, multiplier=2, max_delay=1.0,
                         jitter=0.1, rng=random.Random(7))
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
