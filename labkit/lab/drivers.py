"""Three drivers on the same work, and psycopg_pool beside SQLAlchemy's pool (notebook 11).

Section by section:

- ``driver_rounds``: a short read transaction (``SELECT`` one row by primary key) and a
  small write (``UPDATE`` one counter) through SQLAlchemy Core on psycopg2 and psycopg 3
  (threads) and on asyncpg and psycopg 3 (asyncio), in interleaved short slices
  (``labkit.lab.bench``'s rounds: every client in every round, in a random order), with
  this process's CPU time per transaction; ``labkit.lab.bench.summarize`` and
  ``paired_ratio`` read the slices.
- ``insert_rows``: N rows inserted one statement per row, with ``executemany``, in
  psycopg 3's pipeline mode, and with ``COPY``, on each driver, timed and with the round
  trips a ``FaultProxy`` counted.
- ``run_pool_load``: ``labkit.lab.load.run_sync_load``'s twin for a
  ``psycopg_pool.ConnectionPool``: the same ``LoadResult``, so the same request timeline.
- ``connections_over_time``, ``recording_connection_class``: what the server counts while
  a pool shrinks or ages, and when a pool tries to connect.
- ``pool_stats_side_by_side``: psycopg_pool's ``get_stats()`` beside labkit's
  ``PoolMetrics`` for the same load.
- ``external_pool_engine``: psycopg_pool behind SQLAlchemy (``NullPool`` + ``creator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import psycopg2
from psycopg_pool import ConnectionPool
from sqlalchemy import Engine, NullPool, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from labkit import (
    DEVELOPMENT_POOL,
    TEST_POOL,
    PoolProfile,
    Settings,
    create_async_engine,
    create_engine,
)
from labkit.lab.bench import (
    ROWS,
    TABLE,
    _cpu_fields,
    _run_coroutine,
    _settled_gc,
    _shuffled_rounds,
    record,
)
from labkit.lab.load import LoadResult, OpRecord
from labkit.lab.proxy import REQUESTS, FaultProxy
from labkit.lab.sampler import server_connections

__all__ = [
    "ASYNC_DRIVERS",
    "COUNTERS",
    "DRIVERS",
    "INSERT_METHODS",
    "SYNC_DRIVERS",
    "connections_over_time",
    "driver_engine",
    "driver_rounds",
    "external_pool_engine",
    "insert_rows",
    "libpq_conninfo",
    "pool_stats_side_by_side",
    "recording_connection_class",
    "run_driver_slice",
    "run_pool_load",
    "seed_drivers",
]

SYNC_DRIVERS = ["psycopg2 (threads)", "psycopg 3 (threads)"]
ASYNC_DRIVERS = ["asyncpg (asyncio)", "psycopg 3 (asyncio)"]
DRIVERS = [*SYNC_DRIVERS, *ASYNC_DRIVERS]
"""The clients of ``driver_rounds``: one driver each, all through SQLAlchemy Core."""

COUNTERS = "drivers_counters"
_READ = text(f"SELECT id, name FROM {TABLE} WHERE id = :id")
_WRITE = text(f"UPDATE {COUNTERS} SET hits = hits + 1 WHERE id = :id")


def seed_drivers(url: URL) -> None:
    """Create the tables of ``driver_rounds`` (idempotent): the benchmark's rows to read
    (``labkit.lab.bench.seed``) and as many counters to update."""
    from labkit.lab.bench import seed

    seed(url)
    engine = create_engine(Settings(url=url), pool=TEST_POOL)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE IF NOT EXISTS {COUNTERS} "
                              "(id int PRIMARY KEY, hits bigint NOT NULL DEFAULT 0)"))
            conn.execute(text(f"INSERT INTO {COUNTERS} (id) SELECT g FROM "
                              "generate_series(1, :n) g ON CONFLICT DO NOTHING"), {"n": ROWS})
    finally:
        engine.dispose()


def libpq_conninfo(url: URL, **extra: Any) -> str:
    """``url`` as a libpq connection string for psycopg and psycopg_pool (password kept)."""
    params: dict[str, Any] = {"host": url.host, "port": url.port, "user": url.username,
                              "password": url.password, "dbname": url.database, **extra}
    return psycopg.conninfo.make_conninfo(**{k: v for k, v in params.items() if v is not None})


def _driver_name(client: str) -> str | None:
    return "psycopg" if client.startswith("psycopg 3") else None


def driver_engine(settings: Settings, client: str, pool: PoolProfile) -> Engine:
    """A labkit engine for a sync client of ``SYNC_DRIVERS`` (psycopg2 or psycopg 3)."""
    return create_engine(settings.replace(driver=_driver_name(client)), pool=pool)


def _async_driver_engine(settings: Settings, client: str, pool: PoolProfile) -> AsyncEngine:
    return create_async_engine(settings.replace(driver=_driver_name(client)), pool=pool)


def _slice_pool(concurrency: int) -> PoolProfile:
    # One connection per worker and no pre-ping, the same for every driver: only the
    # driver (and SQLAlchemy's dialect for it) differs.
    return DEVELOPMENT_POOL.replace(pool_size=concurrency, max_overflow=0, pool_pre_ping=False)


def _sync_slice(engine: Engine, workload: str, concurrency: int,
                duration: float) -> tuple[list[float], float, float]:
    stmt = _READ if workload == "read" else _WRITE
    with contextlib.ExitStack() as stack:  # open every connection before the clock starts
        for _ in range(concurrency):
            stack.enter_context(engine.connect()).execute(text("SELECT 1"))
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        rnd, clock, out = random.Random(i), time.perf_counter, latencies[i]
        barrier.wait()
        while (t := clock()) < deadline[0]:
            with engine.begin() as conn:
                conn.execute(stmt, {"id": rnd.randint(1, ROWS)})
            out.append(clock() - t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline[0] = t0 + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    return ([x for xs in latencies for x in xs], time.perf_counter() - t0,
            time.process_time() - cpu0)


async def _async_slice(engine: AsyncEngine, workload: str, concurrency: int,
                       duration: float) -> tuple[list[float], float, float]:
    stmt = _READ if workload == "read" else _WRITE

    async def hold() -> None:  # overlapping checkouts open every connection
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(0.01)"))

    try:
        await asyncio.gather(*(hold() for _ in range(concurrency)))
        latencies: list[float] = []
        clock = time.perf_counter
        deadline = clock() + duration

        async def worker(i: int) -> None:
            rnd = random.Random(i)
            while (t := clock()) < deadline:
                async with engine.begin() as conn:
                    await conn.execute(stmt, {"id": rnd.randint(1, ROWS)})
                latencies.append(clock() - t)

        cpu0 = time.process_time()
        t0 = clock()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return latencies, clock() - t0, time.process_time() - cpu0
    finally:
        await engine.dispose()


def run_driver_slice(settings: Settings, client: str, workload: str, concurrency: int,
                     duration: float) -> dict[str, Any]:
    """Run one client of ``DRIVERS`` on ``workload`` (``"read"`` or ``"write"``) from
    ``concurrency`` workers for ``duration`` seconds, on a fresh engine.

    Returns:
        A ``labkit.lab.bench.record`` with ``workload``, ``cpu_us_per_tx`` (this process's
        CPU time per transaction, all threads) and ``tx_per_cpu_s`` added.
    """
    if workload not in ("read", "write"):
        raise ValueError(f"workload must be 'read' or 'write', got {workload!r}")
    pool = _slice_pool(concurrency)
    if client in SYNC_DRIVERS:
        engine = driver_engine(settings, client, pool)
        try:
            latencies, elapsed, cpu = _sync_slice(engine, workload, concurrency, duration)
        finally:
            engine.dispose()
    elif client in ASYNC_DRIVERS:
        latencies, elapsed, cpu = _run_coroutine(_async_slice(
            _async_driver_engine(settings, client, pool), workload, concurrency, duration))
    else:
        raise ValueError(f"unknown client {client!r}; choose from {DRIVERS}")
    return record(client, concurrency, latencies, elapsed, workload=workload,
                  **_cpu_fields(cpu, len(latencies)))


def driver_rounds(settings: Settings, *, clients: Sequence[str] = tuple(DRIVERS),
                  workloads: Sequence[str] = ("read", "write"),
                  concurrencies: Sequence[int] = (1, 8), rounds: int = 3,
                  duration: float = 0.1, seed: int = 0) -> list[dict[str, Any]]:
    """Run every (workload, concurrency, client) slice once per round, interleaved.

    ``labkit.lab.bench.interleaved_rounds``' plan: per round, the units (one workload
    at one concurrency: its clients back to back) in a random order and the clients
    within a unit too, a garbage collection before every slice, and an unrecorded
    warm-up round of half-length slices. The sync and the async pair of one unit run a
    fraction of a second apart, under nearly the same load from other processes.

    Returns:
        One record per slice (``run_driver_slice``) with ``round`` (1-based),
        ``position`` and ``started_s``; compare with ``bench.paired_ratio`` (give it
        one workload's slices) or ``bench.summarize``.
    """
    if rounds < 1 or duration <= 0:
        raise ValueError("rounds must be >= 1 and duration > 0")
    units = [[(client, w, n) for client in clients] for w in workloads for n in concurrencies]
    plan = _shuffled_rounds(units, rounds + 1, seed)
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with _settled_gc() as collect:
        for number, order in enumerate(plan):  # round 0: the warm-up
            for position, (client, workload, n) in enumerate(order):
                collect()
                started = time.perf_counter() - t0
                rec = run_driver_slice(settings, client, workload, n,
                                       duration if number else duration / 2)
                if number:
                    out.append({**rec, "round": number, "position": position,
                                "started_s": round(started, 3)})
    return out


# --- inserting N rows: one statement each, executemany, pipeline, COPY -----------------------

INSERT_METHODS = [
    "psycopg2: executemany", "psycopg2: COPY (copy_expert)",
    "psycopg 3: one execute per row", "psycopg 3: executemany", "psycopg 3: pipeline",
    "psycopg 3: COPY (cursor.copy)",
    "asyncpg: executemany", "asyncpg: COPY (copy_records_to_table)",
]
"""The ways ``insert_rows`` inserts rows: ``"driver: method"``."""

_INSERT_2 = "INSERT INTO {table} (id, name) VALUES (%s, %s)"


def _insert_psycopg2(url: URL, method: str, table: str,
                     rows: Sequence[tuple[int, str]]) -> Callable[[], None]:
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username,
                            password=url.password, dbname=url.database,
                            application_name="labkit-nb11-insert")

    def run() -> None:
        try:
            with conn.cursor() as cur:
                if method.endswith("executemany"):
                    cur.executemany(_INSERT_2.format(table=table), rows)
                else:
                    data = io.StringIO("".join(f"{i}\t{name}\n" for i, name in rows))
                    cur.copy_expert(f"COPY {table} (id, name) FROM STDIN", data)
            conn.commit()
        finally:
            conn.close()
    return run


def _insert_psycopg(url: URL, method: str, table: str,
                    rows: Sequence[tuple[int, str]]) -> Callable[[], None]:
    conn = psycopg.connect(libpq_conninfo(url, application_name="labkit-nb11-insert"))
    sql = _INSERT_2.format(table=table)

    def run() -> None:
        try:
            with conn.cursor() as cur:
                if method.endswith("one execute per row"):
                    for row in rows:
                        cur.execute(sql, row)
                elif method.endswith("executemany"):
                    cur.executemany(sql, rows)
                elif method.endswith("pipeline"):
                    with conn.pipeline():
                        for row in rows:
                            cur.execute(sql, row)
                else:
                    with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
            conn.commit()
        finally:
            conn.close()
    return run


async def _insert_asyncpg(url: URL, method: str, table: str,
                          rows: Sequence[tuple[int, str]], ready: Callable[[], None]) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username,
                                 password=url.password, database=url.database,
                                 server_settings={"application_name": "labkit-nb11-insert"})
    try:
        ready()
        async with conn.transaction():
            if method.endswith("executemany"):
                await conn.executemany(f"INSERT INTO {table} (id, name) VALUES ($1, $2)", rows)
            else:
                await conn.copy_records_to_table(table, records=rows, columns=["id", "name"])
    finally:
        await conn.close()


def insert_rows(url: URL, method: str, rows: int, *, proxy: FaultProxy | None = None,
                rtt: float = 0.0, table: str = "drivers_inserts") -> dict[str, Any]:
    """Insert ``rows`` rows in one transaction with ``method`` (one of ``INSERT_METHODS``).

    The table is created empty first. With ``proxy`` the driver connects through it,
    ``rtt`` seconds are added to every round trip while the rows go in, and the proxy
    counts the messages that wait for an answer (``Q``, ``Sync``): the round trips. The
    clock starts once the connection is open.

    Returns:
        ``{"method", "rows", "ms", "rows_per_s", "round_trips", "rtt_ms"}``
        (``round_trips`` is ``None`` without a proxy).
    """
    if method not in INSERT_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {INSERT_METHODS}")
    admin = psycopg.connect(libpq_conninfo(url), autocommit=True)
    try:
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (id int NOT NULL, name text NOT NULL)")
    finally:
        admin.close()
    data = [(i, f"row {i}") for i in range(1, rows + 1)]
    target = proxy.url(url) if proxy is not None else url
    latency = proxy.added_latency(rtt) if proxy is not None else contextlib.nullcontext()
    driver = method.split(":")[0]
    start = [0.0]
    if driver == "asyncpg":
        def begin() -> None:
            if proxy is not None:
                proxy.pop_stats()
            start[0] = time.perf_counter()
        with latency:
            _run_coroutine(_insert_asyncpg(target, method, table, data, begin))
            elapsed = time.perf_counter() - start[0]
    else:
        run = (_insert_psycopg2 if driver == "psycopg2" else _insert_psycopg)(
            target, method, table, data)
        if proxy is not None:
            proxy.pop_stats()
        with latency:
            t0 = time.perf_counter()
            run()
            elapsed = time.perf_counter() - t0
    # The connection's close is in the time: one message, no answer awaited.
    trips = proxy.pop_stats()[REQUESTS] if proxy is not None else None
    check = psycopg.connect(libpq_conninfo(url), autocommit=True)
    try:
        row = check.execute(f"SELECT count(*) FROM {table}").fetchone()
        check.execute(f"DROP TABLE {table}")
    finally:
        check.close()
    if row is None or row[0] != rows:
        raise RuntimeError(f"{method}: {row} rows stored, {rows} expected")
    return {"method": method, "rows": rows, "ms": round(elapsed * 1000.0, 3),
            "rows_per_s": round(rows / elapsed, 1), "round_trips": trips,
            "rtt_ms": round(rtt * 1000.0, 3)}


# --- psycopg_pool beside QueuePool -----------------------------------------------------------

def run_pool_load(pool: ConnectionPool[Any], work: Callable[[psycopg.Connection[Any]], Any], *,
                  workers: int, duration: float | None = None, count: int | None = None,
                  label: str = "psycopg_pool", timeout: float | None = None) -> LoadResult:
    """``labkit.lab.load.run_sync_load`` for a ``psycopg_pool.ConnectionPool``.

    Each operation asks the pool for a connection (``pool.connection(timeout)``), runs
    ``work`` in the transaction the pool's context manager commits, and gives it back.
    Failures are recorded with the exception's class name (``"PoolTimeout"``), not raised.

    Returns:
        The run's ``LoadResult``: the same records as a SQLAlchemy run, so the same
        charts (``charts.request_timeline``).
    """
    if (duration is None) == (count is None):
        raise ValueError("give exactly one of duration (seconds) or count (ops per worker)")
    ops: list[OpRecord] = []
    lock = threading.Lock()
    clock = time.perf_counter
    t0 = clock()
    deadline = t0 + duration if duration is not None else float("inf")

    def one(n: int) -> OpRecord:
        start = clock()
        got: float | None = None
        released: float | None = None
        try:
            with pool.connection(timeout) as conn:
                got = clock()
                try:
                    work(conn)
                finally:
                    released = clock()
            end, error = clock(), None
        except Exception as exc:  # noqa: BLE001 - recorded for the chart
            end, error = clock(), type(exc).__name__
        wait = (got if got is not None else end) - start
        return OpRecord(n, start - t0, end - t0, wait * 1000.0, error is None, error,
                        None if got is None else got - t0,
                        None if released is None else released - t0)

    def worker(n: int) -> None:
        done = 0
        while (count is None or done < count) and clock() < deadline:
            rec = one(n)
            with lock:
                ops.append(rec)
            done += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(label, workers, clock() - t0, sorted(ops, key=lambda o: o.start), t0)


def connections_over_time(observer: Engine, cases: Mapping[str, Callable[[], Any]], *,
                          seconds: float, every: float = 0.1
                          ) -> dict[str, tuple[list[float], list[int]]]:
    """Run each case's traffic (a function that returns when done) in its own thread and
    count each case's backends on the server every ``every`` seconds meanwhile.

    ``cases`` maps an ``application_name`` to its traffic; all start together.

    Returns:
        ``{application_name: (seconds since the start, backends counted)}``.
    """
    threads = {app: threading.Thread(target=fn, daemon=True) for app, fn in cases.items()}
    series: dict[str, tuple[list[float], list[int]]] = {app: ([], []) for app in cases}
    t0 = time.monotonic()
    for thread in threads.values():
        thread.start()
    while (now := time.monotonic() - t0) < seconds:
        for app in cases:
            series[app][0].append(round(now, 3))
            series[app][1].append(sum(server_connections(observer, app).values()))
        time.sleep(max(0.0, every - (time.monotonic() - t0 - now)))
    for thread in threads.values():
        thread.join()
    return series


def recording_connection_class(attempts: list[float], t0: float
                               ) -> type[psycopg.Connection[Any]]:
    """A ``psycopg.Connection`` class that notes the time of every connection attempt.

    Give it to ``ConnectionPool(connection_class=...)``: ``attempts`` receives the
    seconds since ``t0`` (``time.perf_counter()``) of each ``connect``, failed or not.
    """
    class RecordingConnection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            attempts.append(time.perf_counter() - t0)
            return super().connect(*args, **kwargs)

    return RecordingConnection


POOL_STATS_ROWS: list[tuple[str, str, str]] = [
    ("requests for a connection", "requests_num", "checkouts"),
    ("requests that had to wait", "requests_queued", ""),
    ("time spent waiting (ms, total)", "requests_wait_ms", "checkout_wait_ms_total"),
    ("requests that failed (timeout)", "requests_errors", "checkout_errors"),
    ("connections opened", "connections_num", "connects"),
    ("connections found broken", "connections_lost", "invalidations"),
    ("time connections were in use (ms)", "usage_ms", ""),
    ("connections open now (gauge)", "pool_size", "pool_size"),
    ("of which idle now (gauge)", "pool_available", "idle"),
]
"""Rows of ``pool_stats_side_by_side``: (meaning, get_stats() key, PoolMetrics key)."""


def pool_stats_side_by_side(stats: Mapping[str, int], snapshot: Mapping[str, Any]
                            ) -> list[tuple[str, str, Any, str, Any]]:
    """Pair psycopg_pool's ``get_stats()`` with a ``PoolMetrics.snapshot()``, row by row.

    Returns:
        ``(meaning, get_stats key, value, PoolMetrics key, value)`` per row of
        ``POOL_STATS_ROWS``; a side with no such counter has ``""`` and ``None``.
    """
    out = []
    for meaning, ours, theirs in POOL_STATS_ROWS:
        value = stats.get(ours, 0)
        other = snapshot.get(theirs) if theirs else None
        if other is not None and isinstance(other, float):
            other = round(other)
        out.append((meaning, ours, value, theirs, other))
    return out


def external_pool_engine(pool: ConnectionPool[Any], url: URL) -> Engine:
    """A SQLAlchemy engine whose connections come from ``pool`` (psycopg 3).

    SQLAlchemy keeps no pool of its own (``NullPool``): each checkout calls the
    ``creator``, which takes a connection from ``pool``; when SQLAlchemy closes it, the
    pool (made with ``close_returns=True``) takes it back instead of closing it.
    """
    if not getattr(pool, "close_returns", False):
        raise ValueError("make the pool with close_returns=True, so that close() returns "
                         "a connection instead of closing it")
    return sa_create_engine(url.set(drivername="postgresql+psycopg"), poolclass=NullPool,
                            creator=pool.getconn)
