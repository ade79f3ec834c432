"""The fleet simulator: many app instances, their pools, PgBouncer and the server, in SimPy.

One machine runs a handful of processes; the incidents people write up happen with
hundreds. This module models the fleet with the same rules the lab measures on one
machine, so that its predictions can be checked where a real run exists
(``labkit.lab.fleet_calibrate``) and trusted a little beyond:

- **instances × workers** processes, each with a pool following ``QueuePool``'s rules:
  ``pool_size`` connections kept, ``max_overflow`` more opened under load and closed on
  return, a checkout waits at most ``pool_timeout`` (then ``PoolTimeoutError``),
  ``pre_ping`` tests an idle connection before lending it, ``recycle_s`` replaces old ones,
  and labkit's health probe keeps one connection of its own per process;
- optionally **PgBouncer** in session or transaction mode, with ``default_pool_size``,
  ``max_client_conn`` and ``query_wait_timeout`` (a failed server login fails the waiting
  client at once: PgBouncer's ``server_login_retry`` pause is not modelled);
- the **server**: ``max_connections`` less the reserved slots, a set-up cost per
  connection, and CPU-bound work served by a number of cores;
- **arrivals**: Poisson (``labkit.lab.arrivals.poisson_arrivals``), bursts, a daily curve;
  or closed-loop clients (``Sessions``);
- **faults**: a server restart, a failover behind a DNS name with a TTL, instance
  restarts, a rolling deploy, scaling to another number of instances;
- **retries**: none, a ``labkit.retry.RetryPolicy`` (``DEFAULT_RETRY``, ``STARTUP_RETRY``)
  with its own ±jitter or with full jitter, and a retry budget.

Each request is a few callbacks on SimPy's event queue (arrival, end of its hold), not a
process per worker: 600,000 requests take seconds. The engine is ``labkit.lab.fleet_sim``;
this module holds what a user sets and reads. Times are in seconds.

Example:
    ```python
    fleet = Fleet(instances=200, workers=4, pool=Pool(pool_size=5, max_overflow=5),
                  server=Server(max_connections=500))
    result = simulate(fleet, Workload(rate_per_s=2000, hold_s=0.005), duration_s=10,
                      faults=[ServerRestart(at_s=3, down_s=1)], retry=Retry(DEFAULT_RETRY))
    result.connect_attempts_per_s()
    ```
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from labkit.errors import (ConnectionLostError, DatabaseError, DatabaseUnavailableError,
                           PoolTimeoutError, ProgrammingError)
from labkit.retry import STARTUP_RETRY, RetryPolicy
from labkit.sizing import ConnectionBudget

__all__ = ["Bouncer", "Calibration", "Failover", "Fleet", "FleetResult", "InstanceRestart",
           "KINDS", "Pool", "Retry", "RollingDeploy", "ScaleTo", "Server", "ServerRestart",
           "Sessions", "Workload", "connection_budget", "erlang_terms", "simulate"]

#: Why a request or a connect failed, and the labkit error class each surfaces as.
KINDS: dict[str, type[DatabaseError]] = {
    "refused": DatabaseUnavailableError,        # server down or starting up (57P03, refused)
    "too_many": DatabaseUnavailableError,       # no slot left (53300)
    "lost": ConnectionLostError,                # a pooled connection broke (restart, failover)
    "pool_timeout": PoolTimeoutError,           # no pooled connection within pool_timeout
    "read_only": ProgrammingError,              # a write on a demoted primary (25006)
    "bouncer_full": DatabaseError,              # PgBouncer's max_client_conn (08P01)
    "query_wait": DatabaseError,                # PgBouncer's query_wait_timeout (08P01)
    "no_instance": DatabaseUnavailableError,    # no instance serving at all
}


def _check(name: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What this machine measured (``fleet_calibrate.calibrate``), in seconds.

    ``connect_s``: open a new connection; ``refused_s``: a connect to a server that is down;
    ``checkout_s``: lend an idle pooled connection; ``ping_s``: pre-ping's round trip;
    ``hold_overhead_s``: added to each hold (round trip, driver, Python);
    ``cpu_query_s``: server CPU per query of the reference statement (one core serves
    1 / cpu_query_s of them per second); ``restart_s``: a fast restart's downtime;
    ``bouncer_connect_s``: open a client connection to PgBouncer.
    """
    connect_s: float = 0.004
    refused_s: float = 0.0003
    checkout_s: float = 0.00005
    ping_s: float = 0.0002
    hold_overhead_s: float = 0.0003
    cpu_query_s: float = 0.001
    restart_s: float = 0.5
    bouncer_connect_s: float = 0.001
    source: str = "defaults (not measured)"

    def __post_init__(self) -> None:
        for name in ("connect_s", "refused_s", "checkout_s", "ping_s", "hold_overhead_s",
                     "cpu_query_s", "restart_s", "bouncer_connect_s"):
            value = getattr(self, name)
            _check(name, value >= 0 and math.isfinite(value), ">= 0 s", value)


