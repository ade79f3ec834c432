"""Exercises of notebook 12 (the fleet simulator).

12.1: a fleet's pools against the connection budget of the learner's own server (its
``max_connections`` and reserved slots read from it), under bursts, with a p99 target.
12.2: the restart storm: a ``labkit.RetryPolicy`` that loses no request during a 3 s
restart, keeps the connection attempts down and lets the backlog drain soon after.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL

from labkit.errors import DatabaseUnavailableError
from labkit.lab.exercises import ExerciseFailed, exercise, require, scratch_engine
from labkit.lab.fleet import (Bouncer, Fleet, FleetResult, Pool, Retry, Server, ServerRestart,
                              Workload, simulate)
from labkit.retry import RetryPolicy

SEED = 12             # every draw of both exercises: the same settings, the same numbers


def _p99(values: Sequence[float]) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, max(0, math.ceil(0.99 * len(data)) - 1))] if data else math.nan


# What each of the simulator's failure kinds is called in a message.
_KIND_NAMES = {
    "refused": "connects refused while the server was down",
    "too_many": "connects refused by the server: too many clients (53300)",
    "lost": "connections lost under a request",
    "pool_timeout": "pool timeouts",
    "read_only": "writes on a read-only server",
    "bouncer_full": "clients refused by PgBouncer: max_client_conn",
    "query_wait": "PgBouncer query_wait_timeout",
    "no_instance": "no instance serving",
}


def _failures(result: FleetResult) -> str:
    return ", ".join(f"{n} {_KIND_NAMES.get(kind, kind)}"
                     for kind, n in sorted(result.failures.items()))


# --- 12.1: the budget under a burst --------------------------------------------------------

INSTANCES, WORKERS = 12, 2       # 24 processes, each with its own pool and health probe
RATE = 2400                      # requests a second, Poisson, across the fleet
HOLD_S = 0.005                   # mean hold (exponential), seconds
BURST = 240                      # requests arriving at once, at each of BURSTS_AT_S
BURSTS_AT_S = (1.0, 2.0, 3.0)
DURATION_S = 4.0
P99_LIMIT_MS = 35.0              # the 99th percentile of the response time asked for


def _server_limits(url: URL) -> tuple[int, int, int]:
    """The learner's server: max_connections, superuser_reserved_connections and
    reserved_connections (0 before PostgreSQL 16)."""
    engine = scratch_engine(url, application_name="labkit-exercise-12-1", pool_size=1)
    try:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT current_setting('max_connections')::int,"
                " current_setting('superuser_reserved_connections')::int,"
                " coalesce(current_setting('reserved_connections', true)::int, 0)")).one()
    finally:
        engine.dispose()
    return int(row[0]), int(row[1]), int(row[2])


@exercise("12.1", title="A fleet's pools against your server's connection budget",
          hint="Every process may open pool_size + max_overflow connections, plus the one "
               "its health probe keeps, and a burst opens most of them: processes x (pool_size + "
               "max_overflow + 1) must fit in the usable slots. Cut the pools to that, but "
               "not below what a burst needs for the p99; or keep the pools and put a "
               "Bouncer (transaction mode) in front, with default_pool_size within the usable "
               "slots and max_client_conn above what the pools may open.")
def fleet_budget(namespace: Mapping[str, Any], url: URL) -> str:
    """Simulate 12 instances × 2 workers with the learner's ``POOL`` (and ``BOUNCER``)
    against the server's own usable slots, at 2,400 requests/s with bursts of 240.

    The slots are read from the learner's server: ``max_connections`` minus
    ``superuser_reserved_connections`` and ``reserved_connections``. Passes when no
    request fails (no connection refused, no pool timeout, no PgBouncer error) and the
    99th percentile of the response time (waits included) is at most 35 ms. Seeded:
    the same settings give the same numbers.
    """
    pool = require(namespace, "POOL", Pool, what="a labkit.lab.fleet.Pool")
    bouncer = require(namespace, "BOUNCER", lambda v: v is None or isinstance(v, Bouncer),
                      what="None or a labkit.lab.fleet.Bouncer")
    if not pool.probe:
        raise ExerciseFailed("POOL has probe=False: the service keeps labkit's health probe "
                             "(its readiness check), and its connection counts")
    max_connections, superuser_reserved, reserved = _server_limits(url)
    server = Server(max_connections=max_connections, reserved=superuser_reserved + reserved)
    usable = server.usable
    processes = INSTANCES * WORKERS
    per_process = pool.per_process
    slots = (f"your server: max_connections {max_connections} - "
             f"superuser_reserved_connections {superuser_reserved} - reserved_connections "
             f"{reserved} = {usable} usable")
    if bouncer is None:
        paper = (f"{processes} processes x ({pool.pool_size} + {pool.max_overflow} + 1 probe) "
                 f"= {processes * per_process} on paper")
    else:
        paper = (f"{processes} processes x ({pool.pool_size} + {pool.max_overflow} + 1 probe) "
                 f"= {processes * per_process} clients of PgBouncer (max_client_conn "
                 f"{bouncer.max_client_conn}), {bouncer.default_pool_size} server "
                 "connections")
    fleet = Fleet(instances=INSTANCES, workers=WORKERS, pool=pool, bouncer=bouncer,
                  server=server)
    workload = Workload(rate_per_s=RATE, hold_s=HOLD_S,
                        bursts=[(at, BURST) for at in BURSTS_AT_S])
    result = simulate(fleet, workload, duration_s=DURATION_S, seed=SEED, bin_s=0.5)
    p99_ms = 1000 * _p99(result.latencies_s)
    seen = (f"{paper}; {slots}; simulated: peak {result.peak_server_connections} server "
            f"connections, p99 response time {p99_ms:.1f} ms")
    if result.failures:
        raise ExerciseFailed(f"{sum(result.failures.values())} of {result.requests} requests "
                             f"failed ({_failures(result)}). {seen}")
    if not p99_ms <= P99_LIMIT_MS:
        raise ExerciseFailed(f"every request was served, but the p99 response time is "
                             f"{p99_ms:.1f} ms, over {P99_LIMIT_MS:g} ms: the bursts queue "
                             f"for too few connections. {seen}")
    return f"{result.requests} requests, none failed. {seen}"


# --- 12.2: the restart storm --------------------------------------------------------------

STORM_INSTANCES, STORM_WORKERS = 50, 2
STORM_RATE = 500                 # requests a second, Poisson, across the fleet
DOWN_AT_S, DOWN_S = 1.0, 3.0     # the server restarts at 1 s and is back at 4 s
STORM_DURATION_S = 8.0
STORM_BIN_S = 0.25
ATTEMPTS_LIMIT = 3 * STORM_RATE  # connection attempts per second, at the busiest bin
BACKLOG_LIMIT_S = 2.5            # the last retried request served at most this after
MAX_RETRIES_IN_OUTAGE = 150      # beyond this the simulation would run for minutes


def _retries_within(policy: RetryPolicy, seconds: float) -> int:
    """Retries of one request that keeps failing for ``seconds`` (jitter left out)."""
    delay, elapsed, n = min(policy.max_delay, policy.initial_delay), 0.0, 0
    while n < policy.max_attempts - 1 and n <= MAX_RETRIES_IN_OUTAGE:
        elapsed += delay
        if elapsed > seconds or (policy.deadline is not None and elapsed > policy.deadline):
            break
        n += 1
        delay = min(policy.max_delay, delay * policy.multiplier)
    return n


@exercise("12.2", title="The restart storm: a retry policy for a fleet",
          hint="A request waiting for the server tries once per delay, so the attempts per "
               "second are the waiting requests (500 for each second of the outage) over "
               "the current delay: the short first delays cost the most. Start the backoff "
               "near a second, cap max_delay at what the recovery may take, retry "
               "DatabaseUnavailableError (TransientError does), and give the policy enough "
               "attempts and deadline to outlast a 3 s restart.")
def restart_storm(namespace: Mapping[str, Any], url: URL) -> str:
    """Simulate a 3 s server restart under 50 instances × 2 workers at 500 requests/s,
    each request retried under the learner's ``POLICY`` (a ``labkit.RetryPolicy``).

    Passes when no request is lost, the connection attempts stay at most 1,500 a second
    (three times the arrivals; busiest 0.25 s) and the last retried request is served at
    most 2.5 s after the server is back. Seeded: the same policy gives the same numbers.
    """
    policy = require(namespace, "POLICY", RetryPolicy, what="a labkit.RetryPolicy")
    retries = _retries_within(policy, DOWN_S)
    if retries > MAX_RETRIES_IN_OUTAGE:
        raise ExerciseFailed(
            f"each waiting request would retry more than {MAX_RETRIES_IN_OUTAGE} times in a "
            f"{DOWN_S:g} s restart (first delays {policy.initial_delay:g} s, x"
            f"{policy.multiplier:g}): with {STORM_RATE * DOWN_S:.0f} requests waiting by the "
            "end that is tens of thousands of connection attempts a second")
    fleet = Fleet(instances=STORM_INSTANCES, workers=STORM_WORKERS,
                  pool=Pool(pool_size=5, max_overflow=5, pre_ping=True),
                  server=Server(max_connections=2000))
    result = simulate(fleet, Workload(rate_per_s=STORM_RATE, hold_s=0.005),
                      duration_s=STORM_DURATION_S, bin_s=STORM_BIN_S, seed=SEED,
                      faults=[ServerRestart(at_s=DOWN_AT_S, down_s=DOWN_S)],
                      retry=Retry(policy))
    peak = max(result.connect_attempts_per_s())
    backlog = result.backlog_s(DOWN_AT_S + DOWN_S)
    lost = sum(result.failures.values())
    seen = (f"{result.requests} requests; {sum(result.connect_attempts)} connection attempts, "
            f"at most {peak:.0f} a second (limit {ATTEMPTS_LIMIT}); the last retried "
            f"request served {backlog:.2f} s after the server was back (limit "
            f"{BACKLOG_LIMIT_S:g} s)")
    problems = []
    if lost:
        why = ("DatabaseUnavailableError is not in retry_on" if not
               issubclass(DatabaseUnavailableError, policy.retry_on) else
               "the attempts or the deadline ran out before the server was back")
        problems.append(f"{lost} requests lost ({_failures(result)}: {why})")
    if peak > ATTEMPTS_LIMIT:
        problems.append(f"{peak:.0f} connection attempts a second at the busiest, over "
                        f"{ATTEMPTS_LIMIT} (three times the {STORM_RATE} requests a second "
                        "arriving)")
    if backlog > BACKLOG_LIMIT_S:
        problems.append(f"the backlog drained {backlog:.2f} s after the server was back")
    if problems:
        raise ExerciseFailed("; ".join(problems) + f". Seen: {seen}")
    delays = ", ".join(f"{d:.2f}" for d in itertools.islice(policy.delays(), 5))
    return f"no request lost; {seen}. The policy's first delays (s): {delays}"
