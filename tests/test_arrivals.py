"""Open-loop load (``labkit.lab.arrivals``): random arrivals at a set rate, real server."""

from __future__ import annotations

import statistics

import pytest
from sqlalchemy import Engine

from labkit import Settings, TEST_POOL, create_engine
from labkit.lab.arrivals import (
    exponential_sleep,
    mean_hold_s,
    mean_in_use,
    poisson_arrivals,
    run_poisson_load,
)


def test_poisson_arrivals_have_the_asked_rate_and_repeat_with_their_seed():
    times = poisson_arrivals(200.0, 50.0, seed=7)
    assert times == poisson_arrivals(200.0, 50.0, seed=7)
    assert times != poisson_arrivals(200.0, 50.0, seed=8)
    assert all(a < b for a, b in zip(times, times[1:]))
    assert 0.95 * 10_000 < len(times) < 1.05 * 10_000      # ~5 standard deviations
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Exponential gaps: the standard deviation equals the mean (a regular clock gives 0).
    assert 0.9 < statistics.pstdev(gaps) / statistics.fmean(gaps) < 1.1


@pytest.mark.parametrize("rate, duration", [(0, 1.0), (10, 0), (-1, 1.0)])
def test_nonsense_rates_are_refused(rate: float, duration: float):
    with pytest.raises(ValueError, match="must be > 0"):
        poisson_arrivals(rate, duration)


def test_open_loop_load_sends_every_arrival_and_obeys_littles_law(settings: Settings):
    engine: Engine = create_engine(settings, pool=TEST_POOL.replace(pool_size=8,
                                                                  max_overflow=0))
    try:
        result = run_poisson_load(engine, exponential_sleep(0.010, seed=3), rate_per_s=60,
                                  duration=2.0, seed=5)
    finally:
        engine.dispose()
    assert len(result.ops) == len(poisson_arrivals(60, 2.0, seed=5))
    assert not result.errors
    hold = mean_hold_s(result)
    assert hold >= 0.008                      # at least the server's sleeps (mean 10 ms)
    # Little's law: connections in use on average = arrival rate x hold time.
    expected = len(result.ops) / 2.0 * hold
    assert 0.6 * expected < mean_in_use(result, until=2.0) < 1.5 * expected