@dataclass(frozen=True, kw_only=True)
class Pool:
    """One process's pool, with ``QueuePool``'s rules; ``probe``: labkit's health probe
    keeps one more connection per process, opened at start-up and, when broken, opened
    again at the next readiness check (every ``probe_every_s``)."""
    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout: float = 30.0
    pre_ping: bool = False
    recycle_s: float | None = None
    probe: bool = True
    probe_every_s: float = 10.0

    def __post_init__(self) -> None:
        _check("pool_size", self.pool_size >= 1, ">= 1", self.pool_size)
        _check("max_overflow", self.max_overflow >= 0, ">= 0", self.max_overflow)
        _check("pool_timeout", self.pool_timeout > 0, "> 0 s", self.pool_timeout)
        _check("recycle_s", self.recycle_s is None or self.recycle_s > 0, "> 0 s or None",
               self.recycle_s)

    @property
    def per_process(self) -> int:
        """Connections one process may hold at most: pool, overflow and probe."""
        return self.pool_size + self.max_overflow + int(self.probe)


@dataclass(frozen=True, kw_only=True)
class Bouncer:
    """PgBouncer in front of the server: its ``pool_mode`` and limits (one database/user)."""
    mode: Literal["session", "transaction"] = "transaction"
    default_pool_size: int = 20
    max_client_conn: int = 100
    query_wait_timeout: float = 120.0

    def __post_init__(self) -> None:
        _check("mode", self.mode in ("session", "transaction"), "session or transaction",
               self.mode)
        _check("default_pool_size", self.default_pool_size >= 1, ">= 1", self.default_pool_size)
        _check("max_client_conn", self.max_client_conn >= 1, ">= 1", self.max_client_conn)
        _check("query_wait_timeout", self.query_wait_timeout > 0, "> 0 s",
               self.query_wait_timeout)


@dataclass(frozen=True, kw_only=True)
class Server:
    """The PostgreSQL server: ``max_connections`` of which ``reserved`` are not the
    application's (superuser_reserved_connections + reserved_connections)."""
    max_connections: int = 100
    reserved: int = 3
    cores: int = 2

    def __post_init__(self) -> None:
        _check("max_connections", self.max_connections >= 1, ">= 1", self.max_connections)
        _check("reserved", 0 <= self.reserved < self.max_connections,
               ">= 0 and < max_connections", self.reserved)
        _check("cores", self.cores >= 1, ">= 1", self.cores)

    @property
    def usable(self) -> int:
        return self.max_connections - self.reserved


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """``instances`` × ``workers`` processes, each with its own ``pool``; optionally
    ``bouncer`` in front of ``server``; ``start_s``: a process's boot before its probe."""
    instances: int
    workers: int = 1
    pool: Pool = field(default_factory=Pool)
    server: Server = field(default_factory=Server)
    bouncer: Bouncer | None = None
    calibration: Calibration = field(default_factory=Calibration)
    start_s: float = 0.0

    def __post_init__(self) -> None:
        _check("instances", self.instances >= 0, ">= 0", self.instances)
        _check("workers", self.workers >= 1, ">= 1", self.workers)

    @property
    def processes(self) -> int:
        return self.instances * self.workers


