"""Health checks against a live, a stopped, a hung and a misconfigured server."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.engine import URL

from labkit import (
    TEST_POOL,
    DatabaseUnavailableError,
    Settings,
    async_health_check,
    create_async_engine,
    create_engine,
    health_check,
)
from labkit.errors import AuthenticationError
from labkit.health import async_check_database, check_database
from tests.conftest import for_driver

MARGIN = 1.5  # seconds of slack on a noisy 2-core machine


def _url(db_url: URL, **changes) -> URL:
    return db_url.set(**changes)


def test_health_ok_on_a_live_server(engine, password):
    report = health_check(engine, timeout=5)
    assert report.ok and bool(report)
    assert report.error is None
    assert report.server_version and report.server_version[0].isdigit()
    assert 0 < report.latency_ms < 5000
    assert report.pool["class"] == "QueuePool"
    assert password not in repr(report.to_dict())
    assert health_check(engine, timeout=5)


def test_health_not_ok_within_timeout_when_server_is_stopped(stopped_server_url):
    engine = create_engine(Settings(url=stopped_server_url, pool=TEST_POOL))
    start = time.monotonic()
    report = health_check(engine, timeout=2)
    assert time.monotonic() - start < 2 + MARGIN
    assert not report.ok
    assert report.error == "DatabaseUnavailableError"
    assert "Could not connect" in report.message
    assert stopped_server_url.password not in report.message


def test_health_times_out_on_a_hung_server(hung_port):
    engine = create_engine(Settings(url=f"postgresql://u:hunter2@127.0.0.1:{hung_port}/d",
                                    pool=TEST_POOL, connect_timeout=30))
    start = time.monotonic()
    report = health_check(engine, timeout=1)
    assert time.monotonic() - start < 1 + MARGIN
    assert report.error == "DatabaseUnavailableError"
    assert "did not answer the health check within 1 s" in report.message
    assert "hunter2" not in report.message
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match="within 0.5 s"):
        check_database(engine, timeout=0.5)
    assert time.monotonic() - start < 0.5 + MARGIN


def test_wrong_password_is_an_authentication_error_without_the_password(db_url):
    if not db_url.password:
        pytest.skip("the server under test uses no password")
    bad = "wrong-" + "pw-42"
    engine = create_engine(Settings(url=_url(db_url, password=bad), pool=TEST_POOL))
    with pytest.raises(AuthenticationError) as info:
        check_database(engine, timeout=5)
    assert bad not in str(info.value)
    report = health_check(engine, timeout=5)
    assert report.error == "AuthenticationError"
    assert bad not in report.message


def test_unreachable_port_is_database_unavailable(closed_port):
    engine = create_engine(Settings(url=f"postgresql://u:hunter2@127.0.0.1:{closed_port}/d",
                                    pool=TEST_POOL))
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as info:
        check_database(engine, timeout=3)
    assert time.monotonic() - start < 3 + MARGIN
    assert "hunter2" not in str(info.value)


async def test_async_health_ok_on_a_live_server(async_engine, password):
    report = await async_health_check(async_engine, timeout=5)
    assert report.ok, report.message
    assert report.pool["class"] == "AsyncAdaptedQueuePool"
    assert await async_health_check(async_engine, timeout=5)


async def test_async_health_not_ok_within_timeout_when_server_is_stopped(stopped_server_url):
    engine = create_async_engine(Settings(url=stopped_server_url, pool=TEST_POOL))
    start = time.monotonic()
    report = await async_health_check(engine, timeout=2)
    assert time.monotonic() - start < 2 + MARGIN
    assert report.error == "DatabaseUnavailableError"
    assert stopped_server_url.password not in report.message
    await engine.dispose()


async def test_async_health_times_out_on_a_hung_server(hung_port):
    engine = create_async_engine(Settings(url=f"postgresql://u:hunter2@127.0.0.1:{hung_port}/d",
                                          pool=TEST_POOL, connect_timeout=30))
    start = time.monotonic()
    report = await async_health_check(engine, timeout=1)
    assert time.monotonic() - start < 1 + MARGIN
    assert report.error == "DatabaseUnavailableError"
    assert "hunter2" not in report.message
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailableError):
        await async_check_database(engine, timeout=0.5)
    assert time.monotonic() - start < 0.5 + MARGIN
    await engine.dispose()


async def test_async_wrong_password_is_an_authentication_error(db_url):
    if not db_url.password:
        pytest.skip("the server under test uses no password")
    bad = "wrong-" + "pw-43"
    engine = create_async_engine(Settings(url=_url(db_url, password=bad), pool=TEST_POOL))
    with pytest.raises(AuthenticationError) as info:
        await async_check_database(engine, timeout=5)
    assert bad not in str(info.value)
    await engine.dispose()


# --- the probe never takes the application's pooled connections -------------------------

ONE_CONNECTION = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3}


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_probe_uses_no_pooled_connection_and_answers_when_the_pool_is_exhausted(settings,
                                                                                driver):
    settings = for_driver(settings, driver)
    engine = create_engine(settings, pool=settings.pool.replace(**ONE_CONNECTION))
    try:
        for _ in range(3):
            assert health_check(engine, timeout=5).ok
        assert engine.pool.checkedout() == 0 and engine.pool.checkedin() == 0
        with engine.connect():                    # the application holds its only one
            report = health_check(engine, timeout=2)
            assert report.ok, report.message
            assert report.pool_saturated
            assert report.pool["checkedout"] == 1
        assert not health_check(engine, timeout=2).pool_saturated
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg-async"])
async def test_async_probe_uses_no_pooled_connection_and_answers_when_the_pool_is_exhausted(
        settings, driver):
    settings = for_driver(settings, driver)
    engine = create_async_engine(settings, pool=settings.pool.replace(**ONE_CONNECTION))
    pool = engine.sync_engine.pool
    try:
        for _ in range(3):
            assert (await async_health_check(engine, timeout=5)).ok
        assert pool.checkedout() == 0 and pool.checkedin() == 0
        async with engine.connect():
            report = await async_health_check(engine, timeout=2)
            assert report.ok, report.message
            assert report.pool_saturated
            assert report.pool["checkedout"] == 1
        assert not (await async_health_check(engine, timeout=2)).pool_saturated
    finally:
        await engine.dispose()
