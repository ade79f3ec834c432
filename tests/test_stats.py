"""The lab's one statistics module (``labkit.lab.stats``) and the modules that use it.

The percentile is checked on lists whose answer is known, against numpy's default and
the standard library; then a load run, an open-loop sweep and a benchmark record are
shown to print the same p99 for the same values.
"""

from __future__ import annotations

import math
import random
import statistics

import numpy
import pytest

from labkit.lab import arrivals, bench, httpload, load, sampler, server, services, stats
from labkit.lab.load import LoadResult, OpRecord


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([15.0, 20.0, 35.0, 40.0, 50.0], 40, 29.0),   # 60 % of the way from 20 to 35
    ([15.0, 20.0, 35.0, 40.0, 50.0], 50, 35.0),   # the middle value
    ([50.0, 15.0, 40.0, 20.0, 35.0], 0, 15.0),    # the minimum, whatever the order
    ([15.0, 20.0, 35.0, 40.0, 50.0], 100, 50.0),  # the maximum
    ([4.0, 1.0, 3.0, 2.0], 50, 2.5),              # even count: between the middle two
    ([float(i) for i in range(1, 11)], 99, 9.91),
    ([7.0], 99, 7.0),
])
def test_percentile_interpolates_between_the_closest_ranks(values, q, expected):
    assert stats.percentile(values, q) == pytest.approx(expected)


def test_percentile_is_numpys_default_and_its_median_the_standard_librarys():
    rng = random.Random(11)
    for n in (2, 3, 10, 101, 1000):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (1, 25, 50, 75, 90, 99, 99.9):
            assert stats.percentile(values, q) == pytest.approx(
                float(numpy.percentile(values, q)), rel=1e-12)
        assert stats.median(values) == pytest.approx(statistics.median(values), rel=1e-12)
        assert stats.percentile(values, 25) == pytest.approx(
            statistics.quantiles(values, n=4, method="inclusive")[0], rel=1e-12)


def test_percentile_of_nothing_is_nan_and_nonsense_q_is_refused():
    assert math.isnan(stats.percentile([], 99))
    assert math.isnan(stats.median(iter(())))
    for q in (-1, 100.5):
        with pytest.raises(ValueError, match="q must be between 0 and 100"):
            stats.percentile([1.0, 2.0], q)


@pytest.mark.parametrize(("n", "confidence", "k", "coverage"), [
    (8, 0.95, 1, 0.9922),    # only min-max reaches 95 % with 8 values
    (12, 0.95, 3, 0.9614),   # 3rd smallest to 3rd largest
    (12, 0.99, 2, 0.9937),
    (20, 0.95, 6, 0.9586),
])
def test_median_interval_uses_the_widest_order_statistics_that_reach_the_confidence(
        n, confidence, k, coverage):
    values = [float(i) for i in range(1, n + 1)]
    low, high, reached = stats.median_interval(values, confidence)
    assert (low, high) == (k, n + 1 - k)
    assert reached == pytest.approx(coverage, abs=1e-4)
    assert reached >= confidence


def test_median_interval_says_when_too_few_values_reach_the_confidence():
    low, high, reached = stats.median_interval([3.0, 1.0, 2.0], 0.95)
    assert (low, high) == (1.0, 3.0)
    assert reached == pytest.approx(0.75)
    assert all(math.isnan(x) for x in stats.median_interval([])[:2])


def _run(latencies_ms: list[float]) -> LoadResult:
    ops = [OpRecord(worker=0, start=i, end=i + ms / 1000.0, wait_ms=ms, ok=True, got=i,
                    released=i + ms / 1000.0)
           for i, ms in enumerate(latencies_ms)]
    return LoadResult("known", 1, float(len(ops)), ops, 0.0)


def test_a_load_run_a_sweep_and_a_benchmark_print_the_same_p99_for_the_same_values():
    latencies_ms = [float(x) for x in range(1, 11)]
    run = _run(latencies_ms)
    sweep = arrivals.SizeRun(size=1, runs=[run], seconds=1.0)
    record = bench.record("known", 1, [ms / 1000.0 for ms in latencies_ms], 1.0)
    p99 = stats.percentile(latencies_ms, 99)
    assert p99 == pytest.approx(9.91)                 # nearest rank would say 10
    assert run.percentile_ms(99) == pytest.approx(p99)
    assert run.percentile_ms(99, of="wait") == pytest.approx(p99)
    assert sweep.wait_percentile_ms(99) == pytest.approx(p99)
    assert record["p99_ms"] == pytest.approx(p99, abs=1e-3)
    assert run.summary()["p99_ms"] == record["p99_ms"]
    assert record["p50_ms"] == pytest.approx(statistics.median(latencies_ms), abs=1e-3)


def test_the_lab_has_one_percentile_one_free_port_and_one_sampler():
    assert load.percentile is stats.percentile and bench.percentile is stats.percentile
    assert services.free_port is server.free_port
    assert arrivals.Sampler is sampler.Sampler
    assert not hasattr(bench, "quantile") and not hasattr(httpload, "MetricsSampler")
