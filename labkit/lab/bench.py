"""Benchmark clients: the same short read transaction, one layer at a time.

The workload: check out a connection, ``SELECT`` one row by primary key from a seeded
table, commit, return the connection. Each client runs it from ``concurrency`` workers
for ``duration`` seconds and returns a record::

    {"client": "labkit session (async)", "concurrency": 8, "tps": 3100.0,
     "p50_ms": 2.4, "p99_ms": 6.0, "transactions": 9300, "duration_s": 3.0}

Clients, from the bottom up: ``pgbench`` (C, the ceiling), raw asyncpg pool, raw psycopg2
(one connection per thread), SQLAlchemy Core, SQLAlchemy ORM session (sync and async), and
labkit's session scope (sync and async). Used by ``benchmarks/run.py`` (``make bench``) and
notebooks 05 and 06.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

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
from labkit.lab.load import percentile

__all__ = [
    "ASYNC_CLIENTS",
    "ROWS",
    "SYNC_CLIENTS",
    "BenchItem",
    "record",
    "run_async_client",
    "run_pgbench",
    "run_sync_client",
    "iter_plan",
    "overheads",
    "progress",
    "seed",
]

ROWS = 10_000
TABLE = "bench_items"
SELECT_SQL = f"SELECT id, name FROM {TABLE} WHERE id = :id"


class _Base(DeclarativeBase):
    pass


class BenchItem(_Base):
    """The seeded row the workload reads."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


def seed(url: URL, rows: int = ROWS) -> None:
    """Create and fill the benchmark table (idempotent)."""
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


def _bench_pool(concurrency: int) -> PoolProfile:
    # The same pool for every SQLAlchemy-based client: one connection per worker, no
    # pre-ping (its cost is measured on its own), so only the layers differ.
    return DEVELOPMENT_POOL.replace(pool_size=concurrency, max_overflow=0, pool_pre_ping=False)


# --- sync clients -----------------------------------------------------------------------

def _psycopg2_worker(url: URL) -> Callable[[], Callable[[int], None]]:
    import psycopg2

    def make() -> Callable[[int], None]:
        conn = psycopg2.connect(host=url.host, port=url.port, user=url.username,
                                password=url.password, dbname=url.database)
        cur = conn.cursor()

        def op(key: int) -> None:
            cur.execute(f"SELECT id, name FROM {TABLE} WHERE id = %s", (key,))
            cur.fetchone()
            conn.commit()

        op.close = conn.close  # type: ignore[attr-defined]
        return op

    return make


def _sync_client(url: URL, client: str,
                 concurrency: int) -> tuple[Callable[[], Callable[[int], None]], Any]:
    """Return (a factory of per-worker operations, the engine to dispose or None)."""
    if client == "psycopg2 raw (threads)":
        return _psycopg2_worker(url), None
    engine = create_engine(Settings(url=url, application_name="labkit-bench"),
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
    if client not in ops:
        engine.dispose()
        raise ValueError(f"unknown sync client {client!r}")
    op = ops[client]
    return (lambda: op), engine


SYNC_CLIENTS = ["psycopg2 raw (threads)", "SQLAlchemy Core (sync)",
                "SQLAlchemy ORM session (sync)", "labkit session_scope (sync)"]


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
    deadline[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for op in ops:
        getattr(op, "close", lambda: None)()
    if engine is not None:
        engine.dispose()
    return record(client, concurrency, [x for xs in latencies for x in xs], elapsed)


# --- async clients -----------------------------------------------------------------------

ASYNC_CLIENTS = ["asyncpg raw (pool)", "SQLAlchemy ORM session (async)",
                 "labkit async_session_scope (async)"]


async def run_async_client(url: URL, client: str, concurrency: int,
                           duration: float) -> dict[str, Any]:
    """Run one async client from ``concurrency`` tasks for ``duration`` seconds."""
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
    else:
        engine = create_async_engine(Settings(url=url, application_name="labkit-bench"),
                                     pool=_bench_pool(concurrency))
        closers.append(engine.dispose)
        factory = create_async_sessionmaker(engine)
        orm_stmt = select(BenchItem)
        if client == "SQLAlchemy ORM session (async)":
            async def op(key: int) -> None:
                async with factory.begin() as session:
                    (await session.scalars(orm_stmt.where(BenchItem.id == key))).first()
        elif client == "labkit async_session_scope (async)":
            async def op(key: int) -> None:
                async with async_session_scope(factory) as session:
                    (await session.scalars(orm_stmt.where(BenchItem.id == key))).first()
        else:
            raise ValueError(f"unknown async client {client!r}")
    await asyncio.gather(*(op(1) for _ in range(concurrency)))  # warm the pool
    latencies: list[float] = []
    clock = time.perf_counter
    deadline = clock() + duration

    async def worker(i: int) -> None:
        rnd = random.Random(i)
        while (t := clock()) < deadline:
            await op(rnd.randint(1, ROWS))
            latencies.append(clock() - t)

    t0 = clock()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = clock() - t0
    for close in closers:
        await close()
    return record(client, concurrency, latencies, elapsed)


# --- pgbench ---------------------------------------------------------------------------------

def run_pgbench(url: URL, bin_dir: Path, concurrency: int, duration: float, *,
                select_only: bool = False) -> dict[str, Any]:
    """Run pgbench (the C client) on the same transaction, or ``-S`` for reference."""
    env = {**os.environ, "PGPASSWORD": str(url.password or "")}
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(bin_dir / "pgbench"), "-n", "-c", str(concurrency),
                "-j", str(min(concurrency, os.cpu_count() or 1)), "-T", str(max(1, round(duration))),
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
    name = "pgbench -S (autocommit, reference)" if select_only else "pgbench (C, same transaction)"
    return record(name, concurrency, latencies, elapsed)


# --- overheads -----------------------------------------------------------------------------

def _median_ms(fn: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000.0)
    return percentile(samples, 50)


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
    """Every (client, concurrency) pair of a full run, pgbench first."""
    clients = ["pgbench", *SYNC_CLIENTS, *ASYNC_CLIENTS]
    return [(c, n) for n in concurrencies for c in clients]
