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
  ``max_client_conn`` and ``query_wait_timeout``;
- the **server**: ``max_connections`` less the reserved slots, a set-up cost per
  connection, and CPU-bound work served by a number of cores;
- **arrivals**: Poisson (``labkit.lab.arrivals.poisson_arrivals``), bursts, a daily curve;
  or closed-loop clients (``Sessions``);
- **faults**: a server restart, a failover behind a DNS name with a TTL, instance
  restarts, a rolling deploy, scaling to another number of instances;
- **retries**: none, a ``labkit.retry.RetryPolicy`` (``DEFAULT_RETRY``, ``STARTUP_RETRY``)
  with its own ±jitter or with full jitter, and a retry budget.

Each request is a few callbacks on SimPy's event queue (arrival, end of its hold), not a
process per worker: 600,000 requests take seconds. Times are in seconds.

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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import simpy

from labkit.errors import (ConnectionLostError, DatabaseError, DatabaseUnavailableError,
                           PoolTimeoutError, ProgrammingError)
from labkit.lab.arrivals import poisson_arrivals
from labkit.retry import STARTUP_RETRY, RetryPolicy
from labkit.sizing import ConnectionBudget

__all__ = ["Bouncer", "Calibration", "Failover", "Fleet", "FleetResult", "InstanceRestart",
           "KINDS", "Pool", "Retry", "RollingDeploy", "ScaleTo", "Server", "ServerRestart",
           "Sessions", "Workload", "connection_budget", "simulate"]

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


# -- the simulation ------------------------------------------------------------------------


class _Node:
    """A PostgreSQL server: slots, an epoch (a restart breaks every connection), cores."""
    __slots__ = ("name", "up", "read_only", "epoch", "conns", "usable", "cores", "busy",
                 "cpu_queue")

    def __init__(self, name: str, server: Server) -> None:
        self.name, self.up, self.read_only, self.epoch = name, True, False, 0
        self.conns, self.usable, self.cores, self.busy = 0, server.usable, server.cores, 0
        self.cpu_queue: deque[_Req] = deque()


class _Cpu:
    """Cores served first come, first served: ``use(seconds, then)``."""
    __slots__ = ("sim", "cores", "busy", "queue")

    def __init__(self, sim: _Sim, cores: int) -> None:
        self.sim, self.cores, self.busy = sim, cores, 0
        self.queue: deque[tuple[float, Callable[[], None]]] = deque()

    def use(self, seconds: float, then: Callable[[], None]) -> None:
        if self.busy < self.cores:
            self.busy += 1
            self.sim._after(seconds, lambda _e: self._done(then))
        else:
            self.queue.append((seconds, then))

    def _done(self, then: Callable[[], None]) -> None:
        if self.queue:
            seconds, nxt = self.queue.popleft()
            self.sim._after(seconds, lambda _e: self._done(nxt))
        else:
            self.busy -= 1
        then()


class _Conn:
    """An open connection: to a server node, or a client connection to PgBouncer."""
    __slots__ = ("node", "epoch", "created", "server")

    def __init__(self, node: _Node | None, epoch: int, created: float) -> None:
        self.node, self.epoch, self.created = node, epoch, created
        self.server: _Conn | None = None   # a session-mode client's server connection


class _Req:
    __slots__ = ("proc", "t0", "start", "attempt", "conn", "sconn", "write", "hold",
                 "waiting", "client")

    def __init__(self, proc: _Proc, t0: float, write: bool, hold: float) -> None:
        self.proc, self.t0, self.start, self.attempt = proc, t0, t0, 1
        self.conn: _Conn | None = None
        self.sconn: _Conn | None = None
        self.write, self.hold, self.waiting = write, hold, False
        self.client: _Client | None = None


class _Client:
    __slots__ = ("left", "first_ok", "failed")

    def __init__(self, left: int) -> None:
        self.left, self.first_ok, self.failed = left, False, False


