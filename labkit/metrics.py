"""Pool metrics from pool events: counters, gauges, checkout waits in ms (labkit's engines only)."""

from __future__ import annotations

import functools
import time
import weakref
from threading import Lock
from typing import Any

from sqlalchemy import Engine, Pool, QueuePool, StaticPool, event
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["PoolMetrics", "timed_pool_class"]

_COUNTERS = ("connects", "closes", "checkouts", "checkins", "invalidations", "checkout_errors")
_EVENTS = tuple(zip(("connect", "close", "checkout", "checkin", "invalidate"), _COUNTERS[:5]))


class PoolMetrics:
    """Collect one engine's pool events; thread-safe, cheap enough to leave on. Counters:
    connects, closes, checkouts, checkins, invalidations (broken connections), checkout_errors
    (checkouts that raised), checkout_wait_ms_total and _max; gauges: in_use, idle, overflow,
    pool_size. On engines not made by labkit, attach before the engine serves traffic."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self._lock, self._out = engine, Lock(), 0
        self.reset()
        self._listeners = [(name, lambda *_, key=key: self.count(key)) for name, key in _EVENTS]

    @classmethod
    def attach(cls, engine: Engine | AsyncEngine) -> PoolMetrics:
        """Start collecting for ``engine`` (sync or async)."""
        metrics = cls(engine.sync_engine if isinstance(engine, AsyncEngine) else engine)
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
            self._out += 1 if key == "checkouts" else -1 if key == "checkins" else 0

    def reset(self) -> None:
        """Zero the counters."""
        with self._lock:  # the counters (int), then the waits' total and max (float)
            self._counts: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
            self._counts.update(checkout_wait_ms_total=0.0, checkout_wait_ms_max=0.0)

    def record_wait(self, ms: float, *, failed: bool) -> None:
        """Record one checkout's wait (called by labkit's pool classes)."""
        with self._lock:
            self._counts["checkout_errors"] += failed
            self._counts["checkout_wait_ms_total"] += ms
            self._counts["checkout_wait_ms_max"] = max(self._counts["checkout_wait_ms_max"], ms)

    def gauges(self) -> dict[str, int]:
        """The pool's current state: in use, idle, overflow, size (never reset)."""
        pool, lent = self.engine.pool, getattr(self.engine.pool, "labkit_lent", None)
        if isinstance(pool, QueuePool):
            return {"in_use": pool.checkedout(), "idle": pool.checkedin(),
                    "overflow": max(pool.overflow(), 0), "pool_size": pool.size()}
        in_use = max(self._out, 0) if lent is None else sum(  # labkit's pools count what they
            c.dbapi_connection is not None for c in list(lent))  # lend; others: events since attach
        return {"in_use": in_use, "idle": 0, "overflow": 0,
                "pool_size": int(isinstance(pool, StaticPool))}

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges as one flat dict (waits in ms)."""
        with self._lock:
            data = {key: round(value, 3) for key, value in self._counts.items()}
        return {**data, **self.gauges()}


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
    """Return ``pool_class`` with checkout timing: a cached subclass, same name and module."""
    return type(pool_class.__name__, (_Timed, pool_class), {"__module__": pool_class.__module__})


def install(engine: Engine) -> None:
    """Fan one engine's pool events out to its pool's collectors (labkit's engines)."""
    for name, key in _EVENTS:
        def fan_out(*_: Any, key: str = key) -> None:
            for metrics in list(engine.pool.labkit_collectors):  # type: ignore[attr-defined]
                metrics.count(key)
        event.listen(engine, name, fan_out)
