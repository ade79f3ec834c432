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
)
from labkit.errors import translate_error
from tests.conftest import translated


class KeptWaits(PoolMetrics):
    """``PoolMetrics`` that also keeps each checkout wait: what the tests look at."""

    def reset(self) -> None:
        super().reset()
        self.waits: list[float] = []

    def record_wait(self, ms: float, *, failed: bool) -> None:
        super().record_wait(ms, failed=failed)
        with self._lock:
            self.waits.append(ms)

    def waits_ms(self) -> list[float]:
        with self._lock:
            return list(self.waits)


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


def test_overflow_counts_connections_beyond_pool_size(settings):
    """``overflow`` is 0 until the pool's ``pool_size`` connections are all out (never
    SQLAlchemy's negative ``QueuePool.overflow()``)."""
    engine = create_engine(settings, pool=settings.pool.replace(pool_size=3, max_overflow=2))
    metrics = PoolMetrics.attach(engine)
    held = []
    seen = []
    for _ in range(5):
        held.append(engine.connect())
        seen.append(metrics.snapshot()["overflow"])
    assert seen == [0, 0, 0, 1, 2]
    assert metrics.snapshot()["pool_size"] == 3
    for conn in held:
        conn.close()
    # overflow connections are closed on return: only pool_size stay idle
    assert metrics.snapshot()["idle"] == 3
    assert metrics.snapshot()["closes"] == 2
    engine.dispose()


def test_exhausted_pool_raises_pool_timeout_error_and_counts_it(settings):
    engine = create_engine(settings, pool=settings.pool.replace(
        pool_size=1, max_overflow=0, pool_timeout=0.3))
    metrics = KeptWaits.attach(engine)
    held = engine.connect()
    with pytest.raises(PoolTimeoutError, match="pool_timeout") as info:
        with translated():
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
    metrics = KeptWaits.attach(engine)
    with engine.connect():
        pass
    engine.dispose()
    with engine.connect():
        pass
    snap = metrics.snapshot()
    assert snap["checkouts"] == 2
    assert len(metrics.waits_ms()) == 2
    engine.dispose()


def test_reset_zeroes_counters_not_gauges(engine):
    metrics = PoolMetrics.attach(engine)
    with engine.connect():
        pass
    held = engine.connect()
    try:
        before = metrics.snapshot()
        metrics.reset()
        assert before["checkouts"] == 2 and before["in_use"] == 1
        after = metrics.snapshot()
        assert after["checkouts"] == 0 and after["checkout_wait_ms_max"] == 0
        assert after["in_use"] == 1                 # a gauge: still checked out
    finally:
        held.close()
    assert metrics.snapshot()["in_use"] == 0


@pytest.mark.parametrize("poolclass", ["null", "static"])
def test_in_use_is_counted_on_null_and_static_pools(settings, poolclass):
    """NullPool and StaticPool have no ``checkedout()``: ``in_use`` counts what labkit's
    pool classes lent out, also a connection taken before ``attach``."""
    pool = settings.pool.replace(poolclass=poolclass, pool_size=0 if poolclass == "null" else 1,
                                 max_overflow=0)
    engine = create_engine(settings, pool=pool)
    try:
        early = engine.connect() if poolclass == "null" else None
        metrics = KeptWaits.attach(engine)
        if early is not None:
            assert metrics.snapshot()["in_use"] == 1
            early.close()
            assert metrics.snapshot()["in_use"] == 0
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        snap = metrics.snapshot()
        assert snap["in_use"] == 1 and snap["checkouts"] == 1
        assert snap["pool_size"] == (1 if poolclass == "static" else 0)
        conn.close()
        assert metrics.snapshot()["in_use"] == 0
        assert len(metrics.waits_ms()) == 1          # labkit's pool classes time checkouts
    finally:
        engine.dispose()


def test_waits_are_measured_only_on_engines_made_by_labkit(settings):
    """A plain SQLAlchemy engine gets the counters and gauges, but no checkout waits."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(settings.sync_url, pool_size=1, max_overflow=0)
    try:
        metrics = KeptWaits.attach(engine)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            assert metrics.snapshot()["in_use"] == 1
        snap = metrics.snapshot()
        assert snap["checkouts"] == snap["checkins"] == snap["connects"] == 1
        assert snap["checkout_wait_ms_total"] == 0 and metrics.waits_ms() == []
    finally:
        engine.dispose()


async def test_async_engine_metrics_count_on_the_sync_engine(async_engine):
    metrics = KeptWaits.attach(async_engine)
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
        with translated():
            engine.connect()


async def _async_time_out_a_checkout(engine: AsyncEngine) -> None:
    with pytest.raises(PoolTimeoutError):
        with translated():
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
    first = KeptWaits.attach(engine)
    second = KeptWaits.attach(engine)
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
    assert not engine.pool.labkit_collectors       # nobody left to time checkouts for


@pytest.mark.parametrize("detached", ["first", "second"])
def test_detaching_either_collector_leaves_the_other_timing(make_engine, detached):
    """Pins: whichever of two collectors detaches (the one that installed the timing or
    the later one), the other keeps recording checkout waits and pool timeouts."""
    engine = make_engine(ONE_CONNECTION)
    collectors = {"first": KeptWaits.attach(engine),
                  "second": KeptWaits.attach(engine)}
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
        first = KeptWaits.attach(engine)
        second = KeptWaits.attach(engine)
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
        assert not engine.sync_engine.pool.labkit_collectors
    finally:
        await engine.dispose()


def test_collectors_count_every_checkout_of_concurrent_threads(make_engine):
    """Two collectors attached before traffic (as ``PoolMetrics`` requires: SQLAlchemy's
    listener lists must not change while other threads run those events) count every
    checkout and checkin of four threads exactly, and disturb none of them."""
    engine = make_engine({"pool_size": 4, "max_overflow": 0})
    first = PoolMetrics.attach(engine)
    second = KeptWaits.attach(engine)
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
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    for metrics in (first, second):
        snap = metrics.snapshot()
        assert snap["checkouts"] == snap["checkins"] == sum(done) > 0
        assert snap["in_use"] == 0 and snap["checkout_errors"] == 0
    assert len(second.waits_ms()) == sum(done)
    first.detach()
    second.detach()


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


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_labkits_pools_log_under_sqlalchemys_pool_logger(settings, is_async):
    """Logging configured for ``sqlalchemy.pool`` (echo_pool, a level) reaches labkit's pools."""
    engine = create_async_engine(settings) if is_async else create_engine(settings)
    pool = (engine.sync_engine if is_async else engine).pool
    try:
        assert pool.logger.name.startswith("sqlalchemy.pool.impl."), pool.logger.name
        assert pool.logger.name.endswith(type(pool).__name__)
    finally:
        if not is_async:
            engine.dispose()
