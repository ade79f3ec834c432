"""Size a connection pool from two numbers: throughput and how long a request holds a connection.

Pure Python (standard library only), so it can be copied with the core. The models:

- **Little's law**: a pool that lends out ``throughput_per_s`` connections a second,
  each held for ``hold_time_s`` on average, has ``throughput_per_s * hold_time_s`` of them
  in use on average (the *offered load*, in connections). It holds for any arrival
  pattern and any hold-time distribution, as long as the system is stable.
- **Erlang C** (the M/M/c queue): requests arrive at random (a Poisson process), hold a
  connection for an exponentially distributed time, and a pool of ``c`` connections
  serves them first come, first served; a request that finds every connection lent out
  waits. It gives the probability of waiting, the mean wait and the wait's percentiles.

Real services differ, in ways that mostly make the model err on the safe side:
hold times steadier than exponential (a constant hold time roughly halves the mean wait);
arrivals from a fixed number of workers that each wait for their answer (a closed
system: the queue can never exceed the workers). One way it errs on the unsafe side:
SQLAlchemy's ``QueuePool`` does not hand a returned connection to the longest waiter,
which leaves the mean wait unchanged but stretches the tail.

Example:
    ```python
    from labkit.sizing import recommend_pool

    rec = recommend_pool(400, 0.012, target_wait_s=0.005)   # 400 req/s, 12 ms each
    rec.pool_size, rec.max_overflow     # (10, 1): p99 wait <= 5 ms, 25 % headroom
    print(rec.explanation)
    ```
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "PoolRecommendation",
    "connections_in_use",
    "erlang_b",
    "erlang_c",
    "mean_queue_wait",
    "queue_wait_percentile",
    "recommend_pool",
    "response_time_percentile",
    "wait_probability",
]

#: The largest pool ``recommend_pool`` considers before it gives up.
MAX_POOL = 10_000


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def _servers(connections: int) -> int:
    if isinstance(connections, bool) or not isinstance(connections, int):
        raise ValueError(f"connections must be a whole number, got {connections!r}")
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections!r}")
    return connections


def _offered_load(throughput_per_s: float, hold_time_s: float) -> float:
    return _positive("throughput_per_s", throughput_per_s, allow_zero=True) * \
        _positive("hold_time_s", hold_time_s)


def _stable(connections: int, load: float) -> None:
    if load >= connections:
        raise ValueError(
            f"the pool can never keep up: {load:.3g} connections' worth of work arrives "
            f"(throughput x hold time) for {connections} connection(s); utilisation "
            f"{load / connections:.0%} >= 100 % makes the queue grow without bound. "
            f"Use more than {math.floor(load)} connections or shorten the hold time")


def connections_in_use(throughput_per_s: float, hold_time_s: float) -> float:
    """Return the mean number of connections in use, by Little's law.

    Args:
        throughput_per_s: Checkouts per second (requests that use the database).
        hold_time_s: Mean time a request holds its connection, in seconds.

    Returns:
        ``throughput_per_s * hold_time_s``: the mean number of connections lent out
        (the offered load, in connections). A pool needs at least this many, plus room
        for randomness.

    Raises:
        ValueError: On a negative or non-finite throughput, or a hold time <= 0.
    """
    return _offered_load(throughput_per_s, hold_time_s)


def erlang_b(connections: int, offered_load: float) -> float:
    """Return the Erlang B blocking probability of ``connections`` servers.

    The probability that all connections are busy when there is no queue (M/M/c/c).
    Computed by the stable recursion ``B(k) = A B(k-1) / (k + A B(k-1))``, which never
    forms the factorials of the textbook formula.

    Args:
        connections: Number of connections (servers), >= 1.
        offered_load: Offered load ``A`` in connections (throughput x hold time), >= 0.

    Returns:
        The blocking probability, between 0 and 1.

    Raises:
        ValueError: On fewer than 1 connection or a negative load.
    """
    c = _servers(connections)
    a = _positive("offered_load", offered_load, allow_zero=True)
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def erlang_c(connections: int, offered_load: float) -> float:
    """Return the Erlang C probability that a request has to wait for a connection.

    M/M/c: Poisson arrivals, exponential hold times, ``connections`` servers and an
    unbounded first-come-first-served queue. Derived from Erlang B:
    ``C = c B / (c - A (1 - B))``.

    Args:
        connections: Number of connections (servers), >= 1.
        offered_load: Offered load ``A`` in connections (throughput x hold time).

    Returns:
        The probability that an arriving request finds every connection lent out.

    Raises:
        ValueError: On bad input, or when ``offered_load >= connections`` (the pool can
            never keep up).
    """
    c = _servers(connections)
    a = _positive("offered_load", offered_load, allow_zero=True)
    _stable(c, a)
    b = erlang_b(c, a)
    return c * b / (c - a * (1.0 - b))


def _queue_terms(connections: int, throughput_per_s: float, hold_time_s: float
                 ) -> tuple[float, float]:
    """(probability of waiting, rate of the waiting time's exponential tail per second)."""
    c = _servers(connections)
    a = _offered_load(throughput_per_s, hold_time_s)
    _stable(c, a)
    return erlang_c(c, a), (c - a) / hold_time_s


def mean_queue_wait(connections: int, throughput_per_s: float, hold_time_s: float) -> float:
    """Return the mean time a request waits for a connection (M/M/c), in seconds.

    Averaged over all requests, those that wait and those that do not:
    ``C * hold_time / (connections - A)``. The mean does not depend on the order in
    which waiters are served, so it holds for a pool that is not first come, first
    served too.

    Args:
        connections: Pool size (connections that can be lent out at once).
        throughput_per_s: Requests per second (Poisson arrivals).
        hold_time_s: Mean time each holds its connection, in seconds (exponential).

    Returns:
        The mean checkout wait in seconds.

    Raises:
        ValueError: On bad input, or when the pool can never keep up.
    """
    p_wait, rate = _queue_terms(connections, throughput_per_s, hold_time_s)
    return p_wait / rate


def wait_probability(connections: int, throughput_per_s: float, hold_time_s: float,
                     longer_than_s: float = 0.0) -> float:
    """Return the share of requests that wait longer than ``longer_than_s`` (M/M/c, FIFO).

    ``P(wait > t) = C exp(-(connections - A) t / hold_time_s)``; with ``t = 0`` it is the
    Erlang C probability of waiting at all.

    Args:
        connections: Pool size.
        throughput_per_s: Requests per second (Poisson arrivals).
        hold_time_s: Mean hold time in seconds (exponential).
        longer_than_s: The wait, in seconds, >= 0.

    Returns:
        A probability between 0 and 1.

    Raises:
        ValueError: On bad input, or when the pool can never keep up.
    """
    t = _positive("longer_than_s", longer_than_s, allow_zero=True)
    p_wait, rate = _queue_terms(connections, throughput_per_s, hold_time_s)
    return p_wait * math.exp(-rate * t)


def queue_wait_percentile(connections: int, throughput_per_s: float, hold_time_s: float,
                          percentile: float = 99.0) -> float:
    """Return a percentile of the time spent waiting for a connection (M/M/c, FIFO), in s.

    The wait is 0 with probability ``1 - C`` and otherwise exponential with rate
    ``(connections - A) / hold_time_s``, so ``P(wait > t) = C exp(-rate t)``. When at
    least ``percentile`` % of requests do not wait at all, the percentile is 0.

    Args:
        connections: Pool size.
        throughput_per_s: Requests per second (Poisson arrivals).
        hold_time_s: Mean hold time in seconds (exponential).
        percentile: Which percentile, strictly between 0 and 100 (99 for p99).

    Returns:
        The waiting time in seconds that ``percentile`` % of requests do not exceed.

    Raises:
        ValueError: On bad input, or when the pool can never keep up.
    """
    q = _fraction(percentile)
    p_wait, rate = _queue_terms(connections, throughput_per_s, hold_time_s)
    tail = 1.0 - q
    if p_wait <= tail:
        return 0.0
    return math.log(p_wait / tail) / rate


def response_time_percentile(connections: int, throughput_per_s: float, hold_time_s: float,
                             percentile: float = 99.0) -> float:
    """Return a percentile of wait plus hold time (M/M/c, FIFO), in seconds.

    The response time is the checkout wait plus an independent exponential hold time;
    its tail ``P(T > t)`` has a closed form, inverted here by bisection.

    Args:
        connections: Pool size.
        throughput_per_s: Requests per second (Poisson arrivals).
        hold_time_s: Mean hold time in seconds (exponential).
        percentile: Which percentile, strictly between 0 and 100.

    Returns:
        The time in seconds within which ``percentile`` % of requests are done.

    Raises:
        ValueError: On bad input, or when the pool can never keep up.
    """
    q = _fraction(percentile)
    p_wait, theta = _queue_terms(connections, throughput_per_s, hold_time_s)
    mu = 1.0 / hold_time_s

    def tail(t: float) -> float:
        served_at_once = (1.0 - p_wait) * math.exp(-mu * t)
        if abs(theta - mu) <= 1e-9 * mu:   # wait and hold with the same rate: Erlang-2
            both = (1.0 + mu * t) * math.exp(-mu * t)
        else:
            both = (theta * math.exp(-mu * t) - mu * math.exp(-theta * t)) / (theta - mu)
        return served_at_once + p_wait * both

    target = 1.0 - q
    lo, hi = 0.0, hold_time_s
    while tail(hi) > target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if tail(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def _fraction(percentile: float) -> float:
    p = float(percentile)
    if not 0.0 < p < 100.0:
        raise ValueError(f"percentile must be strictly between 0 and 100, got {percentile!r}")
    return p / 100.0


@dataclass(frozen=True)
class PoolRecommendation:
    """What ``recommend_pool`` advises, with the numbers behind it.

    Attributes:
        pool_size: Connections to keep (``pool_size``): enough for the measured load.
        max_overflow: Extra connections for peaks (``max_overflow``): with them the pool
            meets the target at the measured load plus the headroom.
        throughput_per_s: The measured throughput the advice is for.
        hold_time_s: The measured mean hold time.
        peak_throughput_per_s: ``throughput_per_s * (1 + headroom)``.
        connections_in_use: Mean connections in use at the measured load (Little's law).
        utilisation: Share of ``pool_size`` in use on average at the measured load.
        probability_of_waiting: Share of requests that wait at all, at the measured load
            with ``pool_size`` connections (Erlang C).
        mean_wait_s: Mean checkout wait then, in seconds.
        wait_s: The bounded statistic of the wait then (the ``percentile``, or the mean
            when ``percentile`` is ``None``), in seconds.
        peak_wait_s: The same statistic at the peak load with all
            ``pool_size + max_overflow`` connections.
        target_wait_s: The bound asked for, in seconds.
        percentile: Which percentile of the wait ``target_wait_s`` bounds (``None``: the
            mean).
        explanation: The reasoning in a few plain sentences.
    """

    pool_size: int
    max_overflow: int
    throughput_per_s: float
    hold_time_s: float
    peak_throughput_per_s: float
    connections_in_use: float
    utilisation: float
    probability_of_waiting: float
    mean_wait_s: float
    wait_s: float
    peak_wait_s: float
    target_wait_s: float
    percentile: float | None
    explanation: str

    @property
    def max_connections(self) -> int:
        """``pool_size + max_overflow``: what this process may hold at most."""
        return self.pool_size + self.max_overflow


def _wait_statistic(connections: int, throughput: float, hold: float,
                    percentile: float | None) -> float:
    if throughput == 0:
        return 0.0
    if percentile is None:
        return mean_queue_wait(connections, throughput, hold)
    return queue_wait_percentile(connections, throughput, hold, percentile)


def _smallest_pool(throughput: float, hold: float, target: float,
                   percentile: float | None) -> int:
    c = max(1, math.floor(throughput * hold) + 1)   # the fewest that can keep up
    while _wait_statistic(c, throughput, hold, percentile) > target:
        c += 1
        if c > MAX_POOL:
            raise ValueError(f"no pool of up to {MAX_POOL} connections meets the target")
    return c


def recommend_pool(throughput_per_s: float, hold_time_s: float, *,
                   target_wait_s: float | None = None, percentile: float | None = 99.0,
                   headroom: float = 0.25) -> PoolRecommendation:
    """Recommend ``pool_size`` and ``max_overflow`` for a measured load (M/M/c model).

    ``pool_size`` is the smallest pool whose checkout wait meets the target at the
    measured throughput; ``pool_size + max_overflow`` the smallest that meets it at the
    throughput plus ``headroom``. Measure both inputs on your own service: throughput
    as checkouts per second at a busy time, the hold time as the mean time from checkout
    to return (or, by Little's law, the mean connections in use divided by the
    throughput).

    The model assumes random arrivals and exponential hold times; steadier hold times
    wait less, so the advice errs on the safe side for them. Check the sum over all
    processes against the server's ``max_connections``.

    Args:
        throughput_per_s: Checkouts per second, >= 0.
        hold_time_s: Mean time a request holds its connection, in seconds, > 0.
        target_wait_s: The longest acceptable checkout wait at ``percentile`` (default:
            one hold time), in seconds, >= 0.
        percentile: Which percentile of the wait to bound (99 for p99); ``None`` bounds
            the mean wait instead.
        headroom: How far above the measured throughput peaks go, as a fraction
            (0.25 for 25 %); the overflow covers it.

    Returns:
        A ``PoolRecommendation`` with the sizes, the predicted waits and an explanation.

    Raises:
        ValueError: On a negative throughput or headroom, a hold time <= 0, a percentile
            outside (0, 100), or a target no pool of up to ``MAX_POOL`` can meet.

    Example:
        ```python
        rec = recommend_pool(150, 0.020, target_wait_s=0.020)   # p99 wait <= 20 ms
        rec.pool_size, rec.utilisation   # (6, 0.5): 3 connections in use of 6
        ```
    """
    throughput = _positive("throughput_per_s", throughput_per_s, allow_zero=True)
    hold = _positive("hold_time_s", hold_time_s)
    target = hold if target_wait_s is None else _positive("target_wait_s", target_wait_s,
                                                           allow_zero=True)
    room = _positive("headroom", headroom, allow_zero=True)
    if percentile is not None:
        _fraction(percentile)
    peak = throughput * (1.0 + room)

    size = _smallest_pool(throughput, hold, target, percentile)
    at_peak = _smallest_pool(peak, hold, target, percentile)
    overflow = max(0, at_peak - size)

    in_use = throughput * hold
    p_wait = erlang_c(size, in_use) if throughput > 0 else 0.0
    mean_wait = mean_queue_wait(size, throughput, hold) if throughput > 0 else 0.0
    wait = _wait_statistic(size, throughput, hold, percentile)
    peak_wait = _wait_statistic(size + overflow, peak, hold, percentile)
    what = "mean" if percentile is None else f"p{percentile:g}"
    explanation = (
        f"{throughput:g} checkouts/s x {hold * 1000:.3g} ms held = {in_use:.3g} connections "
        f"in use on average (Little's law). With pool_size={size} they are "
        f"{in_use / size:.0%} busy; {p_wait:.1%} of requests wait for a connection, "
        f"{mean_wait * 1000:.3g} ms on average, {what} {wait * 1000:.3g} ms "
        f"(target {target * 1000:.3g} ms, Erlang C).")
    if room > 0:
        explanation += (
            f" At {1 + room:.3g}x the load ({peak:.4g}/s) {size + overflow} connections keep "
            f"the {what} wait at {peak_wait * 1000:.3g} ms: max_overflow={overflow}.")
    return PoolRecommendation(
        pool_size=size, max_overflow=overflow, throughput_per_s=throughput,
        hold_time_s=hold, peak_throughput_per_s=peak, connections_in_use=in_use,
        utilisation=in_use / size, probability_of_waiting=p_wait, mean_wait_s=mean_wait,
        wait_s=wait, peak_wait_s=peak_wait, target_wait_s=target, percentile=percentile,
        explanation=explanation)
