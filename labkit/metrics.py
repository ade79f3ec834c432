"""Pool metrics from SQLAlchemy's pool events: counters, gauges and checkout wait.

Counters only grow (checkouts, connects, invalidations...); gauges are read from the
pool when asked (in use, idle, overflow). Checkout wait is the time a caller spends
in ``pool.connect()``: zero-ish when a connection is idle in the pool, the time to open
one when the pool grows, and up to ``pool_timeout`` when the pool is exhausted.

Listeners are registered on the ``Engine`` (for an ``AsyncEngine``, on its
``sync_engine``) so they survive ``dispose()``, which replaces the pool.

Example::

    metrics = PoolMetrics.attach(engine)
    ...
    metrics.snapshot()  # {'checkouts': 120, 'in_use': 3, 'checkout_wait_ms_max': 4.1, ...}
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, QueuePool

__all__ = [
    "CHECKINS",
    "CHECKOUTS",
    "CHECKOUT_ERRORS",
    "CHECKOUT_WAIT_MS_MAX",
    "CHECKOUT_WAIT_MS_TOTAL",
    "CLOSES",
    "CONNECTS",
    "IDLE",
    "INVALIDATIONS",
    "IN_USE",
    "OVERFLOW",
    "POOL_SIZE",
    "RESETS",
    "PoolMetrics",
]

# Counter keys
CONNECTS = "connects"                      # new DBAPI connections opened
CLOSES = "closes"                          # DBAPI connections closed
CHECKOUTS = "checkouts"                    # connections handed out by the pool
CHECKINS = "checkins"                      # connections returned to the pool
RESETS = "resets"                          # rollbacks on return (reset-on-return)
INVALIDATIONS = "invalidations"            # connections discarded as broken
CHECKOUT_ERRORS = "checkout_errors"        # pool timeouts and failed connects
CHECKOUT_WAIT_MS_TOTAL = "checkout_wait_ms_total"
CHECKOUT_WAIT_MS_MAX = "checkout_wait_ms_max"
# Gauge keys
IN_USE = "in_use"
IDLE = "idle"
OVERFLOW = "overflow"
POOL_SIZE = "pool_size"

_COUNTERS = (CONNECTS, CLOSES, CHECKOUTS, CHECKINS, RESETS, INVALIDATIONS, CHECKOUT_ERRORS)


class PoolMetrics:
    """Collect one engine's pool events; thread-safe, cheap enough to leave on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._waits_ms: list[float] = []
        self.keep_waits = False

    @classmethod
    def attach(cls, engine: Engine | AsyncEngine, *, keep_waits: bool = False) -> PoolMetrics:
        """Start collecting metrics for ``engine``; returns the collector.

        ``keep_waits=True`` also keeps every checkout wait (ms) for distributions
        (see :meth:`waits_ms`); leave it off in long-running services.
        """
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        metrics = cls(sync_engine)
        metrics.keep_waits = keep_waits
        metrics._listen()
        return metrics

    # -- events --------------------------------------------------------------------
    def _listen(self) -> None:
        engine = self.engine
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "close", self._on_close)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        event.listen(engine, "reset", self._on_reset)
        event.listen(engine, "invalidate", self._on_invalidate)
        event.listen(engine, "engine_disposed", self._on_disposed)
        self._time_pool(engine.pool)

    def detach(self) -> None:
        """Stop collecting (removes the listeners)."""
        for name, fn in (("connect", self._on_connect), ("close", self._on_close),
                         ("checkout", self._on_checkout), ("checkin", self._on_checkin),
                         ("reset", self._on_reset), ("invalidate", self._on_invalidate),
                         ("engine_disposed", self._on_disposed)):
            if event.contains(self.engine, name, fn):
                event.remove(self.engine, name, fn)
        self.engine.pool.__dict__.pop("connect", None)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _on_connect(self, dbapi_conn: Any, record: Any) -> None:
        self._count(CONNECTS)

    def _on_close(self, dbapi_conn: Any, record: Any) -> None:
        self._count(CLOSES)

    def _on_checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        self._count(CHECKOUTS)

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        self._count(CHECKINS)

    def _on_reset(self, dbapi_conn: Any, record: Any, reset_state: Any) -> None:
        self._count(RESETS)

    def _on_invalidate(self, dbapi_conn: Any, record: Any, exc: Any) -> None:
        self._count(INVALIDATIONS)

    def _on_disposed(self, engine: Engine) -> None:
        # dispose() replaced the pool; time checkouts on the new one.
        self._time_pool(engine.pool)

    def _time_pool(self, pool: Pool) -> None:
        # SQLAlchemy has no "checkout requested" event, so the wait is measured
        # around this pool instance's connect(): an instance attribute, not a
        # patch of the class, so other engines are untouched.
        if "connect" in pool.__dict__:
            return
        original = pool.connect
        clock = time.perf_counter

        def connect() -> Any:
            start = clock()
            try:
                return original()
            except BaseException:
                self._count(CHECKOUT_ERRORS)
                raise
            finally:
                self._record_wait((clock() - start) * 1000.0)

        pool.connect = connect  # type: ignore[method-assign]

    def _record_wait(self, ms: float) -> None:
        with self._lock:
            self._wait_total += ms
            if ms > self._wait_max:
                self._wait_max = ms
            if self.keep_waits:
                self._waits_ms.append(ms)

    # -- reading ---------------------------------------------------------------------
    def gauges(self) -> dict[str, int]:
        """Read the pool's current state: in use, idle, overflow, size."""
        pool = self.engine.pool
        if isinstance(pool, QueuePool):
            return {IN_USE: pool.checkedout(), IDLE: pool.checkedin(),
                    OVERFLOW: pool.overflow(), POOL_SIZE: pool.size()}
        with self._lock:
            in_use = self._counts[CHECKOUTS] - self._counts[CHECKINS]
        return {IN_USE: max(in_use, 0), IDLE: 0, OVERFLOW: 0, POOL_SIZE: 0}

    def snapshot(self) -> dict[str, Any]:
        """Return counters and gauges as one flat dict (wait times in ms)."""
        with self._lock:
            data: dict[str, Any] = {key: self._counts[key] for key in _COUNTERS}
            data[CHECKOUT_WAIT_MS_TOTAL] = round(self._wait_total, 3)
            data[CHECKOUT_WAIT_MS_MAX] = round(self._wait_max, 3)
        data.update(self.gauges())
        return data

    def pop_stats(self) -> dict[str, Any]:
        """Return :meth:`snapshot` and reset the counters (gauges are not reset)."""
        data = self.snapshot()
        self.reset()
        return data

    def reset(self) -> None:
        """Zero the counters and forget kept waits."""
        with self._lock:
            self._counts.clear()
            self._wait_total = 0.0
            self._wait_max = 0.0
            self._waits_ms.clear()

    def waits_ms(self) -> list[float]:
        """Every checkout wait since the last reset, in ms (needs ``keep_waits=True``)."""
        with self._lock:
            return list(self._waits_ms)