class _Proc:
    """One app process: its pool's state and its resolver's cached answer."""
    __slots__ = ("idle", "open", "waiters", "state", "dns_at", "tokens", "probe", "index",
                 "in_flight")

    def __init__(self, index: int) -> None:
        self.idle: deque[_Conn] = deque()
        self.open = 0
        self.waiters: deque[_Req] = deque()
        self.state = "starting"
        self.dns_at = -1.0
        self.tokens = 10.0
        self.probe: _Conn | None = None
        self.index = index
        self.in_flight = 0


def _call_with(fn: Callable[[_Proc], None], proc: _Proc) -> Callable[[Any], None]:
    return lambda _e: fn(proc)


def _in_flight(proc: _Proc) -> int:
    return proc.in_flight


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


class _Sim:
    """The fleet's state and its callbacks; one per ``simulate`` call."""

    def __init__(self, fleet: Fleet, duration_s: float, seed: int, retry: Retry | None,
                 startup: RetryPolicy | Retry, bin_s: float) -> None:
        self.fleet, self.pool, self.cal = fleet, fleet.pool, fleet.calibration
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        self.retry = retry
        self.startup = startup if isinstance(startup, Retry) else Retry(startup)
        self.r = FleetResult(fleet, duration_s, bin_s)
        self.inv_bin = 1.0 / bin_s
        self.nodes = [_Node("primary", fleet.server)]
        self.primary = self.nodes[0]       # what the DNS name points to, once caches expire
        self.dns_switch = -1.0             # when the DNS name moved; -1: never
        self.old: _Node | None = None
        self.procs: list[_Proc] = []
        self.serving: list[_Proc] = []
        self.bouncer = fleet.bouncer
        self.b_idle: deque[_Conn] = deque()
        self.b_open = 0
        self.b_clients = 0
        self.b_waiters: deque[tuple[Callable[[_Conn | None, str], None], list[bool]]] = deque()
        self.b_dns_at = -1.0
        self.limit = fleet.pool.pool_size + fleet.pool.max_overflow
        self.active_clients = 0
        self.clients_left = 0
        self.fleet_cpu = 0.0
        self.least_busy = False
        self.client_cpu: _Cpu | None = None
        self.client_cpu_s = 0.0
        self.think_s = 0.0
        self.sessions_hold = 0.0
        self.hold_of: Callable[[float], float] = lambda mean: mean

    # -- counting ----------------------------------------------------------------------
    def _bin(self) -> int:
        return min(self.r.bins - 1, int(self.env.now * self.inv_bin))

    def _note_conns(self) -> None:
        total = 0
        for node in self.nodes:
            total += node.conns
        b = self._bin()
        if total > self.r.server_connections[b]:
            self.r.server_connections[b] = total

    def _count_fail(self, kind: str) -> None:
        self.r.failed[kind][self._bin()] += 1
        self.r.first_failure_s.setdefault(kind, self.env.now)

    def _after(self, delay: float, fn: Callable[[Any], None], value: Any = None) -> None:
        ev = self.env.timeout(delay, value)
        ev.callbacks.append(fn)  # type: ignore[union-attr]

    # -- the server: connects -----------------------------------------------------------
    def _resolve(self, dns_at: float) -> _Node:
        """The node a resolver whose cache expires at ``dns_at`` connects to now."""
        if self.old is not None and self.env.now < max(self.dns_switch, dns_at):
            return self.old
        return self.primary

    def _server_connect(self, dns_at: float, done: Callable[[_Conn | None, str], None]) -> None:
        """Open a connection to the server the resolver points to; ``done(conn, kind)``."""
        node = self._resolve(dns_at)
        self.r.connect_attempts[self._bin()] += 1
        if not node.up:
            self.r.connect_failures[self._bin()] += 1
            self._after(self.cal.refused_s, lambda _e: done(None, "refused"))
            return
        if node.conns >= node.usable:
            self.r.connect_failures[self._bin()] += 1
            self.r.first_failure_s.setdefault("too_many", self.env.now)
            self._after(self.cal.connect_s, lambda _e: done(None, "too_many"))
            return
        node.conns += 1
        self._note_conns()
        epoch = node.epoch

        def opened(_e: Any) -> None:
            if node.epoch != epoch:           # restarted while the backend started
                done(None, "refused")
            else:
                done(_Conn(node, epoch, self.env.now), "")
        self._after(self.cal.connect_s, opened)

    def _close_server_conn(self, conn: _Conn) -> None:
        node = conn.node
        if node is not None and node.epoch == conn.epoch:
            node.conns -= 1

    def _stale(self, conn: _Conn) -> bool:
        node = conn.node
        return node is not None and (node.epoch != conn.epoch or not node.up)

    # -- PgBouncer -----------------------------------------------------------------------
    def _bouncer_acquire(self, done: Callable[[_Conn | None, str], None]) -> None:
        """A server connection from PgBouncer's pool (waits up to query_wait_timeout)."""
        while self.b_idle:
            sconn = self.b_idle.pop()
            if not self._stale(sconn):
                done(sconn, "")
                return
            self.b_open -= 1                  # PgBouncer drops a closed server connection
        assert self.bouncer is not None
        if self.b_open < self.bouncer.default_pool_size:
            self.b_open += 1

            def opened(sconn: _Conn | None, kind: str) -> None:
                if sconn is None:
                    self.b_open -= 1
                    self._bouncer_wake()
                done(sconn, kind)
            self._server_connect(self.b_dns_at, opened)
            return
        entry = (done, [True])
        self.b_waiters.append(entry)

        def timed_out(_e: Any) -> None:
            if entry[1][0]:
                entry[1][0] = False
                done(None, "query_wait")
        self._after(self.bouncer.query_wait_timeout, timed_out)

    def _bouncer_release(self, sconn: _Conn | None) -> None:
        if sconn is None:
            return
        if self._stale(sconn):
            self.b_open -= 1
            self._bouncer_wake()
            return
        while self.b_waiters:
            done, live = self.b_waiters.popleft()
            if live[0]:
                live[0] = False
                done(sconn, "")
                return
        self.b_idle.append(sconn)

    def _bouncer_wake(self) -> None:
        """A server slot came free: open one for the first live waiter."""
        while self.b_waiters:
            done, live = self.b_waiters.popleft()
            if live[0]:
                live[0] = False
                self._bouncer_acquire(done)
                return

    def _connect(self, proc: _Proc, done: Callable[[_Conn | None, str], None]) -> None:
        """Open one application connection: to the server, or to PgBouncer."""
        if self.bouncer is None:
            self._server_connect(proc.dns_at, done)
            return
        if self.b_clients >= self.bouncer.max_client_conn:
            self.r.connect_attempts[self._bin()] += 1
            self.r.connect_failures[self._bin()] += 1
            self._after(self.cal.bouncer_connect_s, lambda _e: done(None, "bouncer_full"))
            return
        self.b_clients += 1
        b = self._bin()
        if self.b_clients > self.r.bouncer_clients[b]:
            self.r.bouncer_clients[b] = self.b_clients
        client = _Conn(None, 0, self.env.now)
        if self.bouncer.mode == "transaction":
            self._after(self.cal.bouncer_connect_s, lambda _e: done(client, ""))
            return

        def got(sconn: _Conn | None, kind: str) -> None:
            if sconn is None:
                self.b_clients -= 1
                done(None, kind)
            else:
                client.server = sconn
                done(client, "")
        self._after(self.cal.bouncer_connect_s, lambda _e: self._bouncer_acquire(got))

    def _close(self, proc: _Proc | None, conn: _Conn, *, broken: bool = False) -> None:
        """Close an application connection (``broken``: its server side is gone)."""
        if proc is not None:
            proc.open -= 1
        if conn.epoch < 0:                    # a placeholder, never opened
            return
        if conn.node is not None:
            self._close_server_conn(conn)
            return
        self.b_clients -= 1
        if conn.server is not None:          # session mode: the server connection returns
            if broken:
                self.b_open -= 1
                self._bouncer_wake()
            else:
                self._bouncer_release(conn.server)
            conn.server = None

    def _app_stale(self, conn: _Conn) -> bool:
        if conn.node is not None:
            return self._stale(conn)
        return conn.server is not None and self._stale(conn.server)

    # -- requests ------------------------------------------------------------------------
    def arrive(self, write: bool, hold: float, client: _Client | None = None,
               proc: _Proc | None = None) -> None:
        b = self._bin()
        self.r.arrivals[b] += 1
        if proc is None:
            serving = self.serving
            if not serving:
                self._count_fail("no_instance")
                return
            if self.least_busy:
                proc = min(serving, key=_in_flight)
            else:
                proc = serving[int(self.rng.random() * len(serving))]
        req = _Req(proc, self.env.now, write, hold)
        req.client = client
        self.checkout(req)

    def checkout(self, req: _Req) -> None:
        proc = req.proc
        req.start = self.env.now
        if proc.state == "stopped":
            self.fail(req, "no_instance")
            return
        proc.in_flight += 1
        pool = self.pool
        while proc.idle:
            conn = proc.idle.popleft()
            if pool.recycle_s is not None and self.env.now - conn.created > pool.recycle_s:
                self._close(proc, conn)       # too old: closed, a new one opened below
                continue
            if pool.pre_ping:
                self._after(self.cal.ping_s, self._pinged, (req, conn))
            else:
                req.conn = conn
                self._run_now(req)
            return
        if proc.open < self.limit:
            proc.open += 1
            self._connect(proc, lambda conn, kind: self._connected(req, conn, kind))
            return
        req.waiting = True
        proc.waiters.append(req)
        self._after(pool.pool_timeout, self._pool_timeout, req)

    def _pinged(self, ev: Any) -> None:
        req, conn = ev._value
        if self._app_stale(conn):             # pre-ping found it broken: invalidate, reconnect
            self._close(req.proc, conn, broken=True)
            req.proc.open += 1
            self._connect(req.proc, lambda c, kind: self._connected(req, c, kind))
            return
        req.conn = conn
        self._run_now(req)

    def _connected(self, req: _Req, conn: _Conn | None, kind: str) -> None:
        proc = req.proc
        if conn is None:
            # QueuePool gives the overflow slot back; its waiters are not woken (they wait
            # for a returned connection or their pool_timeout).
            proc.open -= 1
            proc.in_flight -= 1
            self.fail(req, kind)
            return
        if proc.state == "stopped":
            self._close(proc, conn)
            proc.in_flight -= 1
            self.fail(req, "no_instance")
            return
        conn.created = self.env.now
        req.conn = conn
        self._run_now(req)

    def _pool_timeout(self, ev: Any) -> None:
        req = ev._value
        if req.waiting:
            req.waiting = False
            req.proc.in_flight -= 1
            self.fail(req, "pool_timeout")

    def _run_now(self, req: _Req) -> None:
        """The request has its connection: record the wait, then hold it."""
        # A checkout's own cost is counted into the wait and into the hold (hold_of).
        self.r.waits_s.append(self.env.now - req.start + self.cal.checkout_s)
        if self.bouncer is not None and self.bouncer.mode == "transaction":
            self._bouncer_acquire(lambda s, kind: self._with_server(req, s, kind))
            return
        self._query(req)

    def _with_server(self, req: _Req, sconn: _Conn | None, kind: str) -> None:
        if sconn is None:                      # PgBouncer reports the error and disconnects
            conn, req.conn = req.conn, None
            if conn is not None:
                self._close(req.proc, conn)
            req.proc.in_flight -= 1
            self._give_slot(req.proc)
            self.fail(req, kind)
            return
        req.sconn = sconn
        self._query(req)

    def _query(self, req: _Req) -> None:
        cpu = self.fleet_cpu
        if cpu > 0:
            conn = req.sconn or req.conn
            node = conn.server.node if conn is not None and conn.server is not None else (
                conn.node if conn is not None else None)
            if node is not None:
                if node.busy < node.cores:
                    node.busy += 1
                    self._after(cpu, self._cpu_done, (req, node))
                else:
                    node.cpu_queue.append(req)
                return
        if self.client_cpu is not None:
            # The client sends COMMIT only when its own (shared) CPU gets to it: its CPU
            # time is spent while the connection is held.
            client_cpu = self.client_cpu
            self._after(req.hold, lambda _e: client_cpu.use(self.client_cpu_s,
                                                            lambda: self._finish(req)))
            return
        self._after(req.hold, self._held, req)

    def _cpu_done(self, ev: Any) -> None:
        req, node = ev._value
        if node.cpu_queue:
            nxt = node.cpu_queue.popleft()
            self._after(self.fleet_cpu, self._cpu_done, (nxt, node))
        else:
            node.busy -= 1
        self._after(req.hold, self._held, req)

    def _held(self, ev: Any) -> None:
        self._finish(ev._value)

    def _finish(self, req: _Req) -> None:
        conn = req.conn
        assert conn is not None
        sconn = req.sconn
        server_side = sconn if sconn is not None else (
            conn.server if conn.server is not None else conn)
        if self._stale(server_side):
            if sconn is not None:              # transaction mode: PgBouncer closes the client
                self.b_open -= 1
                self._bouncer_wake()
                req.sconn = None
            self._close(req.proc, conn, broken=True)
            req.proc.in_flight -= 1
            self._give_slot(req.proc)
            self.fail(req, "lost")
            return
        node = server_side.node
        if req.write and node is not None and node.read_only:
            self._release(req, conn)
            self.fail(req, "read_only")
            return
        self._release(req, conn)
        self.succeed(req)

    def _release(self, req: _Req, conn: _Conn | None) -> None:
        """Return the connection: to the first waiter, else idle up to pool_size."""
        if req.sconn is not None:
            self._bouncer_release(req.sconn)
            req.sconn = None
        proc = req.proc
        proc.in_flight -= 1
        req.conn = None
        if conn is None:
            proc.open -= 1
            self._give_slot(proc)
            return
        if proc.state == "stopped":
            self._close(proc, conn)
            return
        waiters = proc.waiters
        while waiters:
            nxt = waiters.popleft()
            if nxt.waiting:
                nxt.waiting = False
                nxt.conn = conn
                self._run_now(nxt)
                return
        if len(proc.idle) >= self.pool.pool_size:
            self._close(proc, conn)            # overflow: closed on return
        else:
            proc.idle.append(conn)

    def _give_slot(self, proc: _Proc) -> None:
        """A connection closed: a waiter may open a new one in its place."""
        waiters = proc.waiters
        while waiters and proc.open < self.limit and proc.state != "stopped":
            nxt = waiters.popleft()
            if nxt.waiting:
                nxt.waiting = False
                proc.open += 1
                self._connect_for(nxt)

    def _connect_for(self, req: _Req) -> None:
        self._connect(req.proc, lambda c, kind: self._connected(req, c, kind))

    def succeed(self, req: _Req) -> None:
        b = self._bin()
        self.r.ok[b] += 1
        self.r.latencies_s.append(self.env.now - req.t0)
        if req.attempt > 1:
            self.r.last_retry_served_s = self.env.now
        if self.env.now > self.r.elapsed_s:
            self.r.elapsed_s = self.env.now
        if req.client is not None:
            self._client_next(req, True)

    def fail(self, req: _Req, kind: str) -> None:
        retry = self.retry
        if retry is not None and self._may_retry(req, kind, retry):
            self.r.retries[self._bin()] += 1
            delay = retry.delay(req.attempt, self.rng)
            req.attempt += 1
            self._after(delay, lambda _e: self.checkout(req))
            return
        self._count_fail(kind)
        if req.client is not None:
            self._client_next(req, False)

    def _may_retry(self, req: _Req, kind: str, retry: Retry) -> bool:
        policy = retry.policy
        if not issubclass(KINDS[kind], policy.retry_on) or req.attempt >= policy.max_attempts:
            return False
        if kind == "no_instance":
            return False
        if policy.deadline is not None and self.env.now - req.t0 >= policy.deadline:
            return False
        if retry.budget is not None:
            proc = req.proc
            if proc.tokens < 1.0:
                return False
            proc.tokens -= 1.0
        return True

    # -- closed-loop clients -----------------------------------------------------------
    def _client_next(self, req: _Req, ok: bool) -> None:
        client = req.client
        assert client is not None
        proc = req.proc
        if not ok:
            if client.first_ok:
                self.active_clients -= 1
            client.failed = True
            self._client_done(proc)
            return
        if not client.first_ok:
            client.first_ok = True
            self.active_clients += 1
            self.r.served_at_once_peak = max(self.r.served_at_once_peak, self.active_clients)
        client.left -= 1
        if client.left <= 0:
            self.active_clients -= 1
            self.r.clients_served += 1
            self._client_done(proc)
            return
        self._after(self.think_s, lambda _e: self._client_transaction(client, proc, 0.0))

    def _client_transaction(self, client: _Client, proc: _Proc, extra_cpu_s: float) -> None:
        """The client's next transaction, after its own CPU (shared cores) if modelled."""
        def go() -> None:
            self.arrive(True, self.hold_of(self.sessions_hold), client, proc)
        if self.client_cpu is None or extra_cpu_s <= 0:
            go()
        else:
            self.client_cpu.use(extra_cpu_s, go)

    def _client_done(self, proc: _Proc) -> None:
        self.stop_proc(proc)
        self.clients_left -= 1
        if self.clients_left == 0 and self.env.now > self.r.elapsed_s:
            self.r.elapsed_s = self.env.now

    # -- processes -----------------------------------------------------------------------
    def start_proc(self, *, boot_s: float | None = None,
                   on_serving: Callable[[_Proc], None] | None = None,
                   route: bool = True) -> _Proc:
        proc = _Proc(len(self.procs))
        proc.dns_at = self.env.now
        self.procs.append(proc)
        boot = self.fleet.start_s if boot_s is None else boot_s

        def ready() -> None:
            proc.state = "serving"
            if route:
                self.serving.append(proc)
            if on_serving is not None:
                on_serving(proc)

        def probe(attempt: int, started: float) -> None:
            if proc.state == "stopped":
                return

            def answered(conn: _Conn | None, kind: str) -> None:
                if proc.state == "stopped":
                    if conn is not None:
                        self._close(None, conn)
                    return
                if conn is not None:
                    proc.probe = conn
                    ready()
                    return
                p = self.startup.policy
                elapsed = self.env.now - started
                if attempt >= p.max_attempts or (p.deadline is not None and elapsed >= p.deadline):
                    proc.state = "stopped"    # gave up: the process exits
                    self._count_fail(kind)
                    return
                delay = self.startup.delay(attempt, self.rng)
                self._after(delay, lambda _e: probe(attempt + 1, started))
            self._connect(proc, answered)

        def booted(_e: Any) -> None:
            if self.pool.probe:
                probe(1, self.env.now)
            else:
                ready()
        if boot > 0:
            self._after(boot, booted)
        else:
            booted(None)
        return proc

    def stop_proc(self, proc: _Proc) -> None:
        """The process exits: it takes no more requests, its connections close."""
        if proc.state == "stopped":
            return
        if proc.state == "serving" and proc in self.serving:
            self.serving.remove(proc)
        proc.state = "stopped"
        while proc.idle:
            self._close(proc, proc.idle.pop())
        if proc.probe is not None:
            self._close(None, proc.probe)
            proc.probe = None
        while proc.waiters:
            req = proc.waiters.popleft()
            if req.waiting:
                req.waiting = False
                proc.in_flight -= 1
                self._count_fail("no_instance")

    def unroute(self, proc: _Proc) -> None:
        if proc in self.serving:
            self.serving.remove(proc)

    # -- faults --------------------------------------------------------------------------
    def restart_node(self, node: _Node, down_s: float) -> None:
        node.up = False
        node.epoch += 1
        node.conns = 0
        node.cpu_queue.clear()
        node.busy = 0

        def back(_e: Any) -> None:
            node.up = True
            self._reprobe()
        self._after(down_s, back)

    def _reprobe(self) -> None:
        """Each process's next readiness check (within ``probe_every_s``) finds its probe's
        connection broken and opens another."""
        every = self.pool.probe_every_s

        def check(proc: _Proc) -> None:
            probe = proc.probe
            if proc.state == "stopped" or probe is None or not self._app_stale(probe):
                return
            self._close(None, probe, broken=True)
            proc.probe = None

            def answered(conn: _Conn | None, _kind: str) -> None:
                if conn is None:
                    self._after(every, lambda _e: retry_later(proc))
                elif proc.state == "stopped":
                    self._close(None, conn)
                else:
                    proc.probe = conn
            self._connect(proc, answered)

        def retry_later(proc: _Proc) -> None:
            if proc.state != "stopped" and proc.probe is None:
                proc.probe = _Conn(self.primary, -1, self.env.now)   # stale: check() redoes it
                check(proc)
        for proc in self.procs:
            if proc.probe is not None:
                self._after(self.rng.uniform(0.0, every), _call_with(check, proc))

    def failover(self, f: Failover) -> None:
        old = self.primary
        new = _Node("standby", self.fleet.server)
        new.up = False
        self.nodes.append(new)
        self.old = old
        if f.old == "down":
            old.up = False
            old.epoch += 1
            old.conns = 0
        else:
            old.read_only = True
        self.primary = new
        self.dns_switch = self.env.now + f.promote_s

        def promoted(_e: Any) -> None:
            new.up = True
            self._reprobe()
        self._after(f.promote_s, promoted)
        for proc in self.procs:               # each resolver's cache expires at its own time
            proc.dns_at = self.dns_switch + self.rng.uniform(0.0, f.dns_ttl_s)
        self.b_dns_at = self.dns_switch + self.rng.uniform(0.0, f.dns_ttl_s)


