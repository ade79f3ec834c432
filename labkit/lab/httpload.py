"""An HTTP load driver for a real service: clients in threads, every request recorded.

Each client (a thread with its own ``httpx.Client``, i.e. its own TCP connection) sends
its list of ``Call``s in order, each no earlier than its ``at`` (seconds after the run
started). Every request is recorded with when it started, when its response headers
arrived, when its body was fully read, its status code, or the transport error that
ended it (``ReadTimeout``, ``ConnectError``...). Times are seconds on one clock, the
run's (``t0`` = ``time.perf_counter()`` at its start), so they line up with a
``metrics_sampler`` scraping the service's ``/metrics`` (a ``labkit.lab.sampler.Sampler``)
and with any fault the notebook injects meanwhile.

Example:
    ```python
    calls = [[Call("GET", "/orders/export", params={"delay": 0.5}, at=0.3 * n)]
             for n in range(6)]
    with HttpLoad(svc.base_url, calls) as run, metrics_sampler(svc.base_url, t0=run.t0) as m:
        run.wait()
    run.result.statuses(), m.series("labkit_pool_in_use")
    ```
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from labkit.lab.sampler import Sampler

__all__ = [
    "Call",
    "HttpLoad",
    "HttpRecord",
    "HttpResult",
    "every",
    "metrics_sampler",
    "run_http",
    "scrape",
]

_BODY_CHARS = 2000


@dataclass(frozen=True)
class Call:
    """One request a client sends.

    Attributes:
        method: ``"GET"``, ``"POST"``...
        path: The path, e.g. ``"/orders/1"``.
        params: Query parameters.
        headers: Request headers (e.g. ``{"Idempotency-Key": "k1"}``).
        at: Send no earlier than this many seconds after the run started.
        label: A name to group records by (default: the path).
    """

    method: str = "GET"
    path: str = "/"
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    at: float = 0.0
    label: str = ""


def every(path: str, *, interval: float, duration: float, method: str = "GET",
          label: str = "") -> list[Call]:
    """Return calls of ``path`` every ``interval`` seconds for ``duration`` seconds.

    A client whose request takes longer than ``interval`` sends the next one as soon as
    the previous one ends: the records show the gap instead of overlapping requests.
    """
    count = max(1, int(duration / interval) + 1)
    return [Call(method, path, at=k * interval, label=label or path) for k in range(count)]


@dataclass(frozen=True)
class HttpRecord:
    """One request; times in seconds since the run started.

    Attributes:
        client: Which client sent it, from 0.
        label: The call's label (its path unless named).
        method: The HTTP method.
        path: The request path.
        start: When it was sent.
        headers_at: When the response's status and headers arrived (``None``: never).
        end: When its body was fully read, or when it failed.
        status: The HTTP status code, ``None`` when no response arrived.
        error: The transport error's class name (``"ReadTimeout"``), else ``None``.
        body: The start of the response body (up to 2000 characters).
    """

    client: int
    label: str
    method: str
    path: str
    start: float
    headers_at: float | None
    end: float
    status: int | None
    error: str | None = None
    body: str = ""

    @property
    def ok(self) -> bool:
        """True for a 1xx-3xx answer."""
        return self.status is not None and self.status < 400

    @property
    def latency_ms(self) -> float:
        """From sending to the body's last byte (or the failure), in ms."""
        return (self.end - self.start) * 1000.0

    @property
    def outcome(self) -> str:
        """The status code as text (``"201"``) or the transport error's name."""
        return str(self.status) if self.status is not None else (self.error or "?")


@dataclass
class HttpResult:
    """Every request of one run."""

    records: list[HttpRecord] = field(default_factory=list)
    t0: float = 0.0
    """``time.perf_counter()`` at the run's start: the origin of every record's times."""
    elapsed: float = 0.0

    def by_label(self, label: str) -> list[HttpRecord]:
        """Return the records of one label, in the order they were sent."""
        return sorted((r for r in self.records if r.label == label), key=lambda r: r.start)

    def statuses(self, label: str | None = None) -> Counter[str]:
        """Count outcomes (``"200"``, ``"503"``, ``"ReadTimeout"``), of one label or all."""
        return Counter(r.outcome for r in self.records if label is None or r.label == label)

    def open_over_time(self, label: str | None = None, *, after_headers: bool = False,
                       ok_only: bool = False) -> tuple[list[float], list[int]]:
        """Return the number of requests in flight at every start and end, as steps.

        Args:
            label: Only the requests of this label.
            after_headers: Count a request only once its headers arrived, i.e. open
                *streams* rather than requests waiting for an answer.
            ok_only: Only requests answered with a 1xx-3xx status (e.g. streams that
                were served, not the error answers).
        """
        events: list[tuple[float, int]] = [(0.0, 0)]
        for r in self.records:
            if (label is not None and r.label != label) or (ok_only and not r.ok):
                continue
            begin = r.headers_at if after_headers else r.start
            if begin is None:
                continue
            events += [(begin, 1), (r.end, -1)]
        events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same time
        times, counts, level = [], [], 0
        for at, step in events:
            level += step
            times.append(at)
            counts.append(level)
        return times, counts


