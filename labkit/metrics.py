"""Pool metrics from pool events: counters, gauges, checkout waits in ms (labkit's engines only)."""

from __future__ import annotations

import functools
import time
import weakref
from threading import Lock
from typing import Any

from sqlalchemy import Engine, Pool, QueuePool, StaticPool, event
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["CHECKINS", "CHECKOUTS", "CHECKOUT_ERRORS", "CHECKOUT_WAIT_MS_MAX",
           "CHECKOUT_WAIT_MS_TOTAL", "CLOSES", "CONNECTS", "IDLE", "INVALIDATIONS", "IN_USE",
           "OVERFLOW", "POOL_SIZE", "PoolMetrics", "timed_pool_class"]

CONNECTS, CLOSES, CHECKOUTS, CHECKINS = "connects", "closes", "checkouts", "checkins"
INVALIDATIONS, CHECKOUT_ERRORS = "invalidations", "checkout_errors"  # broken; checkouts that raised
CHECKOUT_WAIT_MS_TOTAL, CHECKOUT_WAIT_MS_MAX = "checkout_wait_ms_total", "checkout_wait_ms_max"
IN_USE, IDLE, OVERFLOW, POOL_SIZE = "in_use", "idle", "overflow", "pool_size"  # gauges
_COUNTERS = (CONNECTS, CLOSES, CHECKOUTS, CHECKINS, INVALIDATIONS, CHECKOUT_ERRORS)
_EVENTS = tuple(zip(("connect", "close", "checkout", "checkin", "invalidate"), _COUNTERS[:5]))


class PoolMetrics:
    """Collect one engine's pool events; thread-safe, cheap enough to leave on.
    On engines not made by labkit, attach before the engine serves traffic."""

    def __init__(self, engine: Engine, *, keep_waits: bool = False) -> None:
        self.engine, self.keep_waits, self._lock, self._out = engine, keep_waits, Lock(), 0
        self.reset()
        self._listeners = [(name, lambda *_, key=key: self.count(key)) for name, key in _EVENTS]

    @classmethod
    def attach(cls, engine: Engine | AsyncEngine, *, keep_waits: bool = False) -> PoolMetrics:
        """Start collecting for ``engine`` (sync or async); ``keep_waits`` keeps each wait."""
        metrics = cls(engine.sync_engine if isinstance(engine, AsyncEngine) else engine,
                      keep_waits=keep_waits)
        collectors = getattr(metrics.engine.pool, "labkit_collectors", None)
        if collectors is not None:
            collectors.add(metrics)  # labkit's engine fans its events out
        else:
            for name, fn in metrics._listeners:
                event.listen(metrics.engine, name, fn)
        return metrics

    def detach(self) -> None:
        """Stop collecting (twice is harmless); the counters keep their values."""
        for name, fn in self._listeners:
            if event.contains(self.engine, name, fn):
                event.remove(self.engine, name, fn)
        getattr(self.engine.pool, "labkit_collectors", set()).discard(self)

    def count(self, key: str) -> None:
        """Count one pool event (called by the engine's listeners)."""
        with self._lock:
            self._counts[key] += 1
            self._out += 1 if key == CHECKOUTS else -1 if key == CHECKINS else 0

    def reset(self) -> None:
        """Zero the counters and forget kept waits."""
        with self._lock:  # the counters (int), then the waits' total and max (float)
            self._counts: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
            self._counts.update(dict.fromkeys((CHECKOUT_WAIT_MS_TOTAL, CHECKOUT_WAIT_MS_MAX), 0.0))
            self._waits_ms: list[float] = []

    def record_wait(self, ms: float, *, failed: bool) -> None:
        """Record one checkout's wait (called by labkit's pool classes)."""
        with self._lock:
            self._counts[CHECKOUT_ERRORS] += failed
            self._counts[CHECKOUT_WAIT_MS_TOTAL] += ms
            self._counts[CHECKOUT_WAIT_MS_MAX] = max(self._counts[CHECKOUT_WAIT_MS_MAX], ms)
            if self.keep_waits:
                self._waits_ms.append(ms)

    def gauges(self) -> dict[str, int]:
        """The pool's current state: in use, idle, overflow, size (never reset)."""
        pool, lent = self.engine.pool, getattr(self.engine.pool, "labkit_lent", None)
        if isinstance(pool, QueuePool):
            return {IN_USE: pool.checkedout(), IDLE: pool.checkedin(),
                    OVERFLOW: max(pool.overflow(), 0), POOL_SIZE: pool.size()}
        in_use = max(self._out, 0) if lent is None else sum(  # labkit's pools count what they
            c.dbapi_connection is not None for c in list(lent))  # lend; others: events since attach
        return {IN_USE: in_use, IDLE: 0, OVERFLOW: 0, POOL_SIZE: int(isinstance(pool, StaticPool))}

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges as one flat dict (waits in ms)."""
        with self._lock:
            data = {key: round(value, 3) for key, value in self._counts.items()}
        return {**data, **self.gauges()}

    def pop_stats(self) -> dict[str, Any]:
        """Return ``snapshot()`` and reset the counters (not the gauges)."""
        data = self.snapshot()
        self.reset()
        return data

    def waits_ms(self) -> list[float]:
        """Every checkout wait since the last reset, in ms (with ``keep_waits=True``)."""
        with self._lock:
            return list(self._waits_ms)


class _Timed:
    """Pool mixin: time checkouts; keep what NullPool and StaticPool lend (they cannot count)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labkit_collectors: weakref.WeakSet[PoolMetrics] = weakref.WeakSet()
        self.labkit_lent: weakref.WeakSet[Any] | None = (
            None if isinstance(self, QueuePool) else weakref.WeakSet())

    def connect(self) -> Any:
        start, connection = (time.perf_counter() if self.labkit_collectors else None), None
        try:
            connection = super().connect()  # type: ignore[misc]
            if self.labkit_lent is not None:
                self.labkit_lent.add(connection)
            return connection
        finally:  # CancelledError too: the caller got no connection
            if start is not None:
                ms = (time.perf_counter() - start) * 1000.0
                for metrics in list(self.labkit_collectors):
                    metrics.record_wait(ms, failed=connection is None)

    def recreate(self) -> Any:
        new = super().recreate()  # type: ignore[misc]
        new.labkit_collectors = self.labkit_collectors  # dispose() keeps the collectors
        return new


@functools.cache
def timed_pool_class(pool_class: type[Pool]) -> type[Pool]:
    """Return ``pool_class`` with checkout timing: a cached subclass of the same name."""
    return type(pool_class.__name__, (_Timed, pool_class), {})


def install(engine: Engine) -> None:
    """Fan one engine's pool events out to its pool's collectors (labkit's engines)."""
    for name, key in _EVENTS:
        def fan_out(*_: Any, key: str = key) -> None:
            for metrics in list(engine.pool.labkit_collectors):  # type: ignore[attr-defined]
                metrics.count(key)
        event.listen(engine, name, fan_out)