def _arrival_times(w: Workload, duration_s: float, seed: int) -> list[float]:
    """Poisson arrivals (thinned along ``w.curve``) plus the bursts, sorted."""
    times: list[float] = []
    peak = w.rate_per_s * max([f for _, f in w.curve] or [1.0])
    if peak > 0:
        times = poisson_arrivals(peak, duration_s, seed=seed)
        if w.curve:
            rng = random.Random(seed + 1)
            times = [t for t in times if rng.random() * peak < w.rate_per_s * w.factor(t)]
    for at, count in w.bursts:
        times += [float(at)] * int(count)
    times.sort()
    return times


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
    sim = _Sim(fleet, duration_s, seed, retry, startup, bin_s)
    env = sim.env
    sessions = workload if isinstance(workload, Sessions) else None
    sim.fleet_cpu = workload.cpu_s if isinstance(workload, Workload) else 0.0
    sim.least_busy = isinstance(workload, Workload) and workload.route == "least-busy"
    hold_kind = workload.hold if isinstance(workload, Workload) else "constant"
    overhead = fleet.calibration.hold_overhead_s + fleet.calibration.checkout_s
    rng = sim.rng
    expo = rng.expovariate

    def hold_of(mean: float) -> float:
        if hold_kind == "constant" or mean <= 0:
            return mean + overhead
        return expo(1.0 / mean) + overhead
    sim.hold_of = hold_of

    if sessions is not None:
        sim.think_s, sim.sessions_hold = sessions.think_s, sessions.hold_s
        sim.clients_left = sessions.clients
        if sessions.client_cores > 0:
            sim.client_cpu = _Cpu(sim, sessions.client_cores)
            sim.client_cpu_s = sessions.client_cpu_s
        for _ in range(sessions.clients):
            sim.start_proc(route=False, on_serving=lambda p: sim._client_transaction(
                _Client(sessions.transactions), p, sessions.connect_cpu_s))
    else:
        w = workload
        assert isinstance(w, Workload)
        per_process = w.rate_per_s * (w.hold_s + overhead + w.cpu_s) / max(1, fleet.processes)
        opened = min(fleet.pool.pool_size, max(1, math.ceil(per_process + 3 * math.sqrt(per_process))))
        _start_fleet(sim, fleet.processes, opened if warm else 0)
        times = _arrival_times(w, duration_s, seed)
        writes, mean_hold = w.writes, w.hold_s
        arrive = sim.arrive
        random_ = rng.random

        def arrivals() -> Any:
            now = 0.0
            for t in times:
                if t > now:
                    yield env.timeout(t - now)
                    now = t
                arrive(random_() < writes, hold_of(mean_hold))
        env.process(arrivals())

    for fault in faults:
        env.process(_fault(sim, fault))

    def sampler() -> Any:
        for i in range(sim.r.bins):
            sim.r.serving[i] = len(sim.serving)
            b = sim.r.bouncer_clients
            b[i] = max(b[i], sim.b_clients)
            total = sum(n.conns for n in sim.nodes)
            c = sim.r.server_connections
            c[i] = max(c[i], total)
            yield env.timeout(bin_s)
    env.process(sampler())
    env.run(until=2 * duration_s)
    return sim.r


