"""Pool metrics from events; exhaustion gives labkit's PoolTimeoutError."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from labkit import (
    PoolMetrics,
    PoolTimeoutError,
    Settings,
    create_async_engine,
    create_engine,
    translate_error,
)
from labkit.errors import async_translating_errors, translating_errors
from tests.conftest import count_rows


def test_counts_checkouts_connects_and_in_use(settings):
    engine = create_engine(settings, pool=settings.pool.replace(pool_size=2, max_overflow=1))
    metrics = PoolMetrics.attach(engine)
    first, second = engine.connect(), engine.connect()
    for conn in (first, second):
        conn.execute(text("SELECT 1"))
    snap = metrics.snapshot()
    assert snap["in_use"] == 2
    assert snap["overflow"] == 0
    assert snap["connects"] == 2 and snap["checkouts"] == 2
    first.close()
    second.close()
    assert metrics.snapshot()["in_use"] == 0
    assert metrics.snapshot()["idle"] == 2
    engine.dispose()


def test_overflow_is_negative_until_the_pool_fills(settings):
    engine = create_engine(settings, pool=settings.pool.replace(pool_size=3, max_overflow=2))
    metrics = PoolMetrics.attach(engine)
    held = []
    seen = []
    for _ in range(5):
        held.append(engine.connect())
        seen.append(metrics.snapshot()["overflow"])
    assert seen == [-2, -1, 0, 1, 2]
    for conn in held:
        conn.close()
    # overflow connections are closed on return: only pool_size stay idle
    assert metrics.snapshot()["idle"] == 3
    assert metrics.snapshot()["closes"] == 2
    engine.dispose()


def test_exhausted_pool_raises_pool_timeout_error_and_counts_it(settings):
    engine = create_engine(settings, pool=settings.pool.replace(
        pool_size=1, max_overflow=0, pool_timeout=0.3))
    metrics = PoolMetrics.attach(engine, keep_waits=True)
    held = engine.connect()
    with pytest.raises(PoolTimeoutError, match="pool_timeout") as info:
        with translating_errors():
            engine.connect()
    assert "QueuePool limit of size 1 overflow 0 reached" in str(info.value)
    snap = metrics.snapshot()
    assert snap["checkout_errors"] == 1
    assert snap["checkout_wait_ms_max"] >= 250  # waited about pool_timeout
    assert max(metrics.waits_ms()) >= 250
    held.close()
    engine.dispose()


def test_listeners_survive_dispose(settings):
    engine = create_engine(settings)
    metrics = PoolMetrics.attach(engine, keep_waits=True)
    with engine.connect():
        pass
    engine.dispose()
    with engine.connect():
        pass
    snap = metrics.snapshot()
    assert snap["checkouts"] == 2
    assert len(metrics.waits_ms()) == 2
    engine.dispose()


def test_pop_stats_resets_counters(engine):
    metrics = PoolMetrics.attach(engine)
    with engine.connect():
        pass
    assert metrics.pop_stats()["checkouts"] == 1
    assert metrics.snapshot()["checkouts"] == 0


async def test_async_engine_metrics_count_on_the_sync_engine(async_engine):
    metrics = PoolMetrics.attach(async_engine, keep_waits=True)
    async with async_engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert metrics.snapshot()["in_use"] == 1
    snap = metrics.snapshot()
    assert snap["checkouts"] == 1 and snap["in_use"] == 0
    assert len(metrics.waits_ms()) == 1


def test_translate_error_keeps_the_original_as_cause(engine):
    with pytest.raises(Exception) as info:
        with engine.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
    error = translate_error(info.value)
    assert type(error).__name__ == "ProgrammingError"
    assert error.__cause__ is info.value
    assert "no_such_table" in str(error)


# -- several collectors on one engine ------------------------------------------------

TIMEOUT_S = 0.3
TIMED_OUT_MS = 0.9 * TIMEOUT_S * 1000      # a checkout that timed out waited at least this
ONE_CONNECTION = {"pool_size": 1, "max_overflow": 0, "pool_timeout": TIMEOUT_S}


@pytest.fixture
def make_engine(settings: Settings) -> Iterator[Callable[..., Engine]]:
    """Build sync engines with a changed pool profile; every one is disposed afterwards.

    Disposing even after a failed assertion matters: a pooled connection left inside a
    transaction would hold its locks and block the ``table`` fixture's DROP TABLE.
    """
    made: list[Engine] = []

    def make(pool: dict[str, Any], **overrides: Any) -> Engine:
        engine = create_engine(settings, pool=settings.pool.replace(**pool), **overrides)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def _time_out_a_checkout(engine: Engine) -> None:
    with pytest.raises(PoolTimeoutError):
        with translating_errors():
            engine.connect()


async def _async_time_out_a_checkout(engine: AsyncEngine) -> None:
    with pytest.raises(PoolTimeoutError):
        async with async_translating_errors():
            await engine.connect()


def _assert_saw_timeouts(metrics: PoolMetrics, errors: int) -> None:
    snap = metrics.snapshot()
    assert snap["checkout_errors"] == errors
    waits = metrics.waits_ms()
    assert len([ms for ms in waits if ms >= TIMED_OUT_MS]) == errors, waits
    assert snap["checkout_wait_ms_max"] >= TIMED_OUT_MS


def test_every_collector_on_one_engine_records_waits_and_errors(make_engine):
    """Pins: two ``PoolMetrics`` on one sync engine each record every checkout wait and
    pool timeout, still do after ``dispose()`` replaced the pool, and detaching one leaves
    the other timing (only the first collector used to time checkouts)."""
    engine = make_engine(ONE_CONNECTION)
    first = PoolMetrics.attach(engine, keep_waits=True)
    second = PoolMetrics.attach(engine, keep_waits=True)
    with engine.connect():
        _time_out_a_checkout(engine)
    _assert_saw_timeouts(first, 1)
    _assert_saw_timeouts(second, 1)

    engine.dispose()                       # a new pool: both must time it
    with engine.connect():
        _time_out_a_checkout(engine)
    _assert_saw_timeouts(first, 2)
    _assert_saw_timeouts(second, 2)

    first.detach()
    with engine.connect():
        _time_out_a_checkout(engine)
    _assert_saw_timeouts(first, 2)         # detached: counts no more
    _assert_saw_timeouts(second, 3)        # still timing

    second.detach()
    assert "connect" not in engine.pool.__dict__   # the last one removes the hook


@pytest.mark.parametrize("detached", ["first", "second"])
def test_detaching_either_collector_leaves_the_other_timing(make_engine, detached):
    """Pins: whichever of two collectors detaches (the one that installed the timing or
    the later one), the other keeps recording checkout waits and pool timeouts."""
    engine = make_engine(ONE_CONNECTION)
    collectors = {"first": PoolMetrics.attach(engine, keep_waits=True),
                  "second": PoolMetrics.attach(engine, keep_waits=True)}
    collectors.pop(detached).detach()
    (remaining,) = collectors.values()
    with engine.connect():
        _time_out_a_checkout(engine)
    snap = remaining.snapshot()
    assert snap["checkouts"] == 1 and snap["checkout_errors"] == 1
    waits = remaining.waits_ms()
    assert len(waits) == 2 and waits[0] < TIMED_OUT_MS <= waits[1], waits  # got one, timed out


async def test_every_collector_on_one_async_engine_records_waits_and_errors(settings):
    """Pins: two ``PoolMetrics`` on one async engine each record every checkout wait and
    pool timeout, still do after ``await engine.dispose()``, and detaching one leaves the
    other timing."""
    engine = create_async_engine(settings, pool=settings.pool.replace(**ONE_CONNECTION))
    try:
        first = PoolMetrics.attach(engine, keep_waits=True)
        second = PoolMetrics.attach(engine, keep_waits=True)
        async with engine.connect():
            await _async_time_out_a_checkout(engine)
        _assert_saw_timeouts(first, 1)
        _assert_saw_timeouts(second, 1)

        await engine.dispose()
        async with engine.connect():
            await _async_time_out_a_checkout(engine)
        _assert_saw_timeouts(first, 2)
        _assert_saw_timeouts(second, 2)

        second.detach()
        async with engine.connect():
            await _async_time_out_a_checkout(engine)
        _assert_saw_timeouts(first, 3)
        _assert_saw_timeouts(second, 2)

        first.detach()
        assert "connect" not in engine.sync_engine.pool.__dict__
    finally:
        await engine.dispose()


def test_collectors_come_and_go_while_threads_check_out(make_engine):
    """Pins: attaching and detaching further collectors while other threads check out
    connections disturbs none of those threads (SQLAlchemy's listener lists must not
    change while the events run: each collector used to add and remove its own
    listeners, and the threads died with "deque mutated during iteration"), and the
    first collector still counts every checkout."""
    engine = make_engine({"pool_size": 4, "max_overflow": 0})
    first = PoolMetrics.attach(engine)
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def requests() -> None:
        n = 0
        try:
            while not stop.is_set():
                with engine.connect():
                    n += 1
        except BaseException as exc:  # noqa: BLE001  (reported by the test below)
            errors.append(exc)
        done.append(n)

    threads = [threading.Thread(target=requests) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        PoolMetrics.attach(engine).detach()
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert first.snapshot()["checkouts"] == sum(done) > 0


def test_a_collector_does_not_keep_its_engine_alive(settings):
    """Guards the weak references: an engine with an attached collector, once dropped,
    is garbage collected. (Not a regression test: the old code did not leak either.)"""
    engine = create_engine(settings)
    metrics = PoolMetrics.attach(engine)
    with engine.connect():
        pass
    engine.dispose()
    gone = weakref.ref(engine)
    del engine, metrics
    gc.collect()
    assert gone() is None


# -- resets: what reset-on-return really did ------------------------------------------

# No pre-ping: psycopg2's ping cannot switch to autocommit inside an inherited transaction.
ONE_CONNECTION_NO_PING = {"pool_size": 1, "max_overflow": 0, "pool_pre_ping": False}


def _return_a_connection_then_a_raw_one(engine: Engine, table: str) -> None:
    """Return two connections mid-transaction: a ``Connection``, then a raw DBAPI one."""
    conn = engine.connect()
    conn.execute(text("SELECT 1"))
    conn.close()                           # the Connection rolls back by itself
    raw = engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute(f"INSERT INTO {table} VALUES (1, 'left uncommitted')")
    cursor.close()
    raw.close()                            # back to the pool with the INSERT still open


@pytest.mark.parametrize(("reset_on_return", "resets", "rows_inherited"),
                         [("rollback", 1, 0), (None, 0, 1)])
def test_resets_count_rollbacks_on_return_not_checkins(table, make_engine, reset_on_return,
                                                       resets, rows_inherited):
    """Pins: ``resets`` counts the rollbacks the pool's reset-on-return performed: one
    for the raw connection returned mid-transaction, none for a ``Connection`` that
    rolled back itself, none at all with ``pool_reset_on_return=None`` (it used to equal
    ``checkins``); and the next checkout sees the uncommitted row exactly when no reset
    ran."""
    engine = make_engine(ONE_CONNECTION_NO_PING, pool_reset_on_return=reset_on_return)
    metrics = PoolMetrics.attach(engine)
    _return_a_connection_then_a_raw_one(engine, table)
    snap = metrics.snapshot()
    assert snap["checkins"] == 2
    assert snap["resets"] == resets
    with engine.connect() as conn:         # the same (only) pooled connection
        seen = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
    assert seen == rows_inherited


def test_resets_count_commits_with_commit_on_return(table, observer, make_engine):
    """Covers ``pool_reset_on_return="commit"``: every return is a commit, even after the
    ``Connection`` rolled back, and the raw connection's open INSERT is stored. (Not a
    regression test: before the fix ``resets`` counted every return, which is also right
    for this setting.)"""
    engine = make_engine(ONE_CONNECTION_NO_PING, pool_reset_on_return="commit")
    metrics = PoolMetrics.attach(engine)
    _return_a_connection_then_a_raw_one(engine, table)
    assert metrics.snapshot()["resets"] == 2
    assert count_rows(observer, table) == 1


async def test_async_resets_follow_pool_reset_on_return(settings):
    """Pins: on an async engine, ``resets`` counts the pool's rollback on return with the
    default setting and stays 0 with ``pool_reset_on_return=None`` (it used to equal
    ``checkins`` under both)."""
    counted = {}
    for setting in ("rollback", None):
        engine = create_async_engine(settings, pool_reset_on_return=setting)
        try:
            metrics = PoolMetrics.attach(engine)
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                await conn.commit()        # returned with no transaction of its own
            snap = metrics.snapshot()
            assert snap["checkins"] == 1
            counted[setting] = snap["resets"]
        finally:
            await engine.dispose()
    assert counted == {"rollback": 1, None: 0}
