"""Pool metrics from SQLAlchemy's pool events: counters, gauges and checkout wait.

Counters only grow (checkouts, connects, invalidations...); gauges are read from the
pool when asked (in use, idle, overflow). Checkout wait is the time a caller spends
in ``pool.connect()``: zero-ish when a connection is idle in the pool, the time to open
one when the pool grows, and up to ``pool_timeout`` when the pool is exhausted.

Listeners are registered on the ``Engine`` (for an ``AsyncEngine``, on its
``sync_engine``) so they survive ``dispose()``, which replaces the pool. Any number of
collectors can watch one engine; each counts everything, and detaching one leaves the
others untouched: one set of listeners and one checkout timer per engine report every
event to all of its collectors.

Example:
    ```python
    metrics = PoolMetrics.attach(engine)
    ...
    metrics.snapshot()  # {'checkouts': 120, 'in_use': 3, 'checkout_wait_ms_max': 4.1, ...}
    metrics.detach()
    ```
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, PoolProxiedConnection, PoolResetState, QueuePool
from sqlalchemy.pool.base import ResetStyle

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
RESETS = "resets"                          # rollbacks/commits run by reset-on-return
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
    """Collect one engine's pool events; thread-safe, cheap enough to leave on.

    Counters (keys are the module's constants):

    - ``connects`` / ``closes``: DBAPI connections opened / closed.
    - ``checkouts`` / ``checkins``: connections lent out by the pool / given back.
    - ``resets``: returned connections on which the pool's reset-on-return ran a
      ``rollback()`` (or, with ``pool_reset_on_return="commit"``, a ``commit()``).
      Always 0 with ``pool_reset_on_return=None``. A SQLAlchemy ``Connection`` closed
      inside a transaction rolls it back itself, and SQLAlchemy then skips the pool's
      rollback, so such a return is not counted; a raw DBAPI connection
      (``engine.raw_connection()``) returned mid-transaction relies on this reset alone.
      psycopg2 and asyncpg send nothing to the server for a rollback with no
      transaction open, so a count here is not always a round trip.
    - ``invalidations``: connections discarded as broken.
    - ``checkout_errors``: checkouts that raised (pool timeout, failed connect).

    Use ``attach`` to create one; several collectors on the same engine are independent.
    The engine holds its collectors only weakly: keep a reference to the collector for as
    long as you read it.
    """

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
        """Start collecting metrics for ``engine`` and return the collector.

        The first collector on an engine adds SQLAlchemy listeners to it, and the last
        one to detach removes them. SQLAlchemy does not allow its listeners to change
        while other threads run those events, so attach that first collector before
        the engine serves traffic (and detach the last one after); further collectors
        attach and detach at any time without touching SQLAlchemy's listeners.

        Args:
            engine: A sync ``Engine`` or an ``AsyncEngine`` (its ``sync_engine`` is used).
            keep_waits: Also keep every checkout wait (ms) for distributions (see
                ``waits_ms``); leave it off in long-running services.

        Returns:
            A collector that counts from now on, independent of any other collector on
            the same engine.
        """
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        metrics = cls(sync_engine)
        metrics.keep_waits = keep_waits
        _EngineHub.register(sync_engine, metrics)
        return metrics

    def detach(self) -> None:
        """Stop collecting; other collectors on the same engine keep counting.

        Calling it twice is harmless. The counters keep their values.
        """
        _EngineHub.unregister(self.engine, self)

    # -- recording (called by the engine's hub) ---------------------------------------
    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _record_checkout(self, ms: float, *, failed: bool) -> None:
        with self._lock:
            if failed:
                self._counts[CHECKOUT_ERRORS] += 1
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
        """Return ``snapshot()`` and reset the counters (gauges are not reset)."""
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
        """Return every checkout wait since the last reset, in ms (needs ``keep_waits=True``)."""
        with self._lock:
            return list(self._waits_ms)


def _pool_will_reset(pool: Pool, state: PoolResetState) -> bool:
    """Tell whether the pool is about to roll back (or commit) a returned connection.

    The ``reset`` event fires before SQLAlchemy decides; this mirrors that decision in
    SQLAlchemy 2.x (``_ConnectionFairy._reset``): nothing when the connection cannot be
    touched (``asyncio_safe`` false: an async connection being garbage collected), a
    commit for ``"commit"``, and a rollback for ``"rollback"`` unless the ``Connection``
    already rolled back inline (``transaction_was_reset``). SQLAlchemy keeps the setting
    only in the pool's private ``_reset_on_return``; every pool made by ``recreate()``
    (that is, by ``dispose()``) carries the same value.
    """
    if not state.asyncio_safe:
        return False
    style = getattr(pool, "_reset_on_return", None)
    if style is ResetStyle.reset_commit:
        return True
    return style is ResetStyle.reset_rollback and not state.transaction_was_reset


class _TimedConnect:
    """Stand-in for one pool's ``connect()`` that reports each wait to a hub."""

    __slots__ = ("hub", "original", "had_own", "__weakref__")

    def __init__(self, hub: _EngineHub, original: Any, *, had_own: bool) -> None:
        self.hub: _EngineHub | None = hub
        self.original = original
        self.had_own = had_own  # the pool already had an instance-level connect()

    def __call__(self) -> PoolProxiedConnection:
        hub = self.hub
        if hub is None or not hub.targets:
            return self.original()
        start = time.perf_counter()
        failed = False
        try:
            return self.original()
        except BaseException:
            # CancelledError and KeyboardInterrupt too: the caller got no connection.
            failed = True
            raise
        finally:
            hub.record_checkout((time.perf_counter() - start) * 1000.0, failed=failed)


class _EngineHub:
    """One engine's pool listeners and checkout timer, fanned out to its collectors.

    SQLAlchemy's listeners are added once, with the first collector, and removed with
    the last, so that collectors in between come and go without changing SQLAlchemy's
    listener lists (which must not change while those events run in other threads).

    SQLAlchemy has no "checkout requested" event, so the wait is measured around the
    pool instance's ``connect()``: an instance attribute, not a patch of the class, so
    other engines are untouched. It is moved to the new pool when ``dispose()``
    replaces the pool.

    The hub holds everything weakly (collectors, engine, pool, the stand-in
    ``connect()``): nothing in it may lead back to the engine, or the registry's weak
    key would never die.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)
        # Replaced, never mutated, so that the event paths read it without a lock.
        self.targets: tuple[weakref.ref[PoolMetrics], ...] = ()
        self._installed: tuple[weakref.ref[Pool], weakref.ref[_TimedConnect]] | None = None

    @classmethod
    def register(cls, engine: Engine, metrics: PoolMetrics) -> None:
        with _HUBS_LOCK:
            hub = _HUBS.get(engine)
            if hub is None:
                hub = _HUBS[engine] = cls(engine)
                for name, fn in hub._listeners():
                    event.listen(engine, name, fn)
            alive = tuple(ref for ref in hub.targets if ref() is not None)
            hub.targets = (*alive, weakref.ref(metrics))
            hub._install(engine.pool)

    @classmethod
    def unregister(cls, engine: Engine, metrics: PoolMetrics) -> None:
        with _HUBS_LOCK:
            hub = _HUBS.get(engine)
            if hub is None:
                return
            hub.targets = tuple(ref for ref in hub.targets
                                if ref() is not None and ref() is not metrics)
            if hub.targets:
                return
            hub._uninstall()
            for name, fn in hub._listeners():
                if event.contains(engine, name, fn):
                    event.remove(engine, name, fn)
            del _HUBS[engine]

    def _listeners(self) -> tuple[tuple[str, Any], ...]:
        return (("connect", self._on_connect), ("close", self._on_close),
                ("checkout", self._on_checkout), ("checkin", self._on_checkin),
                ("reset", self._on_reset), ("invalidate", self._on_invalidate),
                ("engine_disposed", self._on_disposed))

    # -- fan-out ----------------------------------------------------------------------
    def _fan_out(self, key: str) -> None:
        for ref in self.targets:
            metrics = ref()
            if metrics is not None:
                metrics._count(key)

    def record_checkout(self, ms: float, *, failed: bool) -> None:
        for ref in self.targets:
            metrics = ref()
            if metrics is not None:
                metrics._record_checkout(ms, failed=failed)

    def _on_connect(self, dbapi_conn: Any, record: Any) -> None:
        self._fan_out(CONNECTS)

    def _on_close(self, dbapi_conn: Any, record: Any) -> None:
        self._fan_out(CLOSES)

    def _on_checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        self._fan_out(CHECKOUTS)

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        self._fan_out(CHECKINS)

    def _on_reset(self, dbapi_conn: Any, record: Any, reset_state: PoolResetState) -> None:
        engine = self._engine()
        if engine is not None and _pool_will_reset(engine.pool, reset_state):
            self._fan_out(RESETS)

    def _on_invalidate(self, dbapi_conn: Any, record: Any, exc: Any) -> None:
        self._fan_out(INVALIDATIONS)

    def _on_disposed(self, engine: Engine) -> None:
        # dispose() replaced the pool: time checkouts on the new one.
        with _HUBS_LOCK:
            if self.targets:
                self._install(engine.pool)

    # -- the checkout timer -----------------------------------------------------------
    def _install(self, pool: Pool) -> None:
        if self._installed is not None:
            pool_ref, wrapper_ref = self._installed
            if pool_ref() is pool and wrapper_ref() is not None:
                return
            self._uninstall()
        had_own = "connect" in pool.__dict__
        wrapper = _TimedConnect(self, pool.connect, had_own=had_own)
        pool.connect = wrapper  # type: ignore[method-assign]
        self._installed = (weakref.ref(pool), weakref.ref(wrapper))

    def _uninstall(self) -> None:
        if self._installed is None:
            return
        pool_ref, wrapper_ref = self._installed
        self._installed = None
        wrapper = wrapper_ref()
        if wrapper is None:
            return  # its pool is gone, and the wrapper with it
        wrapper.hub = None  # a pass-through from now on, wherever it still sits
        had_own, original = wrapper.had_own, wrapper.original
        pool = pool_ref()
        if pool is None or pool.__dict__.get("connect") is not wrapper:
            return  # gone, or someone wrapped it again: leave their chain intact
        if had_own:
            pool.connect = original  # type: ignore[method-assign]
        else:
            del pool.__dict__["connect"]


# One hub per engine, keyed weakly so that an engine nobody uses can go away.
_HUBS: weakref.WeakKeyDictionary[Engine, _EngineHub] = weakref.WeakKeyDictionary()
_HUBS_LOCK = threading.Lock()
