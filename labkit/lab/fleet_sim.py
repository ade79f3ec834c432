"""The fleet simulator's engine: the state of every process, pool, PgBouncer and server,
and the callbacks that move requests through them on SimPy's event queue.

``labkit.lab.fleet`` holds what a user sets and reads (the fleet, the workload, the faults,
the retry policy, ``simulate`` and its ``FleetResult``); this module is how it runs. A
request is a handful of callbacks (its arrival, the end of its hold), not a SimPy process
per worker: that is what makes 600,000 requests a matter of seconds.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import simpy

from labkit.lab.arrivals import poisson_arrivals
from labkit.lab.fleet import (KINDS, Failover, Fault, Fleet, FleetResult, InstanceRestart, Retry,
                              RollingDeploy, ScaleTo, Server, ServerRestart, Sessions,
                              Workload)
from labkit.retry import RetryPolicy

__all__ = ["run"]


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


def run(fleet: Fleet, workload: Workload | Sessions, *, duration_s: float,
        faults: Sequence[Fault], retry: Retry | None, startup: RetryPolicy | Retry, seed: int,
        bin_s: float, warm: bool) -> FleetResult:
    """Run ``labkit.lab.fleet.simulate``'s simulation (its arguments, checked there)."""
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
