"""What the fleet simulator is fed and checked against: short real runs on this machine.

``calibrate`` measures the costs ``labkit.lab.fleet.Calibration`` holds (opening a
connection, a refused connect, a checkout, pre-ping, what a hold adds beyond the work,
the server's CPU per query, a restart's downtime) against the real PostgreSQL. The
``real_*`` functions run, small and short, the experiments of notebooks 02, 03, 07 and 09
that the simulator is validated against; each returns plain numbers to set beside the
simulator's prediction.

Example:
    ```python
    measured = calibrate(local_settings())
    fleet = Fleet(instances=200, calibration=measured.calibration)
    ```
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from labkit import TEST_POOL, Settings, create_engine, health_check
from labkit.errors import translate_error
from labkit.lab.arrivals import pool_size_sweep
from labkit.lab.fleet import Calibration
from labkit.lab.load import run_sync_load
from labkit.lab.server import LocalServer, free_port
from labkit.retry import STARTUP_RETRY, Attempt, RetryPolicy, retry

__all__ = ["Measured", "calibrate", "calibrate_restart", "real_bouncer_clients", "real_budget",
           "real_burst", "real_open_sweep", "real_restart"]


def _median_ms(samples: Sequence[float]) -> float:
    return 1000 * statistics.median(samples)


@dataclass(frozen=True)
class Measured:
    """A calibration and the samples (seconds) each of its numbers is the median of."""
    calibration: Calibration
    samples: dict[str, list[float]] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, float, float, float, int]]:
        """``(name, median ms, p10 ms, p90 ms, samples)`` per measured parameter."""
        out = []
        for name, values in self.samples.items():
            data = sorted(values)
            out.append((name, _median_ms(data), 1000 * data[len(data) // 10],
                        1000 * data[min(len(data) - 1, (9 * len(data)) // 10)], len(data)))
        return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def calibrate(settings: Settings, *, rounds: int = 40, server: LocalServer | None = None,
              cpu_rows: int = 200_000) -> Measured:
    """Measure this machine's costs against the real server; about a second (plus a
    restart of ``server`` when given: its downtime becomes ``restart_s``).

    ``cpu_query_s`` is the server time of ``SELECT sum(g) FROM generate_series(1,
    cpu_rows)`` less a ``SELECT 1`` round trip: one core serves 1 / cpu_query_s a second.
    """
    import psycopg2

    samples: dict[str, list[float]] = {}
    fresh = create_engine(settings.replace(application_name="labkit-fleet-calibrate"),
                          pool=TEST_POOL)
    try:
        conns = []
        samples["connect_s"] = []
        for _ in range(max(10, rounds // 2)):
            start = time.perf_counter()
            conns.append(fresh.connect())
            samples["connect_s"].append(time.perf_counter() - start)
            conns.pop().close()
    finally:
        fresh.dispose()
    port = free_port()
    samples["refused_s"] = []
    for _ in range(10):
        start = time.perf_counter()
        with contextlib.suppress(psycopg2.OperationalError):
            psycopg2.connect(host="127.0.0.1", port=port, user="nobody", connect_timeout=2)
        samples["refused_s"].append(time.perf_counter() - start)

    def pooled(pre_ping: bool) -> Engine:
        return create_engine(settings.replace(application_name="labkit-fleet-calibrate"),
                             pool=settings.pool.replace(pool_size=1, max_overflow=0,
                                                        pool_pre_ping=pre_ping))

    plain, pinged = pooled(False), pooled(True)
    try:
        plain.connect().close()
        pinged.connect().close()
        checkout, ping = [], []
        for _ in range(5 * rounds):          # alternate, so both see the same load
            start = time.perf_counter()
            conn = plain.connect()
            checkout.append(time.perf_counter() - start)
            conn.close()
            start = time.perf_counter()
            conn = pinged.connect()
            ping.append(time.perf_counter() - start)
            conn.close()
        samples["checkout_s"] = checkout
        base = statistics.median(checkout)
        samples["ping_s"] = [max(0.0, p - base) for p in ping]
        with plain.connect() as conn:
            def sleep_tx() -> None:
                with conn.begin():
                    conn.execute(text("SELECT pg_sleep(0.002)"))
            samples["hold_overhead_s"] = [max(0.0, _timed(sleep_tx) - 0.002)
                                          for _ in range(rounds)]
            one = statistics.median(_timed(lambda: conn.exec_driver_sql("SELECT 1").all())
                                    for _ in range(rounds))
            query = text("SELECT sum(g) FROM generate_series(1, :n) g")
            samples["cpu_query_s"] = [max(0.0, _timed(lambda: conn.execute(
                query, {"n": cpu_rows}).all()) - one) for _ in range(max(10, rounds // 2))]
    finally:
        plain.dispose()
        pinged.dispose()
    if server is not None:
        from labkit.lab.faults import restart
        samples["restart_s"] = [restart(server)]
    values = {name: statistics.median(v) for name, v in samples.items()}
    return Measured(Calibration(**values, source="measured by fleet_calibrate.calibrate"),
                    samples)


def calibrate_restart(server: LocalServer, *, rounds: int = 3, connections: int = 8,
                      every_s: float = 0.005) -> tuple[float, float]:
    """Restart ``server`` (fast) ``rounds`` times, each with ``connections`` idle
    connections open (a fast shutdown terminates them first), while a thread tries to
    connect every ``every_s``; return the medians of ``(delay_s, down_s)`` as a client sees
    them: from the restart's start to the first refused connect, and from there to the last
    one (plus one interval).

    ``pg_ctl restart`` itself takes longer than clients are refused: it waits for the
    shutdown's checkpoint before and polls for readiness after.
    """
    import psycopg2

    info = server.info()

    def connect() -> Any:
        return psycopg2.connect(host=info.host, port=info.port, user=info.user,
                                password=info.password, dbname=info.database,
                                connect_timeout=2)

    delays, downs = [], []
    for _ in range(rounds):
        idle = [connect() for _ in range(connections)]
        refused: list[float] = []
        stop = threading.Event()
        start = time.perf_counter()

        def poll() -> None:
            while not stop.is_set():
                at = time.perf_counter() - start
                try:
                    connect().close()
                except psycopg2.OperationalError:
                    refused.append(at)
                time.sleep(every_s)

        thread = threading.Thread(target=poll)
        thread.start()
        try:
            server.restart("fast")
            time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.close()
        if refused:
            delays.append(refused[0])
            downs.append(refused[-1] - refused[0] + every_s)
    if not downs:
        return 0.0, 0.0
    return statistics.median(delays), statistics.median(downs)


# -- the real side of the validation -------------------------------------------------------


def real_burst(settings: Settings, *, requests: int = 15, pool_size: int = 3,
               max_overflow: int = 2, pool_timeout: float = 0.5,
               hold_s: float = 0.3) -> dict[str, Any]:
    """Notebook 02 §1: ``requests`` at once on a small pool; who is served at once, who
    waits one hold, who gives up after ``pool_timeout``."""
    engine = create_engine(settings.replace(application_name="labkit-fleet-burst"),
                           pool=settings.pool.replace(pool_size=pool_size,
                                                      max_overflow=max_overflow,
                                                      pool_timeout=pool_timeout))
    try:
        run = run_sync_load(engine, lambda conn: conn.execute(
            text("SELECT pg_sleep(:s)"), {"s": hold_s}), workers=requests, count=1,
            label="burst", progress=False)
    finally:
        engine.dispose()
    served = [op for op in run.ops if op.ok]
    half = 1000 * hold_s / 2
    return {"at_once": sum(op.wait_ms < half for op in served),
            "queued": sum(op.wait_ms >= half for op in served),
            "gave_up": sum(op.error == "PoolTimeoutError" for op in run.ops),
            "peak": max(run.concurrency()[1]),
            "waits_ms": sorted(op.wait_ms for op in run.ops)}


def real_open_sweep(settings: Settings, sizes: Sequence[int], *, rate_per_s: float,
                    hold_s: float, rounds: int = 2, duration: float = 1.5,
                    seed: int = 0) -> dict[int, dict[str, float]]:
    """Notebooks 02/03: Poisson arrivals on pools of each size (``pool_size_sweep``);
    per size the measured rate, mean hold, mean wait, p99 wait and share that waited > 1 ms."""
    runs = pool_size_sweep(settings, sizes, rate_per_s=rate_per_s, hold_s=hold_s,
                           rounds=rounds, duration=duration, seed=seed,
                           application_name="labkit-fleet-open")
    return {k: {"rate_per_s": r.throughput_per_s, "hold_s": r.hold_time_s,
                "mean_wait_ms": r.mean_wait_ms, "p99_wait_ms": r.wait_percentile_ms(99),
                "waited_1ms": sum(w > 1.0 for w in r.waits_ms) / len(r.waits_ms),
                "mean_in_use": r.mean_in_use, "errors": r.errors}
            for k, r in runs.items()}


def server_connections(admin: Engine, role: str) -> int:
    """Client backends of ``role`` in ``pg_stat_activity``."""
    with admin.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE usename = :r"),
                                {"r": role}).scalar_one())


def real_budget(app_url: URL, admin: Engine, *, processes: int, pool_size: int,
                max_overflow: int, role: str = "app") -> list[dict[str, Any]]:
    """Notebook 09 §1 in one process: ``processes`` engines start one after another, each
    runs its health probe (which keeps a connection) and holds all its pool can open;
    after each, the server's count of ``role``'s connections."""
    engines: list[Engine] = []
    held: list[Any] = []
    rows: list[dict[str, Any]] = []
    try:
        for n in range(1, processes + 1):
            engine = create_engine(
                Settings(url=app_url, application_name=f"labkit-fleet-budget-{n}"),
                pool=TEST_POOL.replace(poolclass="queue", pool_size=pool_size,
                                       max_overflow=max_overflow, pool_timeout=2))
            engines.append(engine)
            labkit_logger = logging.getLogger("labkit")
            level = labkit_logger.level
            labkit_logger.setLevel(logging.ERROR)    # a refused probe is in the rows
            try:
                probe = health_check(engine, timeout=5)
            finally:
                labkit_logger.setLevel(level)
            got, error = 0, None
            try:
                for _ in range(pool_size + max_overflow):
                    held.append(engine.connect())
                    got += 1
            except Exception as exc:  # noqa: BLE001 - the refusal is the measurement
                error = type(translate_error(exc)).__name__
            rows.append({"processes": n, "probe": probe.ok, "held": got, "error": error,
                         "server": server_connections(admin, role)})
    finally:
        for conn in held:
            conn.close()
        for engine in engines:
            engine.dispose()
    return rows


def real_bouncer_clients(info: Any, app_url: URL, admin: Engine, *, mode: str,
                         clients: int = 200, transactions: int = 4, work_s: float = 0.01,
                         think_s: float = 0.05, pool_size: int = 10,
                         users: dict[str, str] | None = None,
                         role: str = "app") -> dict[str, Any]:
    """Notebook 09 §3: ``clients`` at once through PgBouncer, each connecting, running
    ``transactions`` of ``work_s`` with ``think_s`` between, then closing.

    Before the run, one client alone measures what the simulator needs: a connect's
    latency through PgBouncer (``connect_s``, median of 10) and the client process's CPU
    per connect and per transaction (``connect_cpu_s``, ``client_cpu_s``): the clients
    share one Python process, so one core.
    """
    import psycopg2

    from labkit.lab.pgbouncer import pgbouncer
    from labkit.network import pooler

    with pgbouncer(info, mode=mode, pool_size=pool_size,  # type: ignore[arg-type]
                   users=users) as bouncer:
        url = bouncer.info.url().set(username=app_url.username, password=app_url.password)
        connects = []
        for _ in range(10):
            start = time.perf_counter()
            psycopg2.connect(host=url.host, port=url.port, user=url.username,
                             password=url.password, dbname=url.database).close()
            connects.append(time.perf_counter() - start)
        settings = Settings(url=url, application_name="labkit-fleet-client", connect_timeout=30)
        stats: dict[str, Any] = {"transactions": 0, "served": 0, "now": 0, "peak": 0,
                                 "errors": 0}

        async def one_client(engine: Any) -> None:
            started = False
            try:
                async with engine.connect() as conn:
                    for n in range(transactions):
                        if n:
                            await asyncio.sleep(think_s)
                        async with conn.begin():
                            await conn.execute(text("SELECT pg_sleep(:s)"), {"s": work_s})
                        stats["transactions"] += 1
                        if not started:
                            started = True
                            stats["now"] += 1
                            stats["peak"] = max(stats["peak"], stats["now"])
                    stats["now"] -= 1
                    started = False
                stats["served"] += 1
            except Exception:  # noqa: BLE001 - counted
                if started:
                    stats["now"] -= 1
                stats["errors"] += 1

        costs: dict[str, float] = {}

        async def client_costs(engine: Any) -> None:
            cpu = time.process_time()
            for _ in range(10):
                async with engine.connect():
                    pass
            costs["connect_cpu_s"] = (time.process_time() - cpu) / 10
            async with engine.connect() as conn:
                cpu = time.process_time()
                for _ in range(40):
                    async with conn.begin():
                        await conn.execute(text("SELECT pg_sleep(0)"))
                costs["client_cpu_s"] = (time.process_time() - cpu) / 40

        async def all_clients() -> float:
            engine = pooler.create_async_engine(settings, pool=TEST_POOL)
            await client_costs(engine)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                await asyncio.gather(*(one_client(engine) for _ in range(clients)))
            finally:
                elapsed = time.perf_counter() - start
                costs["run_cpu_s"] = time.process_time() - cpu
                await engine.dispose()
            return elapsed

        stop, peak = threading.Event(), [0]

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    peak[0] = max(peak[0], server_connections(admin, role))
                time.sleep(0.05)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            # In a thread of its own: a notebook's kernel already runs an event loop here.
            with concurrent.futures.ThreadPoolExecutor(1) as runner:
                elapsed = runner.submit(asyncio.run, all_clients()).result()
        finally:
            stop.set()
            sampler.join()
    return {"elapsed_s": elapsed, "throughput": stats["transactions"] / elapsed,
            "served": stats["served"], "served_at_once_peak": stats["peak"],
            "server_peak": peak[0], "errors": stats["errors"],
            "connect_s": statistics.median(connects), **costs}


def real_restart(server: LocalServer, settings: Settings, *, workers: int = 4,
                 rate_per_s: float = 40.0, duration: float = 4.0, restart_at: float = 1.0,
                 hold_s: float = 0.005, policy: RetryPolicy = STARTUP_RETRY,
                 seed: int = 0) -> dict[str, Any]:
    """A restart under a few workers reconnecting: ``workers`` engines (pool_size 2,
    pre-ping, as separate processes would have), Poisson requests at ``rate_per_s`` in
    all, each retried under ``policy``; the server restarts (fast) at ``restart_at``.

    Returns the restart's downtime, every failed attempt's time (s from the start), the
    requests and how many succeeded, and when the server was back.
    """
    engines = [create_engine(settings.replace(application_name=f"labkit-fleet-restart-{k}"),
                             pool=settings.pool.replace(pool_size=2, max_overflow=0,
                                                        pool_pre_ping=True, pool_timeout=10))
               for k in range(workers)]
    rng = random.Random(seed)
    failed_at: list[float] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    statement = text("SELECT pg_sleep(:s)")

    def request(engine: Engine, sleep_s: float) -> bool:
        def on_retry(_attempt: Attempt) -> None:
            with lock:
                failed_at.append(time.perf_counter() - t0)

        def work() -> None:
            with engine.connect() as conn, conn.begin():
                conn.execute(statement, {"s": sleep_s})
        try:
            retry(work, policy=policy, on_retry=on_retry)
            return True
        except Exception:  # noqa: BLE001 - counted as not served
            return False

    times = []
    t = rng.expovariate(rate_per_s)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    for engine in engines:
        engine.connect().close()
    results: list[concurrent.futures.Future[bool]] = []
    down: dict[str, float] = {}

    def restarter() -> None:
        time.sleep(max(0.0, t0 + restart_at - time.perf_counter()))
        down["at"] = time.perf_counter() - t0
        server.restart("fast")
        down["up"] = time.perf_counter() - t0

    thread = threading.Thread(target=restarter)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=96) as pool:
            thread.start()
            for i, at in enumerate(times):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                results.append(pool.submit(request, engines[i % workers],
                                           rng.expovariate(1 / hold_s)))
            thread.join()
            served = sum(f.result() for f in results)
    finally:
        for engine in engines:
            engine.dispose()
    return {"restart_at": down["at"], "up_at": down["up"], "down_s": down["up"] - down["at"],
            "requests": len(times), "served": served, "failed_attempts": sorted(failed_at),
            "arrivals": times}
