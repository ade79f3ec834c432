"""The knee: throughput and latency against pool size when the server is the limit.

A closed loop with as many threads as the pool has connections, so that every
connection is always busy: the pool size *is* the concurrency the server sees. Each
size runs a fixed number of transactions (split evenly over its threads), not a fixed
time, so that a slow moment costs time rather than samples. Two kinds of work, both
limited by the server rather than by the pool:

- ``cpu_work``: a statement that keeps a server core busy (summing a
  ``generate_series``): the server can run as many at once as it has cores;
- ``hot_row_work``: every transaction updates the same row, so they queue for its
  lock, and the lock is held until the client's COMMIT arrives.

Sizes run in interleaved rounds (every size once per round, in a new random order), as
in ``labkit.lab.bench``: a burst of load from another process then spoils a slice of
several sizes rather than the only run of one.

Example:
    ```python
    records = knee_rounds(settings, [1, 2, 4, 8], {"CPU-bound": cpu_work()},
                          transactions=200, rounds=3)
    summarize_knee(records)["CPU-bound"][4]["tps"]
    ```
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, text

from labkit.config import Settings
from labkit.engine import create_engine
from labkit.lab.load import run_sync_load
from labkit.lab.stats import percentile

__all__ = ["HOT_ROW_TABLE", "cpu_work", "create_hot_row", "hot_row_work", "knee_rounds",
           "summarize_knee"]

HOT_ROW_TABLE = "labkit_hot_row"


def cpu_work(rows: int = 20_000) -> Callable[[Connection], Any]:
    """Return a ``work`` function that keeps one server core busy for a moment.

    ``SELECT sum(i) FROM generate_series(1, rows)``: a few milliseconds of CPU on the
    server for ``rows=20_000``, a few bytes over the wire, no lock, no disk.
    """
    statement = text("SELECT sum(i) FROM generate_series(1, :rows) AS i").bindparams(rows=rows)

    def work(conn: Connection) -> None:
        conn.execute(statement).scalar_one()

    return work


def create_hot_row(engine: Engine, table: str = HOT_ROW_TABLE, *, rows: int = 1) -> None:
    """Create ``table`` with ``rows`` rows (ids 1..rows), if it is not there yet."""
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE IF NOT EXISTS {table} "
                          "(id int PRIMARY KEY, n bigint NOT NULL)"))
        conn.execute(text(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, :rows) g "
                          "ON CONFLICT (id) DO NOTHING"), {"rows": rows})


def hot_row_work(table: str = HOT_ROW_TABLE, *, rows: int = 1, durable: bool = True
                 ) -> Callable[[Connection], Any]:
    """Return a ``work`` function that increments one row of ``table`` (``create_hot_row``):
    row 1 when ``rows=1`` (the hot row), else one of ``rows`` at random (the control).

    The row stays locked from the UPDATE until the COMMIT that follows it, a round trip
    later: transactions on one row run one at a time, whatever the pool size. ``durable=False``
    sets ``synchronous_commit = off`` for the transaction, so that the COMMIT does not wait
    for the disk and the lock, not the disk, is what the transactions queue for.
    """
    statement = text(f"UPDATE {table} SET n = n + 1 WHERE id = :id")
    no_sync = text("SET LOCAL synchronous_commit = off")
    pick = random.Random(rows)

    def work(conn: Connection) -> None:
        if not durable:
            conn.execute(no_sync)
        conn.execute(statement, {"id": 1 if rows == 1 else pick.randint(1, rows)})

    return work


def _open_all(engine: Engine, size: int) -> None:
    """Open ``size`` pooled connections at once (threads), so the run starts warm."""
    held: list[Any] = []
    lock = threading.Lock()

    def take() -> None:
        conn = engine.connect()
        with lock:
            held.append(conn)

    threads = [threading.Thread(target=take) for _ in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for conn in held:
        conn.close()


def knee_rounds(settings: Settings, sizes: Sequence[int],
                workloads: Mapping[str, Callable[[Connection], Any]], *, transactions: int,
                rounds: int, seed: int = 0,
                on_round: Callable[[int, int, float], None] | None = None,
                ) -> list[dict[str, Any]]:
    """Run each workload on pools of each size, as many threads as connections.

    Every slice (one workload, one size, once) gets a new engine whose pool is opened
    before the clock starts (``max_overflow=0``, no pre-ping), and runs
    ``transactions // size`` transactions per thread.

    Args:
        settings: Where to connect; its pool profile is the base of every pool.
        sizes: Pool sizes (= threads) to compare.
        workloads: ``{name: work}``, e.g. ``cpu_work()`` and ``hot_row_work()``.
        transactions: Transactions per slice, split over the threads.
        rounds: Recorded rounds (an unrecorded warm-up slice of each workload comes first).
        seed: Seed of the random order.
        on_round: Called after each round with ``(round, rounds, seconds it took)``.

    Returns:
        One record per slice: ``workload``, ``size``, ``round``, ``transactions``,
        ``errors``, ``elapsed_s``, ``tps``, ``p50_ms``, ``p99_ms`` (latency of a whole
        transaction, checkout included).
    """
    if rounds < 1 or transactions < max(sizes):
        raise ValueError("rounds must be >= 1 and transactions >= the largest size")
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []

    def one(name: str, size: int) -> dict[str, Any]:
        engine = create_engine(
            settings.replace(application_name=f"{settings.application_name or 'labkit'}-knee"),
            pool=settings.pool.replace(pool_size=size, max_overflow=0, pool_timeout=60,
                                       pool_pre_ping=False))
        try:
            _open_all(engine, size)
            run = run_sync_load(engine, workloads[name], workers=size,
                                count=max(1, transactions // size), label=f"{name}, {size}",
                                progress=False)
        finally:
            engine.dispose()
        return {"workload": name, "size": size, "transactions": len(run.ops),
                "errors": sum(run.errors.values()), "elapsed_s": run.elapsed,
                "tps": run.tps, "p50_ms": run.percentile_ms(50),
                "p99_ms": run.percentile_ms(99)}

    for name in workloads:  # warm-up: caches, buffers, the first statements' planning
        one(name, min(sizes))
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        plan = [(name, size) for name in workloads for size in sizes]
        rng.shuffle(plan)
        for name, size in plan:
            out.append({**one(name, size), "round": number})
        if on_round is not None:
            on_round(number, rounds, time.perf_counter() - started)
    return out


def summarize_knee(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Medians over rounds: ``{workload: {size: {"tps", "tps_q1", "tps_q3", "p50_ms",
    "p99_ms", "errors"}}}``, sizes ascending."""
    groups: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for rec in records:
        groups.setdefault(rec["workload"], {}).setdefault(rec["size"], []).append(rec)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, by_size in groups.items():
        out[name] = {}
        for size in sorted(by_size):
            group = by_size[size]
            tps = [r["tps"] for r in group]
            out[name][size] = {
                "tps": statistics.median(tps), "tps_q1": percentile(tps, 25),
                "tps_q3": percentile(tps, 75),
                "p50_ms": statistics.median(r["p50_ms"] for r in group),
                "p99_ms": statistics.median(r["p99_ms"] for r in group),
                "errors": sum(r["errors"] for r in group)}
    return out
