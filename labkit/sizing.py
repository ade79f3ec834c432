"""Pool sizing: Little's law and Erlang C (the M/M/c queue), and the connection budget.

``recommend_pool(throughput_per_s, hold_time_s)`` advises ``pool_size`` and ``max_overflow``;
``check_connection_budget`` compares every process's pool with the server's
``max_connections``. The models and their limits: docs/concepts/engine-and-pool.md.

Throughout, ``connections`` is the pool size, ``throughput_per_s`` checkouts per second
(Poisson arrivals), ``hold_time_s`` the mean time one holds its connection in seconds
(exponential) and ``offered_load`` their product, in connections.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import LabkitError, translate_error

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .config import PoolProfile, Settings

__all__ = [
    "ConnectionBudget",
    "PoolRecommendation",
    "async_check_connection_budget",
    "check_connection_budget",
    "connections_in_use",
    "erlang_b",
    "erlang_c",
    "mean_queue_wait",
    "pool_max_connections",
    "queue_wait_percentile",
    "recommend_pool",
    "response_time_percentile",
    "wait_probability",
]

#: The largest pool ``recommend_pool`` considers before it gives up.
MAX_POOL = 10_000
logger = logging.getLogger("labkit")


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
    """Return ``throughput_per_s * hold_time_s``: the mean connections in use (Little's law).

    Raises:
        ValueError: On a negative or non-finite throughput, or a hold time <= 0.
    """
    return _offered_load(throughput_per_s, hold_time_s)


def erlang_b(connections: int, offered_load: float) -> float:
    """Return the Erlang B blocking probability (M/M/c/c) of ``connections`` servers under
    ``offered_load`` connections of work (throughput x hold time), between 0 and 1.

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
    """Return the Erlang C probability (M/M/c) that a request waits for a connection.

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
    """Return the mean checkout wait over all requests (M/M/c), in seconds.

    Raises:
        ValueError: On bad input, or when the pool can never keep up.
    """
    p_wait, rate = _queue_terms(connections, throughput_per_s, hold_time_s)
    return p_wait / rate


def wait_probability(connections: int, throughput_per_s: float, hold_time_s: float,
                     longer_than_s: float = 0.0) -> float:
    """Return the share of requests that wait longer than ``longer_than_s`` (M/M/c, FIFO);
    with 0, the Erlang C probability of waiting at all.

    Raises:
        ValueError: On bad input, or when the pool can never keep up.
    """
    t = _positive("longer_than_s", longer_than_s, allow_zero=True)
    p_wait, rate = _queue_terms(connections, throughput_per_s, hold_time_s)
    return p_wait * math.exp(-rate * t)


def queue_wait_percentile(connections: int, throughput_per_s: float, hold_time_s: float,
                          percentile: float = 99.0) -> float:
    """Return the checkout wait, in seconds, that ``percentile`` % of requests (0 < p < 100)
    do not exceed (M/M/c, FIFO); 0 when at least that share does not wait at all.

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
    """Return the time, in seconds, within which ``percentile`` % of requests have waited
    and held their connection (M/M/c, FIFO).

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

    ``connections_in_use``, ``utilisation`` (of ``pool_size``), ``probability_of_waiting``,
    ``mean_wait_s`` and ``wait_s`` (the ``percentile`` of the wait, or its mean when
    ``percentile`` is ``None``) are at the measured load with ``pool_size`` connections;
    ``peak_wait_s`` at ``peak_throughput_per_s`` (throughput × (1 + headroom)) with
    ``pool_size + max_overflow``. ``explanation``: the reasoning in plain sentences.
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

    ``pool_size`` is the smallest pool whose checkout wait meets the target at the measured
    throughput; ``pool_size + max_overflow`` the smallest that meets it with ``headroom``.

    Args:
        throughput_per_s: Checkouts per second at a busy time, >= 0.
        hold_time_s: Mean time from checkout to return, in seconds, > 0.
        target_wait_s: The longest acceptable wait at ``percentile``, in seconds (default:
            one hold time).
        percentile: Which percentile of the wait to bound (99: p99); ``None``: the mean.
        headroom: How far above the measured throughput peaks go (0.25: 25 %).

    Returns:
        A ``PoolRecommendation``: the sizes, the predicted waits and an explanation.

    Raises:
        ValueError: On a negative throughput or headroom, a hold time <= 0, a percentile
            outside (0, 100), or a target no pool of up to ``MAX_POOL`` can meet.
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


@dataclass(frozen=True)
class ConnectionBudget:
    """Connections the processes may open against what the server allows.

    ``needed`` is processes × (pool_size + max_overflow + 1 health probe), ``None`` for an
    unbounded pool; ``available`` is ``max_connections`` minus the reserved slots.
    """

    needed: int | None
    available: int
    processes: int
    per_process: int | None

    @property
    def ok(self) -> bool:
        """True when the processes cannot exceed what the server allows."""
        return self.needed is not None and self.needed <= self.available


def check_connection_budget(engine: Engine, settings: Settings) -> ConnectionBudget:
    """Compare ``settings.processes`` × ``settings.pool``'s worst case (pass the settings the
    engine was made with) with the server's ``max_connections``; log a warning when over.

    Uses one pooled connection briefly; raises a labkit error if the database cannot be asked.
    """
    try:
        with engine.connect() as conn:
            return _budget(conn, settings)
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=[engine.url.password]) from exc


async def async_check_connection_budget(engine: AsyncEngine,
                                        settings: Settings) -> ConnectionBudget:
    """Async twin of ``check_connection_budget``."""
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_budget, settings)
    except LabkitError:
        raise
    except Exception as exc:
        raise translate_error(exc, secrets=[engine.url.password]) from exc


def pool_max_connections(profile: PoolProfile) -> int | None:
    """Most connections a pool with ``profile`` opens at once (``None``: unbounded)."""
    if profile.poolclass != "queue" or profile.max_overflow == -1:
        return 1 if profile.poolclass == "static" else None
    return profile.pool_size + profile.max_overflow


def _budget(conn: Connection, settings: Settings) -> ConnectionBudget:
    available = conn.exec_driver_sql(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
        " - coalesce(current_setting('reserved_connections', true)::int, 0)").scalar_one()
    limit = pool_max_connections(settings.pool)
    per_process = None if limit is None else limit + 1
    budget = ConnectionBudget(
        needed=None if per_process is None else per_process * settings.processes,
        available=int(available), processes=settings.processes, per_process=per_process)
    if not budget.ok:
        logger.warning(
            "connection budget exceeded: %s process(es) x %s connections (pool_size + "
            "max_overflow + 1 probe) = %s, but the server allows %d (max_connections minus "
            "reserved slots); lower the pool or put PgBouncer in front",
            settings.processes, per_process or "unbounded", budget.needed or "unbounded",
            budget.available)
    return budget
