"""Open-loop load: requests arrive at random (a Poisson process), whoever is waiting.

``labkit.lab.load`` runs a *closed* loop: a fixed number of workers, each asking again
as soon as its previous request is done, so the load adapts to how fast the pool serves
it. Real traffic does not wait for the previous user: requests arrive at their own
rate, independently. That is the arrival process of queueing models such as Erlang C
(``labkit.sizing``), and this module makes it: arrival times drawn from an exponential
distribution of gaps (seeded, so a run can be repeated), each request handed to an idle
thread of a large enough set, which checks out a connection, runs ``work`` and gives
it back. The result is a ``LoadResult`` like a closed-loop run's, so the same summaries
and charts apply.

Example:
    ```python
    result = run_poisson_load(engine, exponential_sleep(0.020), rate_per_s=100,
                              duration=4.0)
    statistics.fmean(result.waits_ms)   # compare with labkit.sizing.mean_queue_wait
    ```
"""

from __future__ import annotations

import math
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

from labkit.config import Settings
from labkit.engine import create_engine
from labkit.lab.load import LoadResult, OpRecord, timed_operation
from labkit.lab.sampler import Sampler
from labkit.lab.stats import percentile
from labkit.metrics import PoolMetrics

__all__ = ["SizeRun", "exponential_sleep", "hold_times_s", "mean_hold_s", "mean_in_use",
           "poisson_arrivals", "pool_size_sweep", "prefill", "run_poisson_load"]


def poisson_arrivals(rate_per_s: float, duration: float, *, seed: int = 0) -> list[float]:
    """Return arrival times (seconds from 0) of a Poisson process over ``duration``."""
    if rate_per_s <= 0 or duration <= 0:
        raise ValueError("rate_per_s and duration must be > 0")
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate_per_s)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate_per_s)
    return out


def exponential_sleep(mean_s: float, *, seed: int = 1) -> Callable[[Connection], Any]:
    """Return a ``work`` function holding its connection ``pg_sleep`` of a random time.

    The times are exponential with mean ``mean_s`` (the hold time Erlang C assumes);
    the server sleeps, so holding costs no CPU on either side.
    """
    if mean_s <= 0:
        raise ValueError("mean_s must be > 0")
    rng = random.Random(seed)
    lock = threading.Lock()
    statement = text("SELECT pg_sleep(:s)")

    def work(conn: Connection) -> None:
        with lock:
            seconds = rng.expovariate(1.0 / mean_s)
        conn.execute(statement, {"s": seconds})

    return work


def prefill(engine: Engine, connections: int) -> None:
    """Open ``connections`` pooled connections and return them, so a run starts warm."""
    held = [engine.connect() for _ in range(connections)]
    for conn in held:
        conn.close()


def hold_times_s(result: LoadResult) -> list[float]:
    """How long each successful operation held its connection (``released - got``), in s."""
    return [op.released - op.got for op in result.ok_ops
            if op.got is not None and op.released is not None]


def run_poisson_load(engine: Engine, work: Callable[[Connection], Any], *,
                     rate_per_s: float, duration: float, seed: int = 0,
                     label: str = "poisson", threads: int = 64) -> LoadResult:
    """Send requests at Poisson arrival times for ``duration`` seconds; record each.

    A dispatcher sleeps until each arrival and hands it to an idle thread; a request's
    ``start`` is when its thread asks the pool for a connection, so ``wait_ms`` is the
    checkout wait alone. Late dispatches (a busy CPU) are sent at once, keeping the
    rate. Failures are recorded, not raised.

    Args:
        engine: The engine whose pool the requests share.
        work: What one request does with its connection (in a transaction).
        rate_per_s: Mean arrivals per second.
        duration: Seconds during which requests arrive; the run then waits for the
            last ones to finish.
        seed: Seed of the arrival times (same seed, same arrivals).
        label: Name of the run.
        threads: Threads available to requests; more than can ever be in flight.

    Returns:
        The run's ``LoadResult`` (``elapsed`` includes the drain after ``duration``).
    """
    arrivals = poisson_arrivals(rate_per_s, duration, seed=seed)
    jobs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    ops: list[OpRecord] = []
    lock = threading.Lock()
    clock = time.perf_counter

    def worker(n: int) -> None:
        while jobs.get() is not None:
            rec = timed_operation(engine, work, n, t0)
            with lock:
                ops.append(rec)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    t0 = clock()
    for i, at in enumerate(arrivals):
        delay = t0 + at - clock()
        if delay > 0:
            time.sleep(delay)
        jobs.put(i)
    for _ in pool:
        jobs.put(None)
    for t in pool:
        t.join()
    return LoadResult(label, threads, clock() - t0, sorted(ops, key=lambda o: o.start), t0)


