"""``labkit.lab.services`` and ``labkit.lab.httpload``: real uvicorn processes, real HTTP."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from labkit import TEST_POOL, Settings, create_engine
from labkit.lab.httpload import Call, HttpLoad, every, metrics_sampler, run_http, scrape
from labkit.lab.server import free_port
from labkit.lab.services import ServiceError, uvicorn_service
from tests.conftest import own_schema


# This module's own PostgreSQL schema: the example service creates its tables where the
# URL's search_path points (``options=-c search_path=...``), so test modules running at
# the same time (pytest-xdist) and notebook 01 never share ``example_orders``. Every
# fixture built on ``db_url`` (``settings``, ``observer``) follows it.
SCHEMA = "labkit_test_services"


@pytest.fixture(scope="session")
def db_url(db_url: URL) -> Iterator[URL]:
    """The shared server's URL with ``search_path`` set to this module's schema."""
    with own_schema(db_url, SCHEMA) as url:
        yield url


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) still answers signal 0.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_service_serves_on_a_free_port_and_is_stopped_on_exit(db_url: URL) -> None:
    """Pins: the helper waits until uvicorn answers, and leaving the block ends the
    process (SIGTERM: its lifespan shut down), so nothing listens on the port any more."""
    with uvicorn_service("examples.fastapi_app:app", database_url=db_url) as service:
        assert httpx.get(f"{service.base_url}/live").json() == {"status": "alive"}
        assert service.started_in_s > 0
        pid, port = service.pid, service.port
    assert not _alive(pid)
    assert "Application shutdown complete" in service.log_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/live", timeout=1)


def test_service_is_stopped_when_the_block_raises(db_url: URL) -> None:
    with pytest.raises(RuntimeError, match="cell failed"), uvicorn_service(
            "examples.fastapi_app:app", database_url=db_url) as service:
        raise RuntimeError("cell failed")
    assert not _alive(service.pid)


def test_a_service_that_cannot_start_raises_with_its_log(tmp_path: Path) -> None:
    """Pins: an import error is a ``ServiceError`` carrying uvicorn's own message, at
    once, not after the start timeout."""
    start = time.monotonic()
    with pytest.raises(ServiceError, match='Could not import module "examples.nowhere"'):
        with uvicorn_service("examples.nowhere:app", log=tmp_path / "log"):
            pass
    assert time.monotonic() - start < 20


def test_a_service_that_ignores_sigterm_is_killed(db_url: URL, tmp_path: Path) -> None:
    """Pins: stopping never hangs: SIGKILL after ``stop_timeout``."""
    with uvicorn_service("examples.fastapi_app:app", database_url=db_url,
                         stop_timeout=1.0) as service:
        # The process now ignores SIGTERM, as a hung shutdown would.
        os.kill(service.pid, signal.SIGSTOP)
        start = time.monotonic()
    assert not _alive(service.pid)
    assert time.monotonic() - start < 5


def test_free_port_is_not_listening() -> None:
    port = free_port()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)


def test_load_records_start_headers_end_and_status_of_each_request(db_url: URL) -> None:
    """Pins: every request is recorded in order on the run's clock, with its status, or
    the transport error that ended it (a read timeout here), and ``open_over_time``
    counts requests in flight."""
    with uvicorn_service("examples.fastapi_app:app", database_url=db_url) as service:
        result = run_http(service.base_url, [
            every("/live", interval=0.1, duration=0.5),
            [Call("GET", "/nowhere", label="missing")],
        ], timeout=5)
        assert result.statuses("/live") == {"200": 6}
        assert result.statuses("missing") == {"404": 1}
        lives = result.by_label("/live")
        assert all(r.start <= r.headers_at <= r.end for r in lives)  # type: ignore[operator]
        assert [round(r.start, 1) for r in lives] == pytest.approx(
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=0.35)
        assert all(a.end <= b.start for a, b in zip(lives, lives[1:]))  # one client: in turn
        times, counts = result.open_over_time()
        assert max(counts) <= 2 and counts[-1] == 0 and times == sorted(times)

        os.kill(service.pid, signal.SIGSTOP)  # a server that accepts, then never answers
        try:
            stuck = run_http(service.base_url, [[Call("GET", "/live")]], timeout=0.5)
        finally:
            os.kill(service.pid, signal.SIGCONT)
        (record,) = stuck.records
        assert record.status is None and record.error == "ReadTimeout"
        assert record.outcome == "ReadTimeout" and not record.ok
        assert 0.4 < record.end - record.start < 3


def test_metrics_sampler_reads_prometheus_samples_on_the_runs_clock(db_url: URL) -> None:
    with uvicorn_service("examples.fastapi_app:app", database_url=db_url) as service:
        with HttpLoad(service.base_url, [every("/ready", interval=0.05, duration=0.5)]
                      ) as run, metrics_sampler(service.base_url, interval=0.05,
                                                t0=run.t0) as sampler:
            run.wait()
            time.sleep(0.1)
        values = scrape(service.base_url)
    times, sizes = sampler.series("labkit_pool_size")
    assert len(times) >= 3 and times == sorted(times) and times[0] >= 0
    assert set(sizes) == {5.0}  # the development profile's pool_size
    assert values["labkit_pool_checkouts_total"] >= 1  # the lifespan's schema
    assert sampler.failures == 0


def test_load_and_sampler_refuse_nonsense_arguments() -> None:
    with pytest.raises(ValueError, match="timeout must be > 0"):
        HttpLoad("http://127.0.0.1:1", [], timeout=0)
    with pytest.raises(ValueError, match="interval must be > 0"):
        metrics_sampler("http://127.0.0.1:1", interval=0)


def test_metrics_sampler_counts_failed_scrapes_and_reads_absent_samples_as_zero() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    with metrics_sampler(nowhere, interval=0.01) as sampler:
        deadline = time.monotonic() + 10
        while sampler.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sampler.failures >= 4 and sampler.samples == []  # the last one at exit too
    assert sampler.max("labkit_pool_in_use") == 0.0


def test_the_example_creates_its_tables_in_the_schema_the_url_names(db_url: URL) -> None:
    """Pins: ``options=-c search_path=...`` in ``DATABASE_URL`` is all it takes to give a
    service (here, this module's) tables of its own: the lifespan's ``CREATE TABLE``
    lands in that schema, sync and async, and the service reads and writes there."""
    for target in ("examples.fastapi_app:app", "examples.fastapi_app:async_app"):
        with uvicorn_service(target, database_url=db_url) as service:
            assert httpx.post(f"{service.base_url}/orders/7", params={"item": "tea"},
                              timeout=10).status_code in {201, 409}
    observer = create_engine(Settings(url=db_url, pool=TEST_POOL))
    try:
        with observer.connect() as conn:
            found = conn.execute(text(
                "SELECT to_regclass(:name) IS NOT NULL"), {"name": f"{SCHEMA}.example_orders"})
            assert found.scalar() is True
            assert conn.execute(text("SELECT id FROM example_orders")).scalars().all() == [7]
    finally:
        observer.dispose()
