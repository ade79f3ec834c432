"""Load generators: N concurrent workers (threads or asyncio tasks) against an engine.

Each operation is recorded: when it started and ended, how long it waited for a pooled
connection, and whether it succeeded (with the error class when not). Runs last for a
``duration`` (seconds) or a ``count`` of operations per worker, whichever is given.

Example:
    ```python
    result = run_sync_load(engine, lambda conn: conn.execute(text("SELECT 1")),
                           workers=8, duration=2.0)
    result.tps, result.percentile_ms(99), result.errors
    ```
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from labkit.errors import translate_error

__all__ = ["LoadResult", "OpRecord", "percentile", "run_async_load", "run_sync_load"]


@dataclass(frozen=True)
class OpRecord:
    """One operation; times in seconds since the run started, wait in ms."""

    worker: int
    start: float
    end: float
    wait_ms: float
    ok: bool
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1000.0


def percentile(values: list[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) by the nearest-rank method; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class LoadResult:
    """All operations of one run, with the summaries the notebooks chart."""

    label: str
    workers: int
    elapsed: float
    ops: list[OpRecord] = field(default_factory=list)

    @property
    def ok_ops(self) -> list[OpRecord]:
        return [op for op in self.ops if op.ok]

    @property
    def tps(self) -> float:
        """Successful operations per second."""
        return len(self.ok_ops) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def errors(self) -> Counter[str]:
        """Failed operations by error class."""
        return Counter(op.error or "?" for op in self.ops if not op.ok)

    @property
    def waits_ms(self) -> list[float]:
        return [op.wait_ms for op in self.ops]

    @property
    def latencies_ms(self) -> list[float]:
        return [op.latency_ms for op in self.ok_ops]

    def percentile_ms(self, q: float, *, of: str = "latency") -> float:
        """Percentile of ``latency`` (whole op) or ``wait`` (checkout) in ms."""
        return percentile(self.latencies_ms if of == "latency" else self.waits_ms, q)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label, "workers": self.workers, "ops": len(self.ops),
            "errors": sum(self.errors.values()), "tps": round(self.tps, 1),
            "p50_ms": round(self.percentile_ms(50), 3), "p99_ms": round(self.percentile_ms(99), 3),
            "wait_p50_ms": round(self.percentile_ms(50, of="wait"), 3),
            "wait_p99_ms": round(self.percentile_ms(99, of="wait"), 3),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"<LoadResult {s['label']!r}: {s['ops']} ops by {s['workers']} workers in "
                f"{self.elapsed:.2f} s, {s['tps']} ops/s, p50 {s['p50_ms']} ms, "
                f"p99 {s['p99_ms']} ms, errors {dict(self.errors)}>")


def _record(worker: int, t0: float, start: float, wait: float, end: float,
            error: BaseException | None = None) -> OpRecord:
    """One operation's record; a failure keeps its labkit error class name."""
    return OpRecord(worker, start - t0, end - t0, wait * 1000.0, error is None,
                    None if error is None else type(translate_error(error)).__name__)


def _check_budget(duration: float | None, count: int | None) -> None:
    if (duration is None) == (count is None):
        raise ValueError("give exactly one of duration (seconds) or count (ops per worker)")
    if duration is not None and duration <= 0 or count is not None and count <= 0:
        raise ValueError("duration and count must be > 0")


class _Progress:
    """One line on stderr every few seconds for runs long enough to need it."""

    def __init__(self, label: str, expected: float | None, every: float = 2.0) -> None:
        self.label, self.expected, self.every = label, expected, every
        self.start = time.monotonic()
        self.last = self.start

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            total = f"/{self.expected:.0f} s" if self.expected else ""
            print(f"  {self.label}: {now - self.start:.0f}{total or ' s'} elapsed, "
                  f"{done} ops", file=sys.stderr, flush=True)


def run_sync_load(engine: Engine, work: Callable[[Connection], Any], *, workers: int,
                  duration: float | None = None, count: int | None = None,
                  label: str = "sync", think_time: float = 0.0,
                  progress: bool = True) -> LoadResult:
    """Run ``work(conn)`` from ``workers`` threads, each op on a freshly checked-out
    connection committed at the end (``engine.begin()``); failures are recorded, not raised.
    """
    _check_budget(duration, count)
    ops: list[OpRecord] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + duration if duration is not None else math.inf
    clock = time.perf_counter

    def worker(n: int) -> None:
        done = 0
        while (count is None or done < count) and clock() < deadline:
            start = clock()
            wait = 0.0
            try:
                with engine.connect() as conn:
                    wait = clock() - start
                    with conn.begin():
                        work(conn)
                rec = _record(n, t0, start, wait, clock())
            except Exception as exc:  # noqa: BLE001 - recorded for the chart
                rec = _record(n, t0, start, wait or clock() - start, clock(), exc)
            with lock:
                ops.append(rec)
            done += 1
            if think_time:
                time.sleep(think_time)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    meter = _Progress(label, duration) if progress else None
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.2)
        if meter:
            meter.tick(len(ops))
    result = LoadResult(label, workers, time.perf_counter() - t0, sorted(ops, key=lambda o: o.start))
    return result


async def run_async_load(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[Any]],
                         *, workers: int, duration: float | None = None,
                         count: int | None = None, label: str = "async",
                         think_time: float = 0.0, progress: bool = True) -> LoadResult:
    """Async twin of ``run_sync_load``: ``workers`` tasks on one event loop."""
    _check_budget(duration, count)
    ops: list[OpRecord] = []
    clock = time.perf_counter
    t0 = clock()
    deadline = t0 + duration if duration is not None else math.inf
    meter = _Progress(label, duration) if progress else None

    async def worker(n: int) -> None:
        done = 0
        while (count is None or done < count) and clock() < deadline:
            start = clock()
            wait = 0.0
            try:
                async with engine.connect() as conn:
                    wait = clock() - start
                    async with conn.begin():
                        await work(conn)
                rec = _record(n, t0, start, wait, clock())
            except Exception as exc:  # noqa: BLE001 - recorded for the chart
                rec = _record(n, t0, start, wait or clock() - start, clock(), exc)
            ops.append(rec)
            done += 1
            if meter:
                meter.tick(len(ops))
            if think_time:
                await asyncio.sleep(think_time)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return LoadResult(label, workers, clock() - t0, sorted(ops, key=lambda o: o.start))
