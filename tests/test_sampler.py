"""The lab's one sampler (``labkit.lab.sampler.Sampler``): any source, on a period, in order.

Pool gauges and the server's view are sampled against the real server here; a service's
``/metrics`` through the same class in ``test_services.py``.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from sqlalchemy import Engine

from labkit import TEST_POOL, PoolMetrics, Settings, create_engine
from labkit.lab.sampler import Sampler


def _wait_until(ready, timeout: float = 10.0) -> None:
    """Poll ``ready()`` (a busy machine may sample late; the tests count, never time)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "the sampler did not sample in time"
        time.sleep(0.01)


class _Counting:
    """A source counting its calls; fails with ``error`` on the calls in ``failing``."""

    def __init__(self, error: Exception | None = None, failing: range = range(0)) -> None:
        self.calls = itertools.count(1)
        self.error, self.failing = error, failing
        self.closed = False

    def __call__(self) -> dict[str, int]:
        n = next(self.calls)
        if self.error is not None and n in self.failing:
            raise self.error
        return {"n": n}

    def close(self) -> None:
        self.closed = True


def test_a_source_is_sampled_in_order_until_stop_then_once_more_and_closed():
    source = _Counting()
    with Sampler(source, interval=0.01) as sampler:
        _wait_until(lambda: len(sampler.samples) >= 3)
        seen_inside = len(sampler.samples)
    times, counts = sampler.series("n")
    assert seen_inside >= 3 and len(counts) == seen_inside + 1  # one last sample at stop
    assert counts == list(range(1, len(counts) + 1))
    assert times == sorted(times) and times[0] >= 0
    assert sampler.max("n") == counts[-1] and source.closed


def test_times_count_from_the_given_origin():
    t0 = time.perf_counter() - 10.0  # a run that started 10 s ago
    with Sampler(_Counting(), interval=0.01, t0=t0) as sampler:
        _wait_until(lambda: len(sampler.samples) >= 2)
    times, _ = sampler.series("n")
    assert all(10.0 <= t < 20.0 for t in times)
    shifted, _ = sampler.series("n", origin=t0 + 10.0)
    assert all(0.0 <= t < 10.0 for t in shifted)


def test_tolerated_errors_lose_a_sample_and_others_are_raised_at_stop():
    flaky = _Counting(ConnectionError("restarting"), failing=range(2, 4))
    with Sampler(flaky, interval=0.01, tolerate=(ConnectionError,)) as sampler:
        _wait_until(lambda: len(sampler.samples) >= 2)
    assert sampler.failures == 2 and 2 not in sampler.series("n")[1]

    broken = _Counting(RuntimeError("bad source"), failing=range(3, 10**6))
    with pytest.raises(RuntimeError, match="bad source"):
        with Sampler(broken, interval=0.01) as sampler:
            _wait_until(lambda: sampler.error is not None)
    assert sampler.series("n")[1] == [1, 2] and broken.closed


def test_missing_keys_are_skipped_or_read_as_the_missing_value():
    values = iter([{"a": 1.0}, {"a": 2.0, "b": 5.0}, {"a": 3.0}] + [{}] * 1000)
    lock = threading.Lock()

    def source() -> dict[str, float]:
        with lock:
            return next(values)

    with Sampler(source, interval=0.01) as skipping:
        _wait_until(lambda: len(skipping.samples) >= 3)
    assert skipping.series("b")[1] == [5.0]
    assert skipping.max("never") is None

    values = iter([{"a": 1.0}, {"a": 2.0, "b": 5.0}] + [{}] * 1000)
    with Sampler(source, interval=0.01, missing=0.0) as zeros:
        _wait_until(lambda: len(zeros.samples) >= 3)
    assert zeros.series("b")[1][:3] == [0.0, 5.0, 0.0]
    assert zeros.max("never") == 0.0


def test_nonsense_arguments_are_refused(observer: Engine):
    with pytest.raises(ValueError, match="interval must be > 0"):
        Sampler(_Counting(), interval=0)
    with pytest.raises(ValueError, match="nothing to sample"):
        Sampler(None)
    with pytest.raises(ValueError, match="application_name is needed"):
        Sampler(None, observer)


def test_pool_gauges_and_the_servers_view_in_one_sample(settings: Settings, observer: Engine):
    app = "labkit-test-sampler"
    engine = create_engine(settings.replace(application_name=app),
                           pool=TEST_POOL.replace(pool_size=3, max_overflow=0))
    metrics = PoolMetrics.attach(engine)
    try:
        with Sampler(metrics, observer, application_name=app, interval=0.02) as sampler:
            held = [engine.connect() for _ in range(2)]
            _wait_until(lambda: any(row["in_use"] == 2 and row["server_connections"] == 2
                                    for row in sampler.samples))
            for conn in held:
                conn.close()
    finally:
        metrics.detach()
        engine.dispose()
    assert sampler.max("in_use") == 2 and sampler.series("in_use")[1][-1] == 0
    assert sampler.max("server_connections") == 2       # the two backends, seen by the server
    assert set(sampler.samples[0]) >= {"t", "in_use", "idle", "overflow", "pool_size",
                                       "server_connections", "server_active", "server_idle",
                                       "server_idle_in_transaction"}
