"""Sample pool gauges and the server's own view (``pg_stat_activity``) over time.

The sampler runs in a background thread while an experiment runs:

```python
with Sampler(metrics, observer, application_name="nb02") as sampler:
    run_sync_load(...)
sampler.series("in_use"), sampler.series("server_connections")
```

``observer`` is a separate engine (ideally with a NullPool or its own small pool): the
sampler must not borrow connections from the pool it is watching.

Times are seconds since the sampler started; ``series(key, origin=load.t0)`` puts them on
a load run's clock instead (e.g. to draw them above its request timeline).
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, text

from labkit.metrics import PoolMetrics

__all__ = ["Sampler", "server_connections"]

_ACTIVITY = text(
    "SELECT coalesce(state, 'unknown') AS state, count(*) AS n FROM pg_stat_activity "
    "WHERE application_name = :app AND pid <> pg_backend_pid() GROUP BY 1"
)


def server_connections(observer: Engine, application_name: str) -> dict[str, int]:
    """Count the server's backends for ``application_name`` by state (active, idle, ...)."""
    with observer.connect() as conn:
        rows = conn.execute(_ACTIVITY, {"app": application_name}).mappings().all()
    return {str(row["state"]): int(row["n"]) for row in rows}


class Sampler:
    """Record pool gauges and server connection counts every ``interval`` seconds."""

    def __init__(self, metrics: PoolMetrics | None, observer: Engine | None = None, *,
                 application_name: str | None = None, interval: float = 0.05) -> None:
        if observer is not None and not application_name:
            raise ValueError("application_name is needed to find the server's connections")
        self.metrics = metrics
        self.observer = observer
        self.application_name = application_name
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0
        """``time.perf_counter()`` when sampling started: the origin of the times."""

    def _sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": time.perf_counter() - self.t0}
        if self.metrics is not None:
            row.update(self.metrics.gauges())
        if self.observer is not None and self.application_name:
            states = server_connections(self.observer, self.application_name)
            row["server_connections"] = sum(states.values())
            row["server_active"] = states.get("active", 0)
            row["server_idle"] = states.get("idle", 0)
            row["server_idle_in_transaction"] = states.get("idle in transaction", 0)
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval)

    def start(self) -> Sampler:
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="labkit-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(self._sample())

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def series(self, key: str, *, origin: float | None = None) -> tuple[list[float], list[Any]]:
        """Return ``(times in s, values)`` for one sampled key.

        Args:
            key: A gauge (``"in_use"``, ``"overflow"``...) or a server count
                (``"server_connections"``...).
            origin: A ``time.perf_counter()`` value to count the times from, such as a
                load run's ``LoadResult.t0``; by default, the sampler's start.
        """
        shift = 0.0 if origin is None else self.t0 - origin
        rows = [row for row in self.samples if key in row]
        return [row["t"] + shift for row in rows], [row[key] for row in rows]

    def max(self, key: str) -> Any:
        """Largest sampled value of ``key``."""
        return max(self.series(key)[1])