class HttpLoad:
    """Run clients in threads against ``base_url`` while the caller does something else.

    Use it as a context manager: the clients start on entry; ``wait()`` (or leaving the
    block) joins them, and ``result`` holds every record.

    Args:
        base_url: The service, e.g. ``Service.base_url``.
        clients: One list of ``Call``s per client, sent in order.
        timeout: Per request, seconds (connect, each read, write, pool).
    """

    def __init__(self, base_url: str, clients: Sequence[Sequence[Call]], *,
                 timeout: float = 10.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url
        self.clients = [list(calls) for calls in clients]
        self.timeout = timeout
        self.t0 = time.perf_counter()
        self.result = HttpResult(t0=self.t0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def now(self) -> float:
        """Seconds since the run started, on the records' clock."""
        return time.perf_counter() - self.t0

    def _client(self, number: int, calls: list[Call]) -> None:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout) as client:
            for call in calls:
                delay = call.at - self.now()
                if delay > 0:
                    time.sleep(delay)
                start = self.now()
                headers_at = status = None
                error, body = None, ""
                try:
                    with client.stream(call.method, call.path, params=call.params,
                                       headers=call.headers) as response:
                        headers_at, status = self.now(), response.status_code
                        body = b"".join(response.iter_bytes()).decode(errors="replace")
                except httpx.HTTPError as exc:
                    error = type(exc).__name__
                record = HttpRecord(client=number, label=call.label or call.path,
                                    method=call.method, path=call.path, start=start,
                                    headers_at=headers_at, end=self.now(), status=status,
                                    error=error, body=body[:_BODY_CHARS])
                with self._lock:
                    self.result.records.append(record)

    def __enter__(self) -> HttpLoad:
        self.t0 = time.perf_counter()
        self.result.t0 = self.t0
        self._threads = [threading.Thread(target=self._client, args=(n, calls), daemon=True,
                                          name=f"http-client-{n}")
                         for n, calls in enumerate(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def wait(self) -> HttpResult:
        """Wait for every client to finish; return the result."""
        for thread in self._threads:
            thread.join()
        self.result.elapsed = self.now()
        self.result.records.sort(key=lambda r: (r.start, r.client))
        return self.result

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.wait()


def run_http(base_url: str, clients: Sequence[Sequence[Call]], *,
             timeout: float = 10.0) -> HttpResult:
    """Send every client's calls (clients in parallel) and return the records."""
    with HttpLoad(base_url, clients, timeout=timeout) as load:
        pass
    return load.result


def scrape(base_url: str, *, timeout: float = 2.0,
           client: httpx.Client | None = None) -> dict[str, float]:
    """Read a service's ``/metrics`` into ``{sample name: value}``.

    Labelled samples are keyed with their labels, as Prometheus writes them:
    ``labkit_errors_total{error="PoolTimeoutError"}``.
    """
    response = (client or httpx).get(f"{base_url}/metrics", timeout=timeout)
    response.raise_for_status()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


class _MetricsSource:
    """``scrape`` of one service, over one kept-alive connection opened on first use."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._client: httpx.Client | None = None

    def __call__(self) -> dict[str, float]:
        if self._client is None:
            self._client = httpx.Client(timeout=2.0)
        return scrape(self.base_url, client=self._client)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def metrics_sampler(base_url: str, *, interval: float = 0.05,
                    t0: float | None = None) -> Sampler:
    """Return a ``Sampler`` of a service's ``/metrics``, on a run's clock.

    Use it as a context manager, like any ``Sampler``. Each sample holds every
    Prometheus sample of one scrape (keyed as ``scrape`` keys them); a name a scrape
    lacks reads 0 (a labelled counter appears only once counted). A scrape that fails
    over HTTP (the service restarting, a timeout) is counted in ``failures`` and skipped.

    Args:
        base_url: The service.
        interval: Seconds between scrapes.
        t0: The clock's origin (``HttpLoad.t0``); default: when sampling starts.
    """
    return Sampler(_MetricsSource(base_url), interval=interval, t0=t0,
                   tolerate=(httpx.HTTPError,), missing=0.0)

