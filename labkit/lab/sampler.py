"""Sample anything over time: pool gauges, the server's view, a service's ``/metrics``.

A ``Sampler`` calls a *source* (a function returning ``{name: value}``) every
``interval`` seconds in a background thread while an experiment runs, and keeps each
answer with its time, so that a chart can draw it as a series. The lab's sources:

- the pool's gauges: a ``PoolMetrics`` (its ``gauges()``: ``in_use``, ``idle``,
  ``overflow``, ``pool_size``);
- the server's own view of an application's connections (``pg_stat_activity``): an
  ``observer`` engine and the ``application_name`` (``server_connections``,
  ``server_active``, ``server_idle``, ``server_idle_in_transaction``);
- a service's ``/metrics`` (``labkit.lab.httpload.metrics_sampler``).

```python
with Sampler(metrics, observer, application_name="nb02") as sampler:
    run_sync_load(...)
sampler.series("in_use"), sampler.series("server_connections")
```

``observer`` is a separate engine (ideally with a NullPool or its own small pool): the
sampler must not borrow connections from the pool it is watching.

Times are seconds since ``t0``: the sampler's start unless given (e.g. a load run's
``t0``, to draw the samples above its request timeline); ``series(key, origin=...)``
moves them onto another clock afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, text

from labkit.metrics import PoolMetrics

__all__ = ["Sampler", "Source", "server_activity", "server_connections"]

Source = Callable[[], Mapping[str, Any]]
"""What a ``Sampler`` calls: returns the values of this moment, ``{name: value}``."""

_ACTIVITY = text(
    "SELECT coalesce(state, 'unknown') AS state, count(*) AS n FROM pg_stat_activity "
    "WHERE application_name = :app AND pid <> pg_backend_pid() GROUP BY 1"
)


def server_connections(observer: Engine, application_name: str) -> dict[str, int]:
    """Count the server's backends for ``application_name`` by state (active, idle, ...)."""
    with observer.connect() as conn:
        rows = conn.execute(_ACTIVITY, {"app": application_name}).mappings().all()
    return {str(row["state"]): int(row["n"]) for row in rows}


def server_activity(observer: Engine, application_name: str) -> Source:
    """Return a source counting ``application_name``'s backends, seen by ``observer``.

    Its keys: ``server_connections`` (all), ``server_active``, ``server_idle`` and
    ``server_idle_in_transaction``.
    """
    def read() -> dict[str, int]:
        states = server_connections(observer, application_name)
        return {"server_connections": sum(states.values()),
                "server_active": states.get("active", 0),
                "server_idle": states.get("idle", 0),
                "server_idle_in_transaction": states.get("idle in transaction", 0)}

    return read


class Sampler:
    """Call a source every ``interval`` seconds in a thread; keep each answer with its time.

    Use it as a context manager (or ``start()`` / ``stop()``): sampling starts on entry,
    and on exit one last sample is taken, so the series ends at the state the experiment
    left. ``samples`` holds one dict per sample: ``"t"`` (seconds since ``t0``) and the
    source's values.

    A source that raises one of ``tolerate`` loses that sample (``failures`` counts
    them); any other error ends the sampling and is raised again by ``stop()``, so that
    a series is never silently cut short. A source with a ``close()`` method is closed
    when sampling stops.

    Args:
        source: A function returning ``{name: value}``, or a ``PoolMetrics`` (its
            gauges), or ``None`` to sample the server's view alone.
        observer: An engine to read ``pg_stat_activity`` with (see
            ``server_activity``); its values are added to each sample.
        application_name: The application whose backends the observer counts.
        interval: Seconds between samples.
        t0: ``time.perf_counter()`` value the times count from, e.g. a load run's;
            default: when sampling starts.
        tolerate: Errors of the source that only lose a sample (e.g.
            ``httpx.HTTPError`` for a service that is restarting).
        missing: The value of a key a sample lacks in ``series`` and ``max`` (``0.0``
            for Prometheus samples, absent until first counted); ``None`` skips such
            samples.

    Raises:
        ValueError: Nothing to sample, an observer without ``application_name``, or an
            ``interval`` that is not > 0.
    """

    def __init__(self, source: Source | PoolMetrics | None = None,
                 observer: Engine | None = None, *, application_name: str | None = None,
                 interval: float = 0.05, t0: float | None = None,
                 tolerate: tuple[type[Exception], ...] = (),
                 missing: Any = None) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        if observer is not None and not application_name:
            raise ValueError("application_name is needed to find the server's connections")
        self.sources: list[Source] = []
        if isinstance(source, PoolMetrics):
            self.sources.append(source.gauges)
        elif source is not None:
            self.sources.append(source)
        if observer is not None and application_name:
            self.sources.append(server_activity(observer, application_name))
        if not self.sources:
            raise ValueError("nothing to sample: give a source, an observer, or both")
        self.interval = interval
        self.tolerate = tolerate
        self.missing = missing
        self.samples: list[dict[str, Any]] = []
        self.failures = 0
        """Samples lost to a tolerated error of the source."""
        self.error: BaseException | None = None
        """The error that ended sampling early, if one did."""
        self.t0 = t0 if t0 is not None else 0.0
        """``time.perf_counter()`` value the times count from."""
        self._given_t0 = t0 is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        row: dict[str, Any] = {"t": time.perf_counter() - self.t0}
        try:
            for source in self.sources:
                row.update(source())
        except self.tolerate:
            self.failures += 1
        else:
            self.samples.append(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as exc:  # noqa: BLE001 - raised again by stop()
                self.error = exc
                return
            self._stop.wait(self.interval)

    def start(self) -> Sampler:
        """Start sampling in a background thread; return the sampler."""
        if not self._given_t0:
            self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="labkit-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, take one last sample and close the sources.

        Raises:
            Exception: The source's error that ended sampling early, if one did.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.error is None:
                try:
                    self._sample()
                except Exception as exc:  # noqa: BLE001 - raised below
                    self.error = exc
        finally:
            for source in self.sources:
                close = getattr(source, "close", None)
                if callable(close):
                    close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        except Exception:
            if exc is None:  # the block's own error matters more than the sampler's
                raise

    def series(self, key: str, *, origin: float | None = None) -> tuple[list[float], list[Any]]:
        """Return ``(times in s, values)`` for one sampled key.

        Args:
            key: A gauge (``"in_use"``, ``"overflow"``...), a server count
                (``"server_connections"``...) or a ``/metrics`` sample name.
            origin: A ``time.perf_counter()`` value to count the times from, such as a
                load run's ``LoadResult.t0``; by default, the sampler's ``t0``.
        """
        shift = 0.0 if origin is None else self.t0 - origin
        if self.missing is None:
            rows = [row for row in self.samples if key in row]
            return [row["t"] + shift for row in rows], [row[key] for row in rows]
        return ([row["t"] + shift for row in self.samples],
                [row.get(key, self.missing) for row in self.samples])

    def max(self, key: str) -> Any:
        """Return the largest sampled value of ``key`` (``missing`` when none was)."""
        return max(self.series(key)[1], default=self.missing)

