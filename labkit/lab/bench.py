"""Benchmark clients: the same short read transaction, one layer at a time.

The workload: check out a connection, ``SELECT`` one row by primary key from a seeded
table, commit, return the connection. Each client runs it from ``concurrency`` workers
for ``duration`` seconds and returns a record:

```python
{"client": "labkit session (async)", "concurrency": 8, "tps": 3100.0,
 "p50_ms": 2.4, "p99_ms": 6.0, "transactions": 9300, "duration_s": 3.0}
```

Clients, from the bottom up: ``pgbench`` (C, the ceiling), raw asyncpg pool, raw psycopg2
(one connection per thread), SQLAlchemy Core, SQLAlchemy ORM session (sync and async), and
labkit's session scope (sync and async): ``CLIENTS``, on the kit's default drivers. The
third driver, psycopg 3, runs the same transaction raw (a connection per thread; an
asyncio ``psycopg_pool``), through the SQLAlchemy ORM session and through labkit's scopes,
sync and async (``PSYCOPG3_CLIENTS``); ``ALL_CLIENTS`` is both. Used by
``benchmarks/run.py`` (``make bench``, every client) and notebooks 06 and 03.

One short run per client cannot resolve a few percent on a shared machine: other
processes take the CPU in bursts. ``interleaved_rounds`` therefore runs every client
many times in short slices, in a random order within each round, so that each client's
slices are spread over the whole run. ``summarize`` reports the median and spread of
those slices, and ``paired_ratio`` compares two clients round by round: the median of the
per-round ratios with a distribution-free interval (``median_interval``), whose width is
the smallest difference the run can resolve. Percentiles, medians and that interval
come from ``labkit.lab.stats``, the lab's one statistics module.

For labkit's own cost, a few percent at most, even that is too coarse. ``cost_blocks``
runs labkit's scope and the SQLAlchemy session one transaction at a time and measures
what load from other processes barely changes: the calls per transaction
(``count_calls``, nearly deterministic) and the CPU time per transaction with the two
alternating transaction by transaction; ``cost_ratio`` compares them block by block and
judges the claim "at most 3 % more".
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import importlib
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import Integer, String, select, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from labkit import (
    DEVELOPMENT_POOL,
    TEST_POOL,
    PoolProfile,
    Settings,
    async_session_scope,
    create_async_engine,
    create_async_sessionmaker,
    create_engine,
    create_sessionmaker,
    health_check,
    session_scope,
)
from labkit.lab.stats import median, median_interval, percentile

__all__ = [
    "ALL_CLIENTS",
    "ASYNC_CLIENTS",
    "BLOCKS",
    "CLIENTS",
    "COST_PAIRS",
    "OVERHEAD_BOUND",
    "PGBENCH",
    "PGBENCH_SELECT",
    "PSYCOPG3_CLIENTS",
    "PSYCOPG3_RATIOS",
    "RATIOS",
    "ROWS",
    "SYNC_CLIENTS",
    "BenchItem",
    "cost_blocks",
    "cost_ratio",
    "count_calls",
    "count_calls_async",
    "interleaved_rounds",
    "iter_plan",
    "overheads",
    "paired_ratio",
    "pool_size_rounds",
    "progress",
    "record",
    "run_async_client",
    "run_client",
    "run_pgbench",
    "run_pool_size",
    "run_sync_client",
    "seed",
    "summarize",
]

ROWS = 10_000
TABLE = "bench_items"
SLOT_SEQUENCE = "bench_slot"
SELECT_SQL = f"SELECT id, name FROM {TABLE} WHERE id = :id"


class _Base(DeclarativeBase):
    pass


class BenchItem(_Base):
    """The seeded row the workload reads."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


def seed(url: URL, rows: int = ROWS) -> None:
    """Create and fill the benchmark table, and the slot sequence of ``run_pool_size``
    (idempotent)."""
    engine = create_engine(Settings(url=url), pool=TEST_POOL)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE IF NOT EXISTS {TABLE} "
                              "(id int PRIMARY KEY, name varchar(40) NOT NULL)"))
            have: int = conn.execute(text(f"SELECT count(*) FROM {TABLE}")).scalar_one()
            if have != rows:
                conn.execute(text(f"TRUNCATE {TABLE}"))
                conn.execute(text(f"INSERT INTO {TABLE} SELECT g, 'item ' || g "
                                  "FROM generate_series(1, :n) g"), {"n": rows})
            conn.execute(text(f"ANALYZE {TABLE}"))
            conn.execute(text(f"CREATE SEQUENCE IF NOT EXISTS {SLOT_SEQUENCE}"))
    finally:
        engine.dispose()


