"""Pool sizing models: Little's law and Erlang C against textbook values (pure math)."""

from __future__ import annotations

import math
import random

import pytest

import labkit
from labkit.sizing import (
    PoolRecommendation,
    connections_in_use,
    erlang_b,
    erlang_c,
    mean_queue_wait,
    pool_max_connections,
    queue_wait_percentile,
    recommend_pool,
    response_time_percentile,
    wait_probability,
)


def test_pool_max_connections_is_the_pools_worst_case():
    assert pool_max_connections(labkit.PRODUCTION_POOL) == 10  # 5 + 5
    assert pool_max_connections(labkit.TEST_POOL) is None  # NullPool: one per checkout
    assert pool_max_connections(labkit.PoolProfile(poolclass="static")) == 1
    assert pool_max_connections(labkit.PoolProfile(max_overflow=-1)) is None


def _erlang_c_by_factorials(c: int, a: float) -> float:
    """The textbook formula, term by term (fine for small c)."""
    top = a ** c / math.factorial(c) * c / (c - a)
    return top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)


def test_littles_law_multiplies_throughput_by_hold_time():
    assert connections_in_use(200, 0.015) == pytest.approx(3.0)
    assert connections_in_use(0, 0.015) == 0.0


@pytest.mark.parametrize(("c", "a", "expected"), [
    (1, 0.5, 0.5),            # M/M/1: the probability of waiting is the utilisation
    (2, 1.0, 1 / 3),          # M/M/2: 2 rho^2 / (1 + rho) with rho = 0.5
    (3, 2.0, 4 / 9),
    (10, 8.0, 0.4092),        # the call-centre example: 8 erlangs on 10 agents
    (11, 10.0, 0.6821),       # 10 erlangs on 11 agents
])
def test_erlang_c_matches_textbook_values(c, a, expected):
    assert erlang_c(c, a) == pytest.approx(expected, abs=5e-4)
    assert erlang_c(c, a) == pytest.approx(_erlang_c_by_factorials(c, a), rel=1e-12)


def test_erlang_b_matches_its_recursion_start_and_a_table_value():
    assert erlang_b(1, 1.0) == pytest.approx(0.5)       # A / (1 + A)
    assert erlang_b(10, 5.0) == pytest.approx(0.01838, abs=1e-5)


def test_erlang_c_stays_finite_where_factorials_overflow():
    value = erlang_c(2000, 1950.0)
    assert 0.0 < value < 1.0
    assert math.isfinite(mean_queue_wait(2000, 1950.0 / 0.01, 0.01))


def test_mean_wait_of_mm1_is_rho_over_mu_minus_lambda():
    # lambda = 40/s, mean hold 20 ms (mu = 50/s): Wq = 0.8 / (50 - 40) = 80 ms
    assert mean_queue_wait(1, 40, 0.020) == pytest.approx(0.080)


def test_wait_percentiles_of_mm1_are_logarithms():
    # P(Wq > t) = rho exp(-(mu - lambda) t);  P(T > t) = exp(-(mu - lambda) t)
    assert queue_wait_percentile(1, 40, 0.020, 99) == pytest.approx(math.log(80) / 10)
    assert response_time_percentile(1, 40, 0.020, 99) == pytest.approx(math.log(100) / 10)
    assert queue_wait_percentile(1, 10, 0.020, 75) == 0.0     # only 20 % wait at all
    assert wait_probability(1, 40, 0.020) == pytest.approx(0.8)
    assert wait_probability(1, 40, 0.020, math.log(80) / 10) == pytest.approx(0.01)


def test_response_percentile_agrees_with_a_simulated_fifo_queue():
    c, lam, hold = 3, 120.0, 0.020                 # 2.4 connections' worth, 80 % busy
    rng = random.Random(7)
    free = [0.0] * c
    t, times = 0.0, []
    for _ in range(200_000):
        t += rng.expovariate(lam)
        i = min(range(c), key=free.__getitem__)
        start = max(t, free[i])
        free[i] = start + rng.expovariate(1 / hold)
        times.append(free[i] - t)
    times.sort()
    simulated = times[int(0.99 * len(times))]
    assert simulated == pytest.approx(response_time_percentile(c, lam, hold, 99), rel=0.05)


def test_response_percentile_handles_equal_rates():
    # c - A = 1 makes the wait's tail rate equal the hold rate: the Erlang-2 branch.
    value = response_time_percentile(2, 50, 0.020, 99)
    assert value == pytest.approx(response_time_percentile(2, 50.0001, 0.020, 99), rel=1e-3)


@pytest.mark.parametrize("call", [
    lambda: connections_in_use(-1, 0.01),
    lambda: connections_in_use(10, 0),
    lambda: connections_in_use(math.nan, 0.01),
    lambda: erlang_c(0, 0.5),
    lambda: erlang_c(2.5, 0.5),
    lambda: queue_wait_percentile(2, 10, 0.01, 100),
    lambda: recommend_pool(10, 0.01, headroom=-0.1),
    lambda: recommend_pool(10, 0.01, target_wait_s=-1),
])
def test_bad_input_is_a_value_error_naming_it(call):
    with pytest.raises(ValueError, match="must be"):
        call()


def test_an_overloaded_pool_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="never keep up"):
        erlang_c(4, 4.0)
    with pytest.raises(ValueError, match="never keep up"):
        mean_queue_wait(3, 200, 0.020)             # 4 connections' worth of work on 3


def test_recommendation_meets_its_target_and_is_the_smallest_that_does():
    rec = recommend_pool(150, 0.020, target_wait_s=0.020)
    assert isinstance(rec, PoolRecommendation)
    assert rec.pool_size == 6 and rec.connections_in_use == pytest.approx(3.0)
    assert rec.wait_s <= 0.020 < queue_wait_percentile(rec.pool_size - 1, 150, 0.020)
    assert rec.peak_throughput_per_s == pytest.approx(187.5)
    assert rec.peak_wait_s <= 0.020
    assert rec.max_connections == rec.pool_size + rec.max_overflow
    assert "Little's law" in rec.explanation and "pool_size=6" in rec.explanation


def test_recommendation_can_bound_the_mean_and_overflow_covers_the_headroom():
    mean = recommend_pool(150, 0.020, target_wait_s=0.001, percentile=None, headroom=0)
    assert mean.max_overflow == 0 and mean.mean_wait_s <= 0.001 and mean.wait_s == mean.mean_wait_s
    big = recommend_pool(150, 0.020, target_wait_s=0.001, percentile=None, headroom=1.0)
    assert big.pool_size == mean.pool_size and big.max_overflow > 0


def test_no_traffic_needs_one_connection():
    rec = recommend_pool(0, 0.010)
    assert (rec.pool_size, rec.max_overflow, rec.wait_s) == (1, 0, 0.0)


def test_sizing_is_an_optional_module_outside_the_cores_names():
    assert labkit.sizing.recommend_pool is recommend_pool
    assert not {"recommend_pool", "PoolRecommendation", "erlang_c"} & set(labkit.__all__)


def test_the_connection_budget_lives_in_sizing_outside_the_core():
    from labkit import health, sizing

    for name in ("ConnectionBudget", "check_connection_budget",
                 "async_check_connection_budget"):
        assert hasattr(sizing, name) and name in sizing.__all__, name
        assert not hasattr(health, name) and name not in labkit.__all__, name