def _start_fleet(sim: _Sim, processes: int, warm: int) -> None:
    """Start ``processes``; ``warm`` > 0: serving, with the probe and ``warm`` pooled
    connections open, as if running for a while."""
    if not warm:
        for _ in range(processes):
            sim.start_proc()
        return
    pool, node = sim.pool, sim.primary
    for _ in range(processes):
        proc = _Proc(len(sim.procs))
        sim.procs.append(proc)
        want = warm + int(pool.probe)
        if sim.bouncer is not None:
            # Client connections to PgBouncer; in session mode each holds a server one
            # while PgBouncer's pool lasts (the others would wait: count them idle).
            for k in range(want):
                if sim.b_clients >= sim.bouncer.max_client_conn:
                    break
                sim.b_clients += 1
                conn = _Conn(None, 0, 0.0)
                if sim.bouncer.mode == "session" and sim.b_open < sim.bouncer.default_pool_size:
                    sim.b_open += 1
                    node.conns += 1
                    conn.server = _Conn(node, node.epoch, 0.0)
                if k == 0 and pool.probe:
                    proc.probe = conn
                else:
                    proc.idle.append(conn)
                    proc.open += 1
        else:
            for k in range(want):
                if node.conns >= node.usable:
                    break
                node.conns += 1
                conn = _Conn(node, node.epoch, 0.0)
                if k == 0 and pool.probe:
                    proc.probe = conn
                else:
                    proc.idle.append(conn)
                    proc.open += 1
        proc.state = "serving"
        sim.serving.append(proc)
    if sim.bouncer is not None and sim.bouncer.mode == "transaction":
        for _ in range(min(sim.bouncer.default_pool_size, node.usable - node.conns)):
            sim.b_open += 1
            node.conns += 1
            sim.b_idle.append(_Conn(node, node.epoch, 0.0))
    sim._note_conns()