def connection_budget(fleet: Fleet, instances: int | None = None) -> ConnectionBudget:
    """``labkit.sizing.ConnectionBudget`` of the fleet: processes × (pool_size +
    max_overflow + probe) against the usable slots (PgBouncer: its server pool instead)."""
    processes = (fleet.instances if instances is None else instances) * fleet.workers
    if fleet.bouncer is not None:
        return ConnectionBudget(needed=fleet.bouncer.default_pool_size,
                                available=fleet.server.usable, processes=processes,
                                per_process=fleet.pool.per_process)
    return ConnectionBudget(needed=processes * fleet.pool.per_process,
                            available=fleet.server.usable, processes=processes,
                            per_process=fleet.pool.per_process)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """Open arrivals: ``rate_per_s`` (Poisson, fleet-wide), each holding its connection
    ``hold_s`` on average (``hold``: exponential or constant) plus ``cpu_s`` of server CPU.

    ``bursts``: ``[(at_s, requests)]`` arriving at once; ``curve``: ``[(t_s, factor)]``,
    the rate's factor over time, linear between points (a daily curve compressed);
    ``writes``: the share of requests that write (fail on a read-only server);
    ``route``: the load balancer sends each request to a ``random`` serving process, or to
    the ``least-busy`` one (fewest requests in flight, the oldest first on a tie).
    """
    rate_per_s: float
    hold_s: float
    hold: Literal["exponential", "constant"] = "exponential"
    cpu_s: float = 0.0
    bursts: Sequence[tuple[float, int]] = ()
    curve: Sequence[tuple[float, float]] = ()
    writes: float = 1.0
    route: Literal["random", "least-busy"] = "random"

    def __post_init__(self) -> None:
        _check("route", self.route in ("random", "least-busy"), "random or least-busy",
               self.route)
        _check("rate_per_s", self.rate_per_s >= 0, ">= 0", self.rate_per_s)
        _check("hold_s", self.hold_s >= 0, ">= 0 s", self.hold_s)
        _check("hold", self.hold in ("exponential", "constant"), "exponential or constant",
               self.hold)

    def factor(self, t: float) -> float:
        """The curve's factor at ``t`` (1 without a curve)."""
        pts = self.curve
        if not pts:
            return 1.0
        if t <= pts[0][0]:
            return pts[0][1]
        for (t0, f0), (t1, f1) in zip(pts, pts[1:]):
            if t <= t1:
                return f0 + (f1 - f0) * (t - t0) / (t1 - t0) if t1 > t0 else f1
        return pts[-1][1]


@dataclass(frozen=True, kw_only=True)
class Sessions:
    """Closed-loop clients, all starting at 0: each opens a connection (its own process of
    pool_size 1), runs ``transactions`` of ``hold_s`` with ``think_s`` between, then closes.

    ``client_cores`` > 0: the clients share that many cores (one Python process: 1): a
    client's connect needs ``connect_cpu_s`` of them first, and each transaction
    ``client_cpu_s`` while it holds its connection (its COMMIT waits for the CPU).
    """
    clients: int
    transactions: int
    hold_s: float
    think_s: float = 0.0
    client_cores: int = 0
    client_cpu_s: float = 0.0
    connect_cpu_s: float = 0.0


@dataclass(frozen=True)
class ServerRestart:
    """The server goes down at ``at_s`` for ``down_s`` (default: the calibrated restart);
    every open connection breaks."""
    at_s: float
    down_s: float | None = None


@dataclass(frozen=True)
class Failover:
    """The primary fails at ``at_s``; a standby is primary ``promote_s`` later and the DNS
    name points to it then; each process's resolver caches the old answer for up to
    ``dns_ttl_s``. ``old``: the old primary is ``down``, or alive and ``read-only``."""
    at_s: float
    promote_s: float = 1.0
    dns_ttl_s: float = 30.0
    old: Literal["down", "read-only"] = "down"


@dataclass(frozen=True)
class InstanceRestart:
    """``instances`` instances stop at ``at_s`` (their connections close) and start again
    after ``down_s`` (start-up: boot, then the probe waits for the database)."""
    at_s: float
    instances: int
    down_s: float = 5.0


@dataclass(frozen=True)
class RollingDeploy:
    """From ``at_s``, every ``every_s`` a batch of ``batch`` new instances starts; once it
    serves, the batch it replaces stops taking requests and exits ``drain_s`` later."""
    at_s: float
    batch: int
    every_s: float = 5.0
    drain_s: float = 10.0


@dataclass(frozen=True)
class ScaleTo:
    """Autoscaling: at ``at_s`` the fleet grows (new instances start) or shrinks."""
    at_s: float
    instances: int


Fault = ServerRestart | Failover | InstanceRestart | RollingDeploy | ScaleTo