def record(client: str, concurrency: int, latencies_s: list[float], elapsed: float,
           **extra: Any) -> dict[str, Any]:
    """Summarise one run as a benchmark record (latencies in seconds in, ms out)."""
    ms = [x * 1000.0 for x in latencies_s]
    return {"client": client, "concurrency": concurrency,
            "tps": round(len(ms) / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "transactions": len(ms), "duration_s": round(elapsed, 3), **extra}


def _cpu_fields(cpu_s: float, transactions: int) -> dict[str, float | None]:
    # CPU time of this Python process while the clock ran, per transaction: what a layer
    # costs, far less dependent than throughput on how much of the machine other
    # processes take. ``tx_per_cpu_s`` is its inverse, oriented like throughput.
    if not transactions or cpu_s <= 0:
        return {"cpu_us_per_tx": None, "tx_per_cpu_s": None}
    return {"cpu_us_per_tx": round(cpu_s / transactions * 1e6, 2),
            "tx_per_cpu_s": round(transactions / cpu_s, 1)}


def _bench_pool(concurrency: int) -> PoolProfile:
    # The same pool for every SQLAlchemy-based client: one connection per worker, no
    # pre-ping (its cost is measured on its own), so only the layers differ.
    return DEVELOPMENT_POOL.replace(pool_size=concurrency, max_overflow=0, pool_pre_ping=False)


# --- sync clients -----------------------------------------------------------------------

def _raw_worker(url: URL, module: str) -> Callable[[], Callable[[int], None]]:
    """A connection per thread through ``module`` (psycopg2 or psycopg: the same calls).
    psycopg 3 with its defaults: server-side binding, and the statement prepared on the
    server from its sixth execution on (after prepare_threshold=5)."""
    driver = importlib.import_module(module)

    def make() -> Callable[[int], None]:
        conn = driver.connect(host=url.host, port=url.port, user=url.username,
                              password=url.password, dbname=url.database)
        cur = conn.cursor()

        def op(key: int) -> None:
            cur.execute(f"SELECT id, name FROM {TABLE} WHERE id = %s", (key,))
            cur.fetchone()
            conn.commit()

        op.close = conn.close  # type: ignore[attr-defined]
        return op

    return make


_PSYCOPG3 = ", psycopg 3)"


def _layer(client: str) -> tuple[str, Literal["psycopg"] | None]:
    """``(the client's name on the default drivers, Settings' driver)`` of a layer."""
    if client.endswith(_PSYCOPG3):
        return client.removesuffix(_PSYCOPG3) + ")", "psycopg"
    return client, None


def _sync_client(url: URL, client: str,
                 concurrency: int) -> tuple[Callable[[], Callable[[int], None]], Any]:
    """Return (a factory of per-worker operations, the engine to dispose or None)."""
    if client == "psycopg2 raw (threads)":
        return _raw_worker(url, "psycopg2"), None
    if client == "psycopg 3 raw (threads)":
        return _raw_worker(url, "psycopg"), None
    layer, driver = _layer(client)
    engine = create_engine(Settings(url=url, application_name="labkit-bench", driver=driver),
                           pool=_bench_pool(concurrency))
    factory = create_sessionmaker(engine)
    stmt = text(SELECT_SQL)
    orm_stmt = select(BenchItem)

    def core(key: int) -> None:
        with engine.begin() as conn:
            conn.execute(stmt, {"id": key}).first()

    def orm(key: int) -> None:
        with factory.begin() as session:
            session.scalars(orm_stmt.where(BenchItem.id == key)).first()

    def labkit_scope(key: int) -> None:
        with session_scope(factory) as session:
            session.scalars(orm_stmt.where(BenchItem.id == key)).first()

    ops = {"SQLAlchemy Core (sync)": core, "SQLAlchemy ORM session (sync)": orm,
           "labkit session_scope (sync)": labkit_scope}
    if layer not in ops:
        engine.dispose()
        raise ValueError(f"unknown sync client {client!r}")
    op = ops[layer]
    return (lambda: op), engine


PSYCOPG3_SYNC_CLIENTS = ["psycopg 3 raw (threads)", "SQLAlchemy ORM session (sync, psycopg 3)",
                         "labkit session_scope (sync, psycopg 3)"]
SYNC_CLIENTS = ["psycopg2 raw (threads)", "SQLAlchemy Core (sync)",
                "SQLAlchemy ORM session (sync)", "labkit session_scope (sync)",
                *PSYCOPG3_SYNC_CLIENTS]


def run_sync_client(url: URL, client: str, concurrency: int, duration: float) -> dict[str, Any]:
    """Run one sync client from ``concurrency`` threads for ``duration`` seconds."""
    make, engine = _sync_client(url, client, concurrency)
    ops = [make() for _ in range(concurrency)]
    for op in ops:  # warm: open the connections before timing
        op(1)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start_barrier = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        rnd = random.Random(i)
        clock = time.perf_counter
        out = latencies[i]
        op = ops[i]
        start_barrier.wait()
        while (t := clock()) < deadline[0]:
            op(rnd.randint(1, ROWS))
            out.append(clock() - t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    cpu0 = time.process_time()
    deadline[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for op in ops:
        getattr(op, "close", lambda: None)()
    if engine is not None:
        engine.dispose()
    return record(client, concurrency, [x for xs in latencies for x in xs], elapsed,
                  **_cpu_fields(cpu, sum(map(len, latencies))))


# --- async clients -----------------------------------------------------------------------

PSYCOPG3_ASYNC_CLIENTS = ["psycopg 3 raw (async pool)",
                          "SQLAlchemy ORM session (async, psycopg 3)",
                          "labkit async_session_scope (async, psycopg 3)"]
ASYNC_CLIENTS = ["asyncpg raw (pool)", "SQLAlchemy ORM session (async)",
                 "labkit async_session_scope (async)", *PSYCOPG3_ASYNC_CLIENTS]


async def _async_client(url: URL, client: str, concurrency: int
                        ) -> tuple[Callable[[int], Awaitable[None]],
                                   list[Callable[[], Awaitable[Any]]]]:
    """Return (the operation of one transaction, the closers to await when done)."""
    closers: list[Callable[[], Awaitable[Any]]] = []
    if client == "asyncpg raw (pool)":
        import asyncpg

        pool = await asyncpg.create_pool(host=url.host, port=url.port, user=url.username,
                                         password=url.password, database=url.database,
                                         min_size=concurrency, max_size=concurrency)
        closers.append(pool.close)
        sql = f"SELECT id, name FROM {TABLE} WHERE id = $1"

        async def op(key: int) -> None:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.fetchrow(sql, key)
        return op, closers
    if client == "psycopg 3 raw (async pool)":
        from psycopg_pool import AsyncConnectionPool

        pg3 = AsyncConnectionPool(kwargs={"host": url.host, "port": url.port,
                                          "user": url.username, "password": url.password,
                                          "dbname": url.database},
                                  min_size=concurrency, max_size=concurrency, open=False)
        await pg3.open(wait=True)
        closers.append(pg3.close)
        pg3_sql = f"SELECT id, name FROM {TABLE} WHERE id = %s"

        async def pg3_op(key: int) -> None:
            # The pool's block commits the transaction the SELECT began (psycopg 3 is not
            # in autocommit mode) before it takes the connection back.
            async with pg3.connection() as conn:
                await (await conn.execute(pg3_sql, (key,))).fetchone()
        return pg3_op, closers
    layer, driver = _layer(client)
    engine = create_async_engine(Settings(url=url, application_name="labkit-bench",
                                          driver=driver),
                                 pool=_bench_pool(concurrency))
    closers.append(engine.dispose)
    factory = create_async_sessionmaker(engine)
    orm_stmt = select(BenchItem)
    if layer == "SQLAlchemy ORM session (async)":
        async def orm(key: int) -> None:
            async with factory.begin() as session:
                (await session.scalars(orm_stmt.where(BenchItem.id == key))).first()
        return orm, closers
    if layer == "labkit async_session_scope (async)":
        async def labkit_scope(key: int) -> None:
            async with async_session_scope(factory) as session:
                (await session.scalars(orm_stmt.where(BenchItem.id == key))).first()
        return labkit_scope, closers
    await engine.dispose()
    raise ValueError(f"unknown async client {client!r}")


async def run_async_client(url: URL, client: str, concurrency: int,
                           duration: float) -> dict[str, Any]:
    """Run one async client from ``concurrency`` tasks for ``duration`` seconds."""
    op, closers = await _async_client(url, client, concurrency)
    await asyncio.gather(*(op(1) for _ in range(concurrency)))  # warm the pool
    latencies: list[float] = []
    clock = time.perf_counter
    deadline = clock() + duration

    async def worker(i: int) -> None:
        rnd = random.Random(i)
        while (t := clock()) < deadline:
            await op(rnd.randint(1, ROWS))
            latencies.append(clock() - t)

    cpu0 = time.process_time()
    t0 = clock()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = clock() - t0
    cpu = time.process_time() - cpu0
    for close in closers:
        await close()
    return record(client, concurrency, latencies, elapsed, **_cpu_fields(cpu, len(latencies)))


# --- pgbench ---------------------------------------------------------------------------------

PGBENCH = "pgbench (C, same transaction)"
PGBENCH_SELECT = "pgbench -S (autocommit, reference)"

def run_pgbench(url: URL, bin_dir: Path, concurrency: int, duration: float, *,
                select_only: bool = False, transactions: int | None = None) -> dict[str, Any]:
    """Run pgbench (the C client) on the same transaction, or ``-S`` for reference.

    pgbench's ``-T`` takes whole seconds only, so ``duration`` is rounded up to at least
    1 s. For shorter slices give ``transactions`` (per client, pgbench's ``-t``) instead:
    ``duration`` then only bounds the subprocess timeout.
    """
    env = {**os.environ, "PGPASSWORD": str(url.password or "")}
    budget = (["-t", str(max(1, transactions))] if transactions is not None
              else ["-T", str(max(1, round(duration)))])
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(bin_dir / "pgbench"), "-n", "-c", str(concurrency),
                "-j", str(min(concurrency, os.cpu_count() or 1)), *budget,
                "-h", str(url.host), "-p", str(url.port), "-U", str(url.username),
                "-l", "--log-prefix", f"{tmp}/log", str(url.database)]
        if select_only:
            script = Path(tmp) / "select_only.sql"
            script.write_text(f"\\set id random(1, {ROWS})\n"
                              f"SELECT id, name FROM {TABLE} WHERE id = :id;\n")
        else:
            script = Path(tmp) / "read_tx.sql"
            script.write_text(f"\\set id random(1, {ROWS})\nBEGIN;\n"
                              f"SELECT id, name FROM {TABLE} WHERE id = :id;\nCOMMIT;\n")
        args[1:1] = ["-f", str(script)]
        proc = subprocess.run(args, env=env, capture_output=True, text=True,
                              timeout=duration + 60, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({proc.returncode}): {proc.stderr[-500:]}")
        latencies = []
        for log in Path(tmp).glob("log*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 3:
                    latencies.append(int(fields[2]) / 1e6)
    match = re.search(r"tps = ([0-9.]+)", proc.stdout)
    elapsed = len(latencies) / float(match.group(1)) if match and float(match.group(1)) else 1.0
    return record(PGBENCH_SELECT if select_only else PGBENCH, concurrency, latencies, elapsed)


# --- overheads -----------------------------------------------------------------------------

def _median_ms(fn: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000.0)
    return median(samples)


def overheads(url: URL, n: int = 300) -> list[dict[str, Any]]:
    """Median cost (ms) of a health check, a pre-ping checkout and a NullPool request."""
    settings = Settings(url=url, application_name="labkit-bench")
    one = DEVELOPMENT_POOL.replace(pool_size=1, max_overflow=0)
    ping, noping = create_engine(settings, pool=one), create_engine(
        settings, pool=one.replace(pool_pre_ping=False))
    null = create_engine(settings, pool=TEST_POOL)
    stmt = text("SELECT 1")

    def checkout(engine: Any) -> Callable[[], None]:
        return lambda: engine.connect().close()

    def request(engine: Any) -> Callable[[], None]:
        def run() -> None:
            with engine.connect() as conn:
                conn.execute(stmt)
        return run

    for fn in (checkout(ping), checkout(noping), request(noping), request(null)):
        fn()
    rows = {
        "health_check (warm pool)": _median_ms(lambda: health_check(noping, timeout=5), n),
        "checkout with pre-ping": _median_ms(checkout(ping), n),
        "checkout without pre-ping": _median_ms(checkout(noping), n),
        "request, QueuePool": _median_ms(request(noping), n),
        "request, NullPool": _median_ms(request(null), max(50, n // 3)),
    }
    for engine in (ping, noping, null):
        engine.dispose()
    return [{"client": name, "concurrency": 1, "tps": round(1000.0 / ms, 1) if ms else 0.0,
             "p50_ms": round(ms, 4), "p99_ms": None, "kind": "overhead"}
            for name, ms in rows.items()]


def progress(message: str) -> None:
    """One line of progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def iter_plan(concurrencies: Iterable[int]) -> list[tuple[str, int]]:
    """Every (client, concurrency) pair of a full run (``ALL_CLIENTS``), pgbench first."""
    clients = ["pgbench", *SYNC_CLIENTS, *ASYNC_CLIENTS]
    return [(c, n) for n in concurrencies for c in clients]


# --- interleaved rounds ----------------------------------------------------------------------

CLIENTS = [PGBENCH, *(c for c in SYNC_CLIENTS + ASYNC_CLIENTS
                      if c not in PSYCOPG3_SYNC_CLIENTS + PSYCOPG3_ASYNC_CLIENTS)]
"""The layers on the kit's default drivers, bottom up: the C client, then the sync
(psycopg2) and the async (asyncpg) Python layers."""

PSYCOPG3_CLIENTS = [*PSYCOPG3_SYNC_CLIENTS, *PSYCOPG3_ASYNC_CLIENTS]
"""The third driver, psycopg 3: raw, through the ORM session and through labkit's scopes
(``Settings(driver="psycopg")``), sync then async."""

ALL_CLIENTS = [*CLIENTS, *PSYCOPG3_CLIENTS]
"""Every load client: what ``make bench`` runs."""

RATIOS: list[tuple[str, str, str]] = [
    ("labkit sync / SQLAlchemy ORM sync",
     "labkit session_scope (sync)", "SQLAlchemy ORM session (sync)"),
    ("labkit async / SQLAlchemy ORM async",
     "labkit async_session_scope (async)", "SQLAlchemy ORM session (async)"),
    ("SQLAlchemy ORM sync / SQLAlchemy Core sync",
     "SQLAlchemy ORM session (sync)", "SQLAlchemy Core (sync)"),
    ("asyncpg raw / SQLAlchemy ORM async",
     "asyncpg raw (pool)", "SQLAlchemy ORM session (async)"),
    ("psycopg2 raw / pgbench", "psycopg2 raw (threads)", PGBENCH),
    ("labkit sync / SQLAlchemy ORM sync, on psycopg 3",
     "labkit session_scope (sync, psycopg 3)", "SQLAlchemy ORM session (sync, psycopg 3)"),
    ("labkit async / SQLAlchemy ORM async, on psycopg 3",
     "labkit async_session_scope (async, psycopg 3)",
     "SQLAlchemy ORM session (async, psycopg 3)"),
    ("psycopg 3 raw / psycopg2 raw", "psycopg 3 raw (threads)", "psycopg2 raw (threads)"),
    ("psycopg 3 async raw / asyncpg raw", "psycopg 3 raw (async pool)", "asyncpg raw (pool)"),
    ("ORM sync on psycopg 3 / on psycopg2",
     "SQLAlchemy ORM session (sync, psycopg 3)", "SQLAlchemy ORM session (sync)"),
    ("ORM async on psycopg 3 / on asyncpg",
     "SQLAlchemy ORM session (async, psycopg 3)", "SQLAlchemy ORM session (async)"),
]
"""The comparisons ``make bench`` reports: ``(name, numerator, denominator)``; the first
two are labkit's own cost over the SQLAlchemy layer it wraps, on the default drivers;
``PSYCOPG3_RATIOS`` (the last six) the same on psycopg 3 and psycopg 3 against the
default drivers, raw and through the ORM session."""

PSYCOPG3_RATIOS = RATIOS[5:]
"""labkit over the ORM session on psycopg 3 (sync, async), then psycopg 3 over psycopg2
and over asyncpg, raw and through SQLAlchemy's ORM session."""

BLOCKS: list[list[str]] = [
    [PGBENCH, "psycopg2 raw (threads)", "psycopg 3 raw (threads)"],
    ["SQLAlchemy Core (sync)", "SQLAlchemy ORM session (sync)", "labkit session_scope (sync)",
     "SQLAlchemy ORM session (sync, psycopg 3)", "labkit session_scope (sync, psycopg 3)"],
    ["asyncpg raw (pool)", "SQLAlchemy ORM session (async)",
     "labkit async_session_scope (async)", "psycopg 3 raw (async pool)",
     "SQLAlchemy ORM session (async, psycopg 3)",
     "labkit async_session_scope (async, psycopg 3)"],
]
"""Clients that ``interleaved_rounds`` keeps next to each other within a round: every pair
of ``RATIOS`` shares a block, so the two sides of a ratio run a fraction of a second
apart, under nearly the same load from other processes."""

_T = TypeVar("_T")


def _run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on a fresh event loop, from plain code or from inside a notebook.

    In Jupyter an event loop already runs in this thread and ``asyncio.run`` refuses to
    nest, so the coroutine then gets its own loop in a helper thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_client(url: URL, client: str, concurrency: int, duration: float, *,
               bin_dir: Path | None = None, transactions: int | None = None) -> dict[str, Any]:
    """Run one client of ``ALL_CLIENTS`` once and return its record.

    Args:
        url: The database to load.
        client: A name from ``ALL_CLIENTS``.
        concurrency: Workers (threads, tasks or pgbench clients).
        duration: Seconds to run (pgbench: see ``transactions``).
        bin_dir: The directory holding ``pgbench``; needed for ``PGBENCH`` only.
        transactions: For ``PGBENCH``: transactions per client instead of a duration.

    Raises:
        ValueError: An unknown client, or ``PGBENCH`` without ``bin_dir``.
    """
    if client == PGBENCH:
        if bin_dir is None:
            raise ValueError("bin_dir (the directory holding pgbench) is needed for pgbench")
        return run_pgbench(url, bin_dir, concurrency, duration, transactions=transactions)
    if client in SYNC_CLIENTS:
        return run_sync_client(url, client, concurrency, duration)
    if client in ASYNC_CLIENTS:
        return _run_coroutine(run_async_client(url, client, concurrency, duration))
    raise ValueError(f"unknown client {client!r}; choose from {ALL_CLIENTS}")


def _shuffled_rounds(units: Sequence[Sequence[_T]], rounds: int, seed: int) -> list[list[_T]]:
    """Per round: the units in a random order, and each unit's members in a random order."""
    rng = random.Random(seed)
    plan = []
    for _ in range(rounds):
        order = [list(unit) for unit in units]
        rng.shuffle(order)
        for unit in order:
            rng.shuffle(unit)
        plan.append([member for unit in order for member in unit])
    return plan


@contextlib.contextmanager
def _settled_gc() -> Iterator[Callable[[], object]]:
    """Give every slice the same garbage-collector state; yield the call to make before each.

    Objects alive at the start (a notebook kernel holds many) move to the collector's
    permanent generation, so the full collection run before each slice is quick and no
    slice pays for garbage another one left behind.
    """
    gc.collect()
    gc.freeze()
    try:
        yield gc.collect
    finally:
        gc.unfreeze()


def interleaved_rounds(url: URL, *, clients: Sequence[str] = tuple(CLIENTS),
                       concurrencies: Sequence[int] = (8,), rounds: int = 10,
                       duration: float = 0.3, bin_dir: Path | None = None, seed: int = 0,
                       warmup: bool = True, blocks: Sequence[Sequence[str]] = BLOCKS,
                       on_round: Callable[[int, int, float], None] | None = None,
                       ) -> list[dict[str, Any]]:
    """Run every (client, concurrency) cell once per round, in a new random order each round.

    Interleaving spreads each client's slices over the whole run, so a burst of load
    from another process hits all clients alike instead of ruining one client's only
    run. Clients of one of ``blocks`` run back to back at the same concurrency (the
    blocks in a random order, the clients within a block too), so that the two sides of
    a ratio see nearly the same load. An unrecorded warm-up round at half the slice
    length comes first (imports, SQLAlchemy's statement cache, PostgreSQL's buffers,
    pgbench's calibration), and a garbage collection precedes every slice.

    pgbench cannot run for less than a whole second, so its slices are given as a
    number of transactions per client, sized from its previous throughput to last about
    ``duration`` seconds.

    Args:
        url: The database to load (seeded with ``seed`` first).
        clients: Names from ``CLIENTS``.
        concurrencies: Worker counts; every client runs at each.
        rounds: Recorded rounds.
        duration: Seconds per slice (one client at one concurrency, once).
        bin_dir: The directory holding ``pgbench`` (needed when ``PGBENCH`` is a client).
        seed: Seed of the random order, recorded so a run can be replayed.
        warmup: Run the unrecorded warm-up round first.
        blocks: Groups of clients kept adjacent; a client in no block is its own.
        on_round: Called after each recorded round with ``(round, rounds, seconds)``.

    Returns:
        One record per slice: the client's record plus ``round`` (1-based),
        ``position`` (its place in the round) and ``started_s`` (since the run began).

    Example:
        ```python
        cells = interleaved_rounds(url, clients=SYNC_CLIENTS, concurrencies=[4], rounds=8)
        paired_ratio(cells, "labkit session_scope (sync)", "SQLAlchemy ORM session (sync)")
        ```
    """
    if rounds < 1 or duration <= 0:
        raise ValueError("rounds must be >= 1 and duration > 0")
    grouped = [[c for c in block if c in clients] for block in blocks]
    grouped = [g for g in grouped if g] + [[c] for c in clients
                                           if not any(c in block for block in blocks)]
    units = [[(client, n) for client in group] for n in concurrencies for group in grouped]
    plan = _shuffled_rounds(units, rounds + (1 if warmup else 0), seed)
    pgbench_tps: dict[int, float] = {}
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with _settled_gc() as collect:
        for index, order in enumerate(plan):
            number = index if warmup else index + 1  # round 0 is the warm-up
            seconds = duration / 2 if number == 0 else duration
            round_start = time.perf_counter()
            for position, (client, n) in enumerate(order):
                transactions = None
                if client == PGBENCH:
                    guess = pgbench_tps.get(n, 1000.0 * n)
                    transactions = max(10, round(guess * seconds / n))
                collect()
                started = time.perf_counter() - t0
                rec = run_client(url, client, n, seconds, bin_dir=bin_dir,
                                 transactions=transactions)
                if client == PGBENCH and rec["tps"] > 0:
                    pgbench_tps[n] = rec["tps"]
                if number:
                    out.append({**rec, "round": number, "position": position,
                                "started_s": round(started, 3)})
            if number and on_round is not None:
                on_round(number, rounds, time.perf_counter() - round_start)
    return out


def summarize(cells: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summarise slices per (client, concurrency): the median and spread over rounds.

    ``tps`` is the median of the slices' throughputs, ``tps_q1``/``tps_q3`` their
    interquartile range and ``tps_min``/``tps_max`` the extremes; ``spread_pct`` is the
    IQR as a percentage of the median. ``p50_ms``/``p99_ms`` are the medians over rounds
    of each slice's latency percentiles, ``cpu_us_per_tx`` the median of this process's
    CPU time per transaction (Python clients). Rows come in ``ALL_CLIENTS`` order, then by
    concurrency.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["client"], cell["concurrency"]), []).append(cell)
    rank = {name: i for i, name in enumerate(ALL_CLIENTS)}
    rows = []
    for (client, n), group in sorted(groups.items(), key=lambda kv: (
            rank.get(kv[0][0], len(rank)), kv[0][1], kv[0][0])):
        tps = [c["tps"] for c in group]
        med = median(tps)
        q1, q3 = percentile(tps, 25), percentile(tps, 75)
        p99s = [c["p99_ms"] for c in group if c.get("p99_ms") is not None]
        cpu = [c["cpu_us_per_tx"] for c in group if c.get("cpu_us_per_tx") is not None]
        rows.append({
            "client": client, "concurrency": n, "rounds": len(group),
            "tps": round(med, 1), "tps_q1": round(q1, 1), "tps_q3": round(q3, 1),
            "tps_min": round(min(tps), 1), "tps_max": round(max(tps), 1),
            "spread_pct": round((q3 - q1) / med * 100.0, 1) if med else math.nan,
            "p50_ms": round(median(c["p50_ms"] for c in group), 3),
            "p99_ms": round(median(p99s), 3) if p99s else None,
            "cpu_us_per_tx": round(median(cpu), 1) if cpu else None,
            "transactions": sum(c.get("transactions", 0) for c in group),
        })
    return rows


def paired_ratio(cells: Iterable[dict[str, Any]], numerator: str, denominator: str, *,
                 concurrency: int | None = None, confidence: float = 0.95,
                 name: str | None = None, metric: str = "tps") -> dict[str, Any]:
    """Compare two clients round by round: the median of the per-round throughput ratios.

    Both clients ran in every round, a few seconds apart at most, so each round's ratio
    ``numerator / denominator`` cancels most of the load the machine was under at the
    time. The interval is ``median_interval`` of those ratios; ``resolves_pct`` is its
    wider half in percent of the median: differences smaller than that are beyond what
    the run can see.

    Args:
        cells: Slices from ``interleaved_rounds``.
        numerator: A client name.
        denominator: A client name.
        concurrency: Compare at this worker count. ``None`` pools the concurrencies: each
            round's ratio is then the geometric mean of its ratios at every concurrency
            (meaningful when the ratio does not depend on concurrency, as for a layer's
            cost over the layer it wraps).
        confidence: Coverage asked of the interval.
        name: A label; ``"numerator / denominator"`` by default.
        metric: The slice field compared: ``"tps"`` (throughput) or ``"tx_per_cpu_s"``
            (transactions per second of this process's CPU time: a layer's own cost,
            less disturbed by other processes; Python clients only).

    Returns:
        ``name``, ``metric``, ``numerator``, ``denominator``, ``concurrency`` (or ``"pooled"``),
        ``rounds``, ``median``, ``low``, ``high``, ``confidence`` (the coverage reached),
        ``resolves_pct``, ``verdict`` (a sentence) and ``per_round`` (the ratios).

    Raises:
        ValueError: No round has both clients.
    """
    tps: dict[tuple[int, int], dict[str, float]] = {}
    for cell in cells:
        if cell["client"] in (numerator, denominator) and cell.get(metric) is not None and (
                concurrency is None or cell["concurrency"] == concurrency):
            tps.setdefault((cell["round"], cell["concurrency"]), {})[cell["client"]] = cell[metric]
    logs: dict[int, list[float]] = {}
    for (rnd, _), pair in sorted(tps.items()):
        if len(pair) == 2 and pair[numerator] > 0 and pair[denominator] > 0:
            logs.setdefault(rnd, []).append(math.log(pair[numerator] / pair[denominator]))
    levels = max((len(v) for v in logs.values()), default=0)
    ratios = [math.exp(sum(v) / len(v)) for v in logs.values() if len(v) == levels]
    if not ratios:
        raise ValueError(f"no round ran both {numerator!r} and {denominator!r}")
    med = median(ratios)
    low, high, reached = median_interval(ratios, confidence)
    resolves = max(med - low, high - med) / med * 100.0
    lo_pct, hi_pct = (low - 1.0) * 100.0, (high - 1.0) * 100.0
    if low > 1.0:
        verdict = f"{numerator} is faster, by {lo_pct:.1f} to {hi_pct:.1f} %"
    elif high < 1.0:
        verdict = f"{numerator} is slower, by {-hi_pct:.1f} to {-lo_pct:.1f} %"
    else:
        verdict = (f"no difference resolved: {numerator} is within {lo_pct:+.1f} % to "
                   f"{hi_pct:+.1f} % of {denominator}")
    return {"name": name or f"{numerator} / {denominator}", "metric": metric,
            "numerator": numerator,
            "denominator": denominator,
            "concurrency": "pooled" if concurrency is None else concurrency,
            "rounds": len(ratios), "median": round(med, 4), "low": round(low, 4),
            "high": round(high, 4), "confidence": round(reached, 4),
            "resolves_pct": round(resolves, 1), "verdict": verdict,
            "per_round": [round(r, 4) for r in ratios]}


# --- labkit's cost per transaction: calls and CPU time, transaction by transaction ----------

COST_PAIRS: list[tuple[str, str, str]] = RATIOS[:2]
"""labkit's scopes and the SQLAlchemy sessions they wrap: ``(name, labkit, SQLAlchemy)``."""

OVERHEAD_BOUND = 1.03
"""The claim ``cost_ratio`` judges: labkit costs at most 3 % more per transaction."""


def _profiled_calls(profile: cProfile.Profile) -> int:
    # Every call cProfile saw (Python functions, C functions and methods, coroutine
    # resumptions), except the profiler's own ``disable``.
    return sum(entry.callcount for entry in profile.getstats()
               if not (isinstance(entry.code, str) and "_lsprof.Profiler" in entry.code))


def count_calls(fn: Callable[[], Any], n: int = 1) -> float:
    """Return the calls per invocation of ``fn()``, run ``n`` times under ``cProfile``.

    Counted: every Python function call (``fn`` itself included), every call of a C
    function or method, and every resumption of a generator or coroutine: a count that
    does not depend on how busy the machine is, so two layers can be compared to a
    fraction of a percent where their timings differ by several percent from run to
    run. It weighs every call alike, so it is a proxy for CPU time, not CPU time itself.

    Example:
        ```python
        def ten() -> None:
            for x in range(10):
                abs(x)

        count_calls(ten, n=100)  # 11.0: ten itself and ten calls of abs
        ```
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    profile = cProfile.Profile()
    profile.enable()
    try:
        for _ in range(n):
            fn()
    finally:
        profile.disable()
    return _profiled_calls(profile) / n


async def count_calls_async(fn: Callable[[], Awaitable[Any]], n: int = 1) -> float:
    """Async twin of ``count_calls``: calls per ``await fn()``, the event loop's included.

    Run it as the only task: the loop's own work while ``fn`` waits (selecting,
    scheduling callbacks) is counted with it.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    profile = cProfile.Profile()
    profile.enable()
    try:
        for _ in range(n):
            await fn()
    finally:
        profile.disable()
    return _profiled_calls(profile) / n


def _cost_records(block: int, name: str, sides: Sequence[str], calls: dict[str, float],
                  cpu: dict[str, float], calls_n: int, cpu_n: int) -> list[dict[str, Any]]:
    cpu_n = 2 * ((cpu_n + 1) // 2)  # the A B B A pattern runs in whole groups of four
    return [{"block": block, "pair": name, "client": c,
             "calls_per_tx": round(calls[c], 3),
             "cpu_us_per_tx": round(cpu[c] / cpu_n * 1e6, 3),
             "calls_transactions": calls_n, "cpu_transactions": cpu_n} for c in sides]


def _sync_cost_block(url: URL, block: int, name: str, sides: Sequence[str], rng: random.Random,
                     calls_n: int, cpu_n: int, warmup: int) -> list[dict[str, Any]]:
    made = [_sync_client(url, client, 1) for client in sides]
    ops = {client: make() for client, (make, _) in zip(sides, made)}
    try:
        for client in sides:
            for key in range(1, warmup + 1):
                ops[client](key)
        calls: dict[str, float] = {}
        keyseed = rng.randrange(2**32)
        for client in rng.sample(list(sides), len(sides)):
            keys = random.Random(keyseed)
            op = ops[client]
            calls[client] = count_calls(lambda: op(keys.randint(1, ROWS)), calls_n)
        # CPU time of this thread, one transaction at a time (_alternating).
        cpu = dict.fromkeys(sides, 0.0)
        clock = time.thread_time
        for key, client in _alternating(rng, sides, cpu_n):
            op = ops[client]
            t = clock()
            op(key)
            cpu[client] += clock() - t
    finally:
        for _, engine in made:
            if engine is not None:
                engine.dispose()
    return _cost_records(block, name, sides, calls, cpu, calls_n, cpu_n)


def _alternating(rng: random.Random, sides: Sequence[str],
                 n: int) -> Iterator[tuple[int, str]]:
    """``(key, client)`` pairs, the two sides alternating A B B A A B ...: a burst of load
    from elsewhere falls on both alike."""
    first, second = rng.sample(list(sides), 2)
    for i in range(4 * ((n + 1) // 2)):
        yield rng.randint(1, ROWS), (first if i % 4 in (0, 3) else second)


async def _async_cost_block(url: URL, block: int, name: str, sides: Sequence[str],
                            rng: random.Random, calls_n: int, cpu_n: int, warmup: int
                            ) -> list[dict[str, Any]]:
    ops: dict[str, Callable[[int], Awaitable[None]]] = {}
    closers: list[Callable[[], Awaitable[Any]]] = []
    try:
        for client in sides:
            ops[client], more = await _async_client(url, client, 1)
            closers += more
            for key in range(1, warmup + 1):
                await ops[client](key)
        calls: dict[str, float] = {}
        keyseed = rng.randrange(2**32)
        for client in rng.sample(list(sides), len(sides)):
            keys = random.Random(keyseed)
            op = ops[client]
            calls[client] = await count_calls_async(lambda: op(keys.randint(1, ROWS)),
                                                    calls_n)
        cpu = dict.fromkeys(sides, 0.0)
        clock = time.thread_time
        for key, client in _alternating(rng, sides, cpu_n):
            op = ops[client]
            t = clock()
            await op(key)
            cpu[client] += clock() - t
    finally:
        for close in closers:
            await close()
    return _cost_records(block, name, sides, calls, cpu, calls_n, cpu_n)


def cost_blocks(url: URL, blocks: Iterable[int], *, calls_transactions: int = 200,
                cpu_transactions: int = 400, warmup: int = 50, seed: int = 0,
                pairs: Sequence[tuple[str, str, str]] = COST_PAIRS,
                on_block: Callable[[int, float], None] | None = None,
                ) -> list[dict[str, Any]]:
    """Measure labkit's cost per transaction against SQLAlchemy's, block by block.

    In every block, for every pair of ``pairs`` (in a random order), both clients get a
    fresh engine with one connection and ``warmup`` unrecorded transactions, then:

    - **calls**: ``calls_transactions`` transactions per client under ``cProfile``
      (``count_calls``), the same keys for both; nearly deterministic.
    - **CPU time**: ``cpu_transactions`` per client (rounded up to even), alternating transaction by
      transaction (A B B A ...), each timed with this thread's CPU clock. Other
      processes take the CPU away from both sides alike; they hardly change what one
      transaction costs once it runs.

    The same read transaction as the load clients (check out, SELECT by primary key,
    commit), one at a time against the real server. Run ``seed`` (the function) first.

    Returns:
        Per block and client: ``block``, ``pair``, ``client``, ``calls_per_tx``,
        ``cpu_us_per_tx``, ``calls_transactions`` and ``cpu_transactions``; compare the
        two sides with ``cost_ratio``.
    """
    if calls_transactions < 1 or cpu_transactions < 1:
        raise ValueError("calls_transactions and cpu_transactions must be >= 1")
    out: list[dict[str, Any]] = []
    with _settled_gc() as collect:
        for block in blocks:
            rng = random.Random(seed * 1_000_003 + block)
            started = time.perf_counter()
            for name, labkit_client, sqlalchemy_client in rng.sample(list(pairs), len(pairs)):
                sides = (labkit_client, sqlalchemy_client)
                collect()
                if all(c in SYNC_CLIENTS for c in sides):
                    out += _sync_cost_block(url, block, name, sides, rng, calls_transactions,
                                            cpu_transactions, warmup)
                elif all(c in ASYNC_CLIENTS for c in sides):
                    out += _run_coroutine(_async_cost_block(
                        url, block, name, sides, rng, calls_transactions, cpu_transactions,
                        warmup))
                else:
                    raise ValueError(f"{name}: both clients must be sync, or both async")
            if on_block is not None:
                on_block(block, time.perf_counter() - started)
    return out


def cost_ratio(records: Iterable[dict[str, Any]], numerator: str, denominator: str, *,
               metric: str = "calls_per_tx", confidence: float = 0.95,
               name: str | None = None, bound: float = OVERHEAD_BOUND) -> dict[str, Any]:
    """Compare two clients' cost per transaction block by block, and judge the claim.

    Each block's ratio is ``numerator / denominator`` of ``metric`` (a cost: above 1,
    the numerator costs more). The interval is ``median_interval`` of the blocks'
    ratios; ``half_width`` is its wider half (``half_width_pct`` in percent of the
    median). The claim "the numerator costs at most ``bound`` times the denominator"
    is ``"confirmed"`` when the whole interval lies at or below ``bound``, ``"ruled
    out"`` when it lies above, and ``"undecided"`` when it straddles it.

    Raises:
        ValueError: No block has both clients.
    """
    per_block: dict[int, dict[str, float]] = {}
    for rec in records:
        if rec["client"] in (numerator, denominator) and rec.get(metric) is not None:
            per_block.setdefault(rec["block"], {})[rec["client"]] = rec[metric]
    ratios = [pair[numerator] / pair[denominator] for _, pair in sorted(per_block.items())
              if len(pair) == 2 and pair[numerator] > 0 and pair[denominator] > 0]
    if not ratios:
        raise ValueError(f"no block measured both {numerator!r} and {denominator!r}")
    med = median(ratios)
    low, high, reached = median_interval(ratios, confidence)
    half = max(med - low, high - med)
    if high <= bound:
        claim = "confirmed"
    elif low > bound:
        claim = "ruled out"
    else:
        claim = "undecided"
    lo_pct, hi_pct, bound_pct = (low - 1) * 100, (high - 1) * 100, (bound - 1) * 100
    verdict = (f"{numerator}'s {metric} is {lo_pct:+.2f} % to {hi_pct:+.2f} % off "
               f"{denominator}'s: at most {bound_pct:+.0f} % is {claim}")
    return {"name": name or f"{numerator} / {denominator}", "metric": metric,
            "numerator": numerator, "denominator": denominator, "blocks": len(ratios),
            "ratio": round(med, 5), "low": round(low, 5), "high": round(high, 5),
            "confidence": round(reached, 4), "half_width": round(half, 5),
            "half_width_pct": round(half / med * 100.0, 3), "bound": bound,
            "claim": claim, "verdict": verdict,
            "per_block": [round(r, 5) for r in ratios]}


# --- pool sizing (notebook 03) ---------------------------------------------------------------

def _slot_work(server_wait_s: float, server_slots: int | None) -> Any:
    if server_slots is None:
        return text("SELECT pg_sleep(:wait)").bindparams(wait=server_wait_s)
    # One of ``server_slots`` transaction-level advisory locks, handed out round-robin by a
    # sequence, then the wait: at most ``server_slots`` transactions wait at once, the
    # others queue inside the server for a slot. The first key is this process's own, so
    # that two runs at the same time do not share slots.
    return text(
        "SELECT pg_sleep(:wait) FROM (SELECT pg_advisory_xact_lock(:owner, "
        f"(nextval('{SLOT_SEQUENCE}') % :slots)::int)) AS slot"
    ).bindparams(wait=server_wait_s, owner=os.getpid() % 2**31, slots=server_slots)


async def run_pool_size(settings: Settings, size: int, *, tasks: int, duration: float,
                        server_wait_s: float, server_slots: int | None = None
                        ) -> dict[str, Any]:
    """Run ``tasks`` asyncio tasks through labkit's async session scope on a pool of ``size``.

    Each transaction reads one row, then waits ``server_wait_s`` seconds on the server
    (``pg_sleep``, standing in for a disk read), so a connection is held for at least
    that long and one connection can never exceed ``1 / server_wait_s`` transactions per
    second, however fast the client is. With ``server_slots`` the server can work on at
    most that many transactions at once (each wait needs one of as many locks, like a
    server with that many cores or disks), capping throughput at
    ``server_slots / server_wait_s`` whatever the pool size. Connections are opened
    before the clock starts; run ``seed`` once first.

    Returns:
        A record (``client`` is ``"pool <size>"``, ``concurrency`` the pool size) with
        ``pool_size``, ``tasks``, ``server_wait_ms`` and ``server_slots`` added.
    """
    engine = create_async_engine(settings, pool=DEVELOPMENT_POOL.replace(
        pool_size=size, max_overflow=0, pool_pre_ping=False, pool_timeout=60))
    factory = create_async_sessionmaker(engine)
    stmt = select(BenchItem)
    work = _slot_work(server_wait_s, server_slots)
    latencies: list[float] = []
    try:
        async def hold() -> None:  # overlapping checkouts open every connection
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(0.02)"))

        await asyncio.gather(*(hold() for _ in range(size)))
        clock = time.perf_counter
        deadline = clock() + duration

        async def worker(i: int) -> None:
            rnd = random.Random(i)
            while (t := clock()) < deadline:
                async with async_session_scope(factory) as session:
                    key = rnd.randint(1, ROWS)
                    (await session.scalars(stmt.where(BenchItem.id == key))).first()
                    await session.execute(work)
                latencies.append(clock() - t)

        t0 = clock()
        await asyncio.gather(*(worker(i) for i in range(tasks)))
        elapsed = clock() - t0
    finally:
        await engine.dispose()
    return record(f"pool {size}", size, latencies, elapsed, pool_size=size, tasks=tasks,
                  server_wait_ms=server_wait_s * 1000.0, server_slots=server_slots)


def pool_size_rounds(settings: Settings, sizes: Sequence[int], *, tasks: int, rounds: int,
                     duration: float, server_wait_s: float, server_slots: int | None = None,
                     seed: int = 0,
                     on_round: Callable[[int, int, float], None] | None = None,
                     ) -> list[dict[str, Any]]:
    """Run ``run_pool_size`` for every size once per round, in a new random order each round.

    The same interleaving as ``interleaved_rounds``: a burst of load from another
    process lands on a few slices of several sizes, not on all slices of one size, and
    ``summarize`` then compares medians. Returns one record per slice with ``round``,
    ``position`` and ``started_s`` added.
    """
    if rounds < 1 or duration <= 0:
        raise ValueError("rounds must be >= 1 and duration > 0")
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with _settled_gc() as collect:
        # Unrecorded warm-up: the first transactions of a process pay for imports and caches.
        _run_coroutine(run_pool_size(settings, max(sizes), tasks=tasks, duration=duration / 2,
                                     server_wait_s=server_wait_s, server_slots=server_slots))
        plan = _shuffled_rounds([[size] for size in sizes], rounds, seed)
        for number, order in enumerate(plan, start=1):
            round_start = time.perf_counter()
            for position, size in enumerate(order):
                collect()
                started = time.perf_counter() - t0
                rec = _run_coroutine(run_pool_size(settings, size, tasks=tasks,
                                                   duration=duration,
                                                   server_wait_s=server_wait_s,
                                                   server_slots=server_slots))
                out.append({**rec, "round": number, "position": position,
                            "started_s": round(started, 3)})
            if on_round is not None:
                on_round(number, rounds, time.perf_counter() - round_start)
    return out
