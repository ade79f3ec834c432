"""Pool metrics from events; exhaustion gives labkit's PoolTimeoutError."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from labkit import PoolMetrics, PoolTimeoutError, create_engine, translate_error
from labkit.errors import translating_errors


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