def _fault(sim: _Sim, fault: Fault) -> Any:
    env = sim.env
    yield env.timeout(fault.at_s)
    if isinstance(fault, ServerRestart):
        down = sim.cal.restart_s if fault.down_s is None else fault.down_s
        sim.restart_node(sim.primary, down)
    elif isinstance(fault, Failover):
        sim.failover(fault)
    elif isinstance(fault, InstanceRestart):
        per = sim.fleet.workers
        live = [p for p in sim.procs if p.state == "serving"][: fault.instances * per]
        for proc in live:
            sim.stop_proc(proc)
        yield env.timeout(fault.down_s)
        for _ in live:
            sim.start_proc()
    elif isinstance(fault, ScaleTo):
        per = sim.fleet.workers
        live = [p for p in sim.procs if p.state != "stopped"]
        want = fault.instances * per
        if want > len(live):
            for _ in range(want - len(live)):
                sim.start_proc()
        else:
            for proc in live[want:]:
                sim.stop_proc(proc)
    elif isinstance(fault, RollingDeploy):
        per = sim.fleet.workers
        old = [p for p in sim.procs if p.state != "stopped"]
        batch = fault.batch * per
        for i in range(0, len(old), batch):
            group = old[i:i + batch]
            started = [0]

            def on_serving(_p: _Proc, group: list[_Proc] = group,
                           started: list[int] = started) -> None:
                started[0] += 1
                if started[0] == len(group):   # the batch serves: the old ones drain
                    for proc in group:
                        sim.unroute(proc)

                    def exit_(_e: Any, group: list[_Proc] = group) -> None:
                        for proc in group:
                            sim.stop_proc(proc)
                    sim._after(fault.drain_s, exit_)
            for _ in group:
                sim.start_proc(on_serving=on_serving)
            yield env.timeout(fault.every_s)


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