def mean_in_use(result: LoadResult, until: float | None = None) -> float:
    """Time-average of connections in use from 0 to ``until`` (default: the run's end)."""
    times, in_use, _ = result.concurrency()
    end = result.elapsed if until is None else until
    area = 0.0
    for (t, n), t_next in zip(zip(times, in_use), [*times[1:], math.inf]):
        lo, hi = min(t, end), min(t_next, end)
        area += n * (hi - lo)
    return area / end if end > 0 else math.nan


def mean_hold_s(result: LoadResult) -> float:
    """Mean ``released - got`` of the successful operations, in seconds."""
    return statistics.fmean(hold_times_s(result))


@dataclass
class SizeRun:
    """Every round of one pool size in ``pool_size_sweep``, pooled.

    Attributes:
        size: The pool size (``max_overflow=0``).
        runs: One ``LoadResult`` per round.
        seconds: Time during which requests arrived, over all rounds.
        in_use_samples: The pool's ``in use`` gauge, sampled every 10 ms during the runs.
    """

    size: int
    runs: list[LoadResult] = field(default_factory=list)
    seconds: float = 0.0
    in_use_samples: list[int] = field(default_factory=list)

    @property
    def waits_ms(self) -> list[float]:
        """Every request's checkout wait, in ms."""
        return [w for run in self.runs for w in run.waits_ms]

    @property
    def errors(self) -> int:
        return sum(sum(run.errors.values()) for run in self.runs)

    @property
    def throughput_per_s(self) -> float:
        """Requests per second that arrived (and were served)."""
        return sum(len(run.ops) for run in self.runs) / self.seconds

    @property
    def hold_time_s(self) -> float:
        """Mean time a request held its connection, in seconds."""
        return statistics.fmean([h for run in self.runs for h in hold_times_s(run)])

    @property
    def mean_wait_ms(self) -> float:
        return statistics.fmean(self.waits_ms)

    def wait_percentile_ms(self, q: float) -> float:
        """A percentile (0-100) of the checkout wait over all rounds, in ms."""
        return percentile(self.waits_ms, q)

    @property
    def mean_in_use(self) -> float:
        """Mean of the sampled ``in use`` gauge: connections lent out on average."""
        return statistics.fmean(self.in_use_samples)


def pool_size_sweep(settings: Settings, sizes: Sequence[int], *, rate_per_s: float,
                    hold_s: float, rounds: int = 2, duration: float = 3.0, seed: int = 0,
                    application_name: str = "labkit-poisson",
                    on_round: Callable[[int, int, float], None] | None = None,
                    ) -> dict[int, SizeRun]:
    """Run the same Poisson load on pools of each size, in interleaved rounds.

    Each round runs every size once, in a new random order, for ``duration`` seconds
    of arrivals; a burst of load from another process then spoils a slice of several
    sizes rather than the only run of one. Each slice gets its own seeds, different for
    arrivals and hold times (drawn from one seed they would be correlated). Pools start
    warm (``prefill``), without overflow or pre-ping, so that a checkout's wait is time
    spent queueing for a connection.

    Args:
        settings: Where to connect; its pool profile is the base of every pool.
        sizes: Pool sizes to compare.
        rate_per_s: Mean arrivals per second.
        hold_s: Mean of the exponential ``pg_sleep`` each request holds its connection
            for (the measured hold time is a little longer: round trips, Python).
        rounds: Slices per size.
        duration: Seconds of arrivals per slice.
        seed: Seed of the whole plan.
        application_name: Prefix of the engines' ``application_name``.
        on_round: Called after each round with (round, rounds, seconds it took).

    Returns:
        ``{size: SizeRun}`` in the order of ``sizes``.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    out = {size: SizeRun(size) for size in sizes}
    rng = random.Random(seed)
    slice_no = 0
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        order = list(sizes)
        rng.shuffle(order)
        for size in order:
            slice_no += 1
            engine = create_engine(
                settings.replace(application_name=f"{application_name}-{size}"),
                pool=settings.pool.replace(pool_size=size, max_overflow=0, pool_timeout=30,
                                           pool_pre_ping=False))
            try:
                prefill(engine, size)
                metrics = PoolMetrics.attach(engine)
                with Sampler(metrics, interval=0.01) as sampler:
                    run = run_poisson_load(
                        engine, exponential_sleep(hold_s, seed=2 * (seed * 1000 + slice_no) + 1),
                        rate_per_s=rate_per_s, duration=duration,
                        seed=2 * (seed * 1000 + slice_no), label=f"pool_size={size}")
                metrics.detach()
            finally:
                engine.dispose()
            out[size].runs.append(run)
            out[size].seconds += duration
            out[size].in_use_samples += [int(row["in_use"]) for row in sampler.samples]
        if on_round is not None:
            on_round(number, rounds, time.perf_counter() - started)
    return out
