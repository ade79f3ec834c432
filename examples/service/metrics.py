"""``GET /metrics``: the pool's ``PoolMetrics.snapshot()`` in the Prometheus text format.

One registry per application (not prometheus-client's global one), so two applications
in one process, as in the tests, never collide. Read at scrape time:

- ``labkit_pool_in_use``, ``_idle``, ``_overflow``, ``labkit_pool_size``: gauges;
- ``labkit_pool_checkouts_total``, ``_connects_total``, ``_invalidations_total``,
  ``_checkout_errors_total`` and the other ``PoolMetrics`` counters;
- ``labkit_pool_checkout_wait_seconds``: a summary (``_count``, ``_sum``) of the time
  checkouts waited for a connection, and ``..._max``, the longest wait since start-up;
- ``labkit_errors_total{error="PoolTimeoutError"}``: database errors that ended a
  request, by labkit class (counted by the error handlers in ``main.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from labkit import PoolMetrics

GAUGES = {"in_use": "Connections checked out of the pool.",
          "idle": "Connections idle in the pool.",
          "overflow": "Connections open beyond pool_size.",
          "pool_size": "The pool's pool_size."}
COUNTERS = ("connects", "closes", "checkouts", "checkins", "invalidations", "checkout_errors")


class ServiceMetrics(Collector):
    """The application's Prometheus registry, fed by ``PoolMetrics`` on its engine.

    Create it before the engine serves traffic; ``close()`` it at shutdown.
    """

    def __init__(self, engine: Engine | AsyncEngine) -> None:
        self.pool = PoolMetrics.attach(engine)
        self.registry = CollectorRegistry()
        self.errors = Counter("labkit_errors", "Database errors that ended a request, "
                              "by labkit error class.", ["error"], registry=self.registry)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at each scrape."""
        snapshot = self.pool.snapshot()
        for key, doc in GAUGES.items():
            name = "labkit_pool_size" if key == "pool_size" else f"labkit_pool_{key}"
            yield GaugeMetricFamily(name, doc, value=snapshot[key])
        for key in COUNTERS:
            yield CounterMetricFamily(f"labkit_pool_{key}", f"PoolMetrics counter {key}.",
                                      value=snapshot[key])
        yield SummaryMetricFamily(
            "labkit_pool_checkout_wait_seconds",
            "Time checkouts waited for a connection (opening one included).",
            count_value=snapshot["checkouts"] + snapshot["checkout_errors"],
            sum_value=snapshot["checkout_wait_ms_total"] / 1000)
        yield GaugeMetricFamily("labkit_pool_checkout_wait_seconds_max",
                                "The longest checkout wait since start-up.",
                                value=snapshot["checkout_wait_ms_max"] / 1000)

    def count_error(self, error: str) -> None:
        """Count a request ended by a database error of labkit class ``error``."""
        self.errors.labels(error=error).inc()

    def close(self) -> None:
        """Stop collecting from the engine."""
        self.pool.detach()


router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """The registry in the Prometheus text format."""
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
