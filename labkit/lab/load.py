"""Load generators: N concurrent workers (threads or asyncio tasks) against an engine.

Each operation is recorded: which worker ran it, when it started, when it got its pooled
connection (checkout done), when it released that connection, when it ended, and whether
it succeeded (with the error class when not). That is what the request timeline
(``charts.request_timeline``) draws: waiting for a connection, then using it. Runs last
for a ``duration`` (seconds) or a ``count`` of operations per worker, whichever is given.

Progress of long runs goes to standard output (in a Jupyter kernel: one line updated in
place), never to standard error, so published notebooks show no error-coloured blocks.

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
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from labkit.errors import translate_error
from labkit.lab.stats import percentile

__all__ = ["LoadResult", "OpRecord", "run_async_load", "run_sync_load", "timed_operation"]


@dataclass(frozen=True)
class OpRecord:
    """One operation; times in seconds since the run started, wait in ms.

    Attributes:
        worker: Which worker (thread or task) ran it, from 0.
        start: When it asked the pool for a connection.
        end: When it finished, connection returned (or when it failed).
        wait_ms: Time spent waiting for the connection (until the checkout failed, when
            it did).
        ok: Whether it succeeded.
        error: The labkit error class name of a failure (``"PoolTimeoutError"``...).
        got: When the pool handed it a connection; ``None`` if the checkout failed.
        released: When its work was done (committed or rolled back), just before the
            connection went back to the pool; ``None`` if it never got one. Taken before
            the return, so that two operations on one connection never overlap in time.
    """

    worker: int
    start: float
    end: float
    wait_ms: float
    ok: bool
    error: str | None = None
    got: float | None = None
    released: float | None = None

    @property
    def latency_ms(self) -> float:
        """The whole operation, waiting included, in ms."""
        return (self.end - self.start) * 1000.0

    @property
    def checkout_failed(self) -> bool:
        """True when the operation never got a connection (pool timeout, failed connect)."""
        return not self.ok and self.got is None


@dataclass
class LoadResult:
    """All operations of one run, with the summaries the notebooks chart."""

    label: str
    workers: int
    elapsed: float
    ops: list[OpRecord] = field(default_factory=list)
    t0: float = math.nan
    """``time.perf_counter()`` when the run started: the origin of the ops' times."""

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

    def concurrency(self) -> tuple[list[float], list[int], list[int]]:
        """Count, at every event of the run, the connections in use and the requests waiting.

        A connection counts as in use from ``got`` to ``released`` of the operation
        holding it; a request waits from ``start`` until ``got`` (or until its checkout
        failed). Both are step functions of time, exact rather than sampled.

        Returns:
            ``(times in s, in use, waiting)``, starting at 0 with nothing in use; draw
            them as steps (``where="post"``).
        """
        events: list[tuple[float, int, int, int]] = []  # (time, order, d_in_use, d_waiting)
        for op in self.ops:
            events.append((op.start, 1, 0, 1))
            if op.got is None:
                events.append((op.end, 0, 0, -1))
            else:
                events.append((op.got, 1, 1, -1))
                events.append((op.released if op.released is not None else op.end, 0, -1, 0))
        events.sort()  # at equal times releases (order 0) come before checkouts
        times, in_use, waiting = [0.0], [0], [0]
        for t, _, d_use, d_wait in events:
            times.append(t)
            in_use.append(in_use[-1] + d_use)
            waiting.append(waiting[-1] + d_wait)
        return times, in_use, waiting

    def percentile_ms(self, q: float, *, of: str = "latency") -> float:
        """Percentile (0-100) of ``latency`` (whole op) or ``wait`` (checkout) in ms.

        The one percentile of the lab: ``labkit.lab.stats.percentile`` (interpolated).
        """
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


def _record(worker: int, t0: float, start: float, got: float | None, released: float | None,
            end: float, error: BaseException | None = None) -> OpRecord:
    """One operation's record (perf_counter times in); a failure keeps its labkit class name."""
    wait = (got if got is not None else end) - start
    return OpRecord(worker, start - t0, end - t0, wait * 1000.0, error is None,
                    None if error is None else type(translate_error(error)).__name__,
                    None if got is None else got - t0,
                    None if released is None else released - t0)