@dataclass(frozen=True)
class Retry:
    """How a request retries: ``policy``'s attempts, delays and ``retry_on``; ``jitter``:
    the policy's own ±fraction, or ``full`` (uniform between 0 and the delay);
    ``budget``: retries allowed per first attempt, per process (0.1: 10 %), or None."""
    policy: RetryPolicy
    jitter: Literal["policy", "full"] = "policy"
    budget: float | None = None

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Sleep after failed ``attempt`` (1-based), as ``RetryPolicy.delays`` draws it."""
        p = self.policy
        base = min(p.max_delay, p.initial_delay * p.multiplier ** (attempt - 1))
        if self.jitter == "full":
            return rng.uniform(0.0, base)
        return max(0.0, base * (1 + rng.uniform(-p.jitter, p.jitter)))


class FleetResult:
    """What a simulation counted, per ``bin_s`` bin and in total.

    Series (one value per bin, the last bin gathering the drain after ``duration_s``):
    ``arrivals``, ``ok``, ``failed`` (``{kind: [...]}``),
    ``connect_attempts``, ``connect_failures``, ``server_connections`` (the most open in
    the bin, every server node together), ``serving`` (processes taking requests).
    Totals: ``waits_s`` (every successful attempt's checkout wait, connect included),
    ``latencies_s`` (arrival to success, retries included), ``failures`` by kind.
    """

    def __init__(self, fleet: Fleet, duration_s: float, bin_s: float) -> None:
        self.fleet, self.duration_s, self.bin_s = fleet, duration_s, bin_s
        n = int(math.ceil(duration_s / bin_s)) + 1
        self.bins = n
        self.arrivals = array("l", bytes(8 * n))
        self.ok = array("l", bytes(8 * n))
        self.connect_attempts = array("l", bytes(8 * n))
        self.connect_failures = array("l", bytes(8 * n))
        self.server_connections = array("l", bytes(8 * n))
        self.bouncer_clients = array("l", bytes(8 * n))
        self.serving = array("l", bytes(8 * n))
        self.retries = array("l", bytes(8 * n))
        self.failed: dict[str, array[int]] = {k: array("l", bytes(8 * n)) for k in KINDS}
        self.waits_s = array("d")
        self.latencies_s = array("d")
        self.first_failure_s: dict[str, float] = {}
        self.elapsed_s = 0.0            # simulated time until the last request ended
        self.last_retry_served_s = -1.0  # when the last request that had failed was served
        self.served_at_once_peak = 0    # Sessions: clients between first and last commit
        self.clients_served = 0

    # -- summaries -------------------------------------------------------------------
    @property
    def times(self) -> list[float]:
        """Start of each bin within ``duration_s``, in seconds (the drain bin left out)."""
        return [i * self.bin_s for i in range(self.bins - 1)]

    @property
    def requests(self) -> int:
        return int(sum(self.arrivals))

    @property
    def failures(self) -> dict[str, int]:
        return {k: int(sum(v)) for k, v in self.failed.items() if sum(v)}

    @property
    def succeeded(self) -> int:
        return int(sum(self.ok))

    def per_s(self, series: Sequence[int]) -> list[float]:
        """A per-bin count as a rate per second, for the bins of ``times``."""
        return [v / self.bin_s for v in series[:self.bins - 1]]

    def connect_attempts_per_s(self) -> list[float]:
        return self.per_s(self.connect_attempts)

    def failed_per_s(self) -> list[float]:
        return [sum(v[i] for v in self.failed.values()) / self.bin_s
                for i in range(self.bins - 1)]

    @property
    def peak_server_connections(self) -> int:
        return max(self.server_connections)

    def wait_percentile_s(self, q: float) -> float:
        """A percentile (0-100) of the checkout waits, in seconds (nan: none)."""
        if not self.waits_s:
            return math.nan
        data = sorted(self.waits_s)
        k = min(len(data) - 1, max(0, math.ceil(q / 100 * len(data)) - 1))
        return data[k]

    @property
    def mean_wait_s(self) -> float:
        return sum(self.waits_s) / len(self.waits_s) if self.waits_s else math.nan

    def share_waited(self, longer_than_s: float) -> float:
        return (sum(1 for w in self.waits_s if w > longer_than_s) / len(self.waits_s)
                if self.waits_s else math.nan)

    def recovery_s(self, after_s: float) -> float | None:
        """Seconds from ``after_s`` (e.g. the server back up) to the end of the last bin in
        which a request failed or was retried, or a connect failed: when the fleet is clean
        again; 0 if nothing failed after ``after_s``; None if it was still failing at the end."""
        start = int(after_s / self.bin_s)
        last_bad = None
        for i in range(start, self.bins):
            if (self.connect_failures[i] or self.retries[i]
                    or any(v[i] for v in self.failed.values())):
                last_bad = i
        if last_bad is None:
            return 0.0
        if (last_bad + 1) * self.bin_s >= self.duration_s:
            return None
        return (last_bad + 1) * self.bin_s - after_s

    def backlog_s(self, after_s: float) -> float:
        """Seconds from ``after_s`` (the server back) until the last request that had failed
        and was retried was served (0: none was served after ``after_s``)."""
        return max(0.0, self.last_retry_served_s - after_s)

    def busiest(self, series: Sequence[int], start_s: float = 0.0) -> int:
        """The largest value of a per-bin ``series`` from ``start_s`` on (drain left out)."""
        return max(series[int(start_s / self.bin_s):self.bins - 1], default=0)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "ok": self.succeeded, "failures": self.failures,
                "connect_attempts": int(sum(self.connect_attempts)),
                "connect_failures": int(sum(self.connect_failures)),
                "peak_server_connections": self.peak_server_connections,
                "mean_wait_ms": 1000 * self.mean_wait_s,
                "p99_wait_ms": 1000 * self.wait_percentile_s(99)}

    def __repr__(self) -> str:
        s = self.summary()
        return (f"FleetResult({s['requests']} requests, {s['ok']} ok, failures "
                f"{s['failures']}, {s['connect_attempts']} connects, peak "
                f"{s['peak_server_connections']} server connections)")


def simulate(fleet: Fleet, workload: Workload | Sessions, *, duration_s: float,
             faults: Sequence[Fault] = (), retry: Retry | None = None,
             startup: RetryPolicy | Retry = STARTUP_RETRY, seed: int = 0, bin_s: float = 1.0,
             warm: bool = True) -> FleetResult:
    """Run the fleet for ``duration_s`` simulated seconds; return what it counted.

    Args:
        fleet: Instances, workers, pool, server, PgBouncer and the calibration.
        workload: Open arrivals (``Workload``) or closed-loop clients (``Sessions``: one
            process of ``pool_size=1`` each; ``fleet.instances`` is ignored).
        duration_s: Simulated seconds during which requests arrive; the run then lets the
            requests in flight finish (at most ``duration_s`` more).
        faults: What happens to the fleet and the server, each at its ``at_s``.
        retry: How a failed request retries (None: it fails at once).
        startup: The probe's policy at a process's start (labkit's ``STARTUP_RETRY``); a
            ``Retry`` to draw its delays with full jitter.
        seed: Seed of every random draw (same seed, same result).
        bin_s: Width of the result's time bins, in seconds.
        warm: Processes start serving with their probe and as many pooled connections as
            a busy minute opens (the mean in use per process plus three standard deviations,
            at most ``pool_size``): a fleet that has been running. False: all start empty.
    """
    _check("duration_s", duration_s > 0, "> 0 s", duration_s)
    _check("bin_s", bin_s > 0, "> 0 s", bin_s)
    from labkit.lab.fleet_sim import run   # the engine imports this module's types
    return run(fleet, workload, duration_s=duration_s, faults=faults, retry=retry,
               startup=startup, seed=seed, bin_s=bin_s, warm=warm)


def erlang_terms(fleet: Fleet, rate_per_s: float, hold_s: float) -> dict[str, float]:
    """Per process, what ``labkit.sizing`` predicts (M/M/c on pool_size + max_overflow)."""
    from labkit.sizing import connections_in_use, mean_queue_wait, queue_wait_percentile
    per = rate_per_s / max(1, fleet.processes)
    c = fleet.pool.pool_size + fleet.pool.max_overflow
    in_use = connections_in_use(per, hold_s)
    out = {"rate_per_process": per, "in_use_per_process": in_use,
           "fleet_in_use": in_use * fleet.processes}
    if in_use < c:
        out["mean_wait_s"] = mean_queue_wait(c, per, hold_s)
        out["p99_wait_s"] = queue_wait_percentile(c, per, hold_s, 99)
    else:
        out["mean_wait_s"] = out["p99_wait_s"] = math.inf
    return out