def timed_operation(engine: Engine, work: Callable[[Connection], Any], worker: int,
                    t0: float) -> OpRecord:
    """Check out a connection, run ``work`` in a transaction, return it; record each moment.

    Failures are recorded (with their labkit class), not raised: a load run charts them.
    """
    clock = time.perf_counter
    start = clock()
    got: float | None = None
    released: float | None = None
    try:
        with engine.connect() as conn:
            got = clock()
            try:
                with conn.begin():
                    work(conn)
            finally:
                released = clock()
        return _record(worker, t0, start, got, released, clock())
    except Exception as exc:  # noqa: BLE001 - recorded for the chart
        return _record(worker, t0, start, got, released, clock(), exc)


def _check_budget(duration: float | None, count: int | None) -> None:
    if (duration is None) == (count is None):
        raise ValueError("give exactly one of duration (seconds) or count (ops per worker)")
    if duration is not None and duration <= 0 or count is not None and count <= 0:
        raise ValueError("duration and count must be > 0")


class _Progress:
    """Progress of a long run on standard output, so a learner sees a long cell working.

    Nothing for the first ``every`` seconds (short runs stay silent). In a Jupyter kernel
    it is one line updated in place, which the executed notebook keeps as its final state;
    elsewhere a line every ``every`` seconds. Never standard error: the published pages
    would show it as an error block.
    """

    def __init__(self, label: str, expected: float | None, every: float = 2.0) -> None:
        self.label, self.expected, self.every = label, expected, every
        self.start = time.monotonic()
        self.last = self.start
        self.handle: Any = None
        self.shown = False

    def _line(self, now: float, done: int, finished: bool = False) -> str:
        if finished:
            return f"  {self.label}: done, {done} ops in {now - self.start:.1f} s"
        total = f"/{self.expected:.0f} s" if self.expected else " s"
        return f"  {self.label}: {now - self.start:.0f}{total} elapsed, {done} ops"

    def _show(self, line: str) -> None:
        if not self.shown:
            self.shown = True
            self.handle = _kernel_display(line)
            if self.handle is not None:
                return
        if self.handle is not None:
            self.handle.update({"text/plain": line}, raw=True)
        else:
            print(line, flush=True)

    def tick(self, done: int) -> None:
        now = time.monotonic()
        # once a line is on screen and updates in place, refresh it every second
        every = 1.0 if self.handle is not None else self.every
        if now - self.last >= every:
            self.last = now
            self._show(self._line(now, done))

    def finish(self, done: int) -> None:
        """Turn the in-place line into the run's summary (nothing if none was shown)."""
        if self.handle is not None:
            self.handle.update({"text/plain": self._line(time.monotonic(), done, True)},
                               raw=True)


def _kernel_display(line: str) -> Any:
    """Show ``line`` as an updatable display in a Jupyter kernel; ``None`` elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return None
    return display({"text/plain": line}, raw=True, display_id=True)


def run_sync_load(engine: Engine, work: Callable[[Connection], Any], *, workers: int,
                  duration: float | None = None, count: int | None = None,
                  label: str = "sync", think_time: float = 0.0,
                  progress: bool = True) -> LoadResult:
    """Run ``work(conn)`` from ``workers`` threads and record every operation.

    Each operation checks a connection out of ``engine``'s pool, runs ``work`` in a
    transaction committed at the end, and gives the connection back. Failures (a pool
    timeout, a broken connection, an error in ``work``) are recorded, not raised.

    Args:
        engine: The engine whose pool the workers share.
        work: What one operation does with its connection.
        workers: Number of threads.
        duration: Seconds to run (give this or ``count``).
        count: Operations per worker (give this or ``duration``).
        label: Name of the run in its summary and progress line.
        think_time: Seconds each worker sleeps between its operations.
        progress: Show progress on standard output for runs longer than 2 s.

    Returns:
        The run's ``LoadResult``, its ``ops`` sorted by start time.
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
            rec = timed_operation(engine, work, n, t0)
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
    if meter:
        meter.finish(len(ops))
    return LoadResult(label, workers, clock() - t0, sorted(ops, key=lambda o: o.start), t0)


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
            got: float | None = None
            released: float | None = None
            try:
                async with engine.connect() as conn:
                    got = clock()
                    try:
                        async with conn.begin():
                            await work(conn)
                    finally:
                        released = clock()
                rec = _record(n, t0, start, got, released, clock())
            except Exception as exc:  # noqa: BLE001 - recorded for the chart
                rec = _record(n, t0, start, got, released, clock(), exc)
            ops.append(rec)
            done += 1
            if meter:
                meter.tick(len(ops))
            if think_time:
                await asyncio.sleep(think_time)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    if meter:
        meter.finish(len(ops))
    return LoadResult(label, workers, clock() - t0, sorted(ops, key=lambda o: o.start), t0)
