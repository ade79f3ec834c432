"""The reference service (``examples/service/``), exercised with real HTTP requests
against the real server.

Two ways of sending them: FastAPI's in-process ``TestClient`` for the routes and the
health check, and real ``uvicorn`` processes for the one promise that depends on when
bytes leave the server: a client never receives a 2xx for a transaction that did not
commit. The dependency's scope, which that promise rests on, is checked on every route
here, in a test, instead of at the service's start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi.dependencies.models import Dependant
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import examples.fastapi_app as example
from examples import pitfalls
from examples.service import main, routes
from labkit import TEST_POOL, Settings, create_engine
from labkit.lab import LocalServer
from labkit.lab.httpload import Call, HttpLoad, metrics_sampler, scrape
from labkit.lab.sampler import Sampler
from labkit.lab.proxy import FaultProxy
from labkit.lab.services import ServiceError, uvicorn_service
from labkit.web import AsyncSessionManager, SessionManager, get_async_db, get_db
from tests.conftest import own_schema

ROOT = Path(__file__).resolve().parents[1]
UVICORN_START_TIMEOUT = 30.0
# A table whose uniqueness is checked at COMMIT, not at INSERT: the duplicate passes the
# handler and only the COMMIT can report it, as a serialization failure or a connection
# lost during COMMIT would. The example's CREATE TABLE IF NOT EXISTS leaves it as it is.
DEFERRED_ORDERS = ("CREATE TABLE example_orders (id int NOT NULL, item text NOT NULL, "
                   "CONSTRAINT example_orders_id_deferred UNIQUE (id) "
                   "DEFERRABLE INITIALLY DEFERRED)")


# This module's own PostgreSQL schema: the example service creates its tables where the
# URL's search_path points (``options=-c search_path=...``), so test modules running at
# the same time (pytest-xdist) and notebook 01 never share ``example_orders``. Every
# fixture built on ``db_url`` (``settings``, ``observer``) follows it.
SCHEMA = "labkit_test_fastapi_example"


@pytest.fixture(scope="session")
def db_url(db_url: URL) -> Iterator[URL]:
    """The shared server's URL with ``search_path`` set to this module's schema."""
    with own_schema(db_url, SCHEMA) as url:
        yield url


@pytest.fixture
def clean_orders(observer: Engine) -> Iterator[None]:
    with observer.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS example_orders"))
    yield
    with observer.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS example_orders"))


@pytest.fixture
def deferred_orders(observer: Engine, clean_orders: None) -> None:
    """``example_orders`` with its unique id checked only at COMMIT."""
    with observer.begin() as conn:
        conn.execute(text(DEFERRED_ORDERS))


def stored_orders(observer: Engine) -> list[tuple[int, str]]:
    """What another connection sees committed, right now."""
    with observer.connect() as conn:
        rows = conn.execute(text("SELECT id, item FROM example_orders ORDER BY id")).all()
    return [(int(row.id), str(row.item)) for row in rows]


# --- the trap: Depends(get_db) without scope="function" --------------------------------
# Served by uvicorn through ``--factory``; not for copying.

@contextlib.asynccontextmanager
async def _naive_lifespan(app: FastAPI) -> AsyncIterator[None]:
    manager = SessionManager()
    manager.init(Settings.from_env())
    app.state.db = manager
    yield
    manager.close()


@contextlib.asynccontextmanager
async def _naive_async_lifespan(app: FastAPI) -> AsyncIterator[None]:
    manager = AsyncSessionManager()
    manager.init(Settings.from_env())
    app.state.db = manager
    yield
    await manager.close()


def naive_app() -> FastAPI:
    """A handler taking its session as plain ``Depends(get_db)``: scope "request"."""
    app = FastAPI(lifespan=_naive_lifespan)

    @app.post("/orders/{order_id}", status_code=201)
    def create_order(order_id: int, item: str,
                     session: Annotated[Session, Depends(get_db)]) -> dict[str, object]:
        session.execute(text("INSERT INTO example_orders VALUES (:id, :item)"),
                        {"id": order_id, "item": item})
        return {"id": order_id}

    return app


def naive_async_app() -> FastAPI:
    """Async twin of ``naive_app``: plain ``Depends(get_async_db)``."""
    app = FastAPI(lifespan=_naive_async_lifespan)

    @app.post("/orders/{order_id}", status_code=201)
    async def create_order(order_id: int, item: str,
                           session: Annotated[AsyncSession, Depends(get_async_db)]
                           ) -> dict[str, object]:
        await session.execute(text("INSERT INTO example_orders VALUES (:id, :item)"),
                              {"id": order_id, "item": item})
        return {"id": order_id}

    return app


@contextlib.contextmanager
def uvicorn_server(target: str, db_url: URL, log: Path, *, factory: bool = False,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``uvicorn target`` as a real process on a free port; yield its base URL.

    ``labkit.lab.services.uvicorn_service``: it serves once its lifespan has started,
    and is stopped with SIGTERM, so its lifespan closes the pool.
    """
    try:
        with uvicorn_service(target, database_url=db_url, factory=factory, log=log,
                             env=env, start_timeout=UVICORN_START_TIMEOUT) as service:
            print(f"uvicorn {target}: serving after {service.started_in_s:.2f} s")
            yield service.base_url
    except ServiceError as exc:
        pytest.fail(str(exc))


def wait_for_log(log: Path, needle: str, timeout: float = 10.0) -> str:
    """Return the server's log once it contains ``needle`` (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while needle not in (content := log.read_text()):
        if time.monotonic() > deadline:
            pytest.fail(f"{needle!r} not in the server's log after {timeout} s:\n"
                        f"{content[-3000:]}")
        time.sleep(0.05)
    return content


# --- real uvicorn processes ------------------------------------------------------------

@pytest.mark.parametrize(("target", "factory"), [
    ("examples.fastapi_app:app", False),
    ("examples.fastapi_app:async_app", False),
    ("examples.fastapi_app:create_app", True),  # uvicorn --factory: settings at start-up
], ids=["app", "async_app", "factory"])
def test_uvicorn_never_answers_2xx_for_a_commit_that_failed(
        target: str, factory: bool, db_url: URL, observer: Engine, deferred_orders: None,
        tmp_path: Path) -> None:
    """Pins: with the example's ``SessionDep`` / ``AsyncSessionDep`` (scope "function")
    the COMMIT runs before the response is sent, sync and async.

    A 201 therefore means the row is already visible to another connection, and a COMMIT
    that fails (here a unique constraint checked only at COMMIT) is answered 409 with
    nothing stored. Before: the module had no ``app``/``async_app`` to serve, and
    ``create_app``'s handlers took plain ``Depends(get_db)``: 201 for the duplicate.
    """
    log = tmp_path / "uvicorn.log"
    with uvicorn_server(target, db_url, log, factory=factory) as base, httpx.Client(base_url=base,
                                                                   timeout=10) as client:
        start = time.monotonic()
        first = client.post("/orders/1", params={"item": "coffee"})
        assert first.status_code == 201, first.text
        assert stored_orders(observer) == [(1, "coffee")]  # committed before the 201
        duplicate = client.post("/orders/1", params={"item": "again"})
        elapsed = time.monotonic() - start
        assert duplicate.status_code == 409, (duplicate.status_code, duplicate.text)
        assert duplicate.json()["error"] == "IntegrityError"
        assert stored_orders(observer) == [(1, "coffee")]
        assert client.post("/orders/2/fail").status_code == 500
        assert client.get("/orders").json() == [{"id": 1, "item": "coffee"}]
        print(f"{target}: 201 then 409 in {elapsed * 1000:.0f} ms")
    assert stored_orders(observer) == [(1, "coffee")]


@pytest.mark.parametrize("factory", ["naive_app", "naive_async_app"])
def test_plain_depends_get_db_answers_201_for_a_commit_that_failed(
        factory: str, db_url: URL, observer: Engine, deferred_orders: None,
        tmp_path: Path) -> None:
    """Documents the trap (passes before and after the fix): plain ``Depends(get_db)``.

    With FastAPI >= 0.118 a dependency with ``yield`` has scope "request" by default: its
    exit code, get_db's COMMIT, runs after the response has been sent. The duplicate's
    COMMIT fails in the server's log, yet the client was told 201, and the row is gone.
    """
    log = tmp_path / "uvicorn.log"
    with uvicorn_server(f"tests.test_fastapi_example:{factory}", db_url, log,
                        factory=True) as base, httpx.Client(base_url=base,
                                                            timeout=10) as client:
        first = client.post("/orders/1", params={"item": "coffee"})
        duplicate = client.post("/orders/1", params={"item": "again"})
        assert (first.status_code, duplicate.status_code) == (201, 201)
        content = wait_for_log(log, "IntegrityError")  # the COMMIT failed, after the 201
        assert "example_orders_id_deferred" in content
    assert stored_orders(observer) == [(1, "coffee")]


# --- in-process requests ---------------------------------------------------------------

@pytest.mark.parametrize("factory", ["create_app", "create_async_app"])
def test_request_commits_and_a_failing_request_rolls_back(
        factory: str, settings: Settings, observer: Engine, clean_orders: None) -> None:
    with TestClient(getattr(example, factory)(settings)) as client:
        assert client.post("/orders/1", params={"item": "coffee"}).status_code == 201
        assert client.post("/orders/1", params={"item": "again"}).status_code == 409
        assert client.post("/orders/2/fail").status_code == 500
        assert client.get("/orders").json() == [{"id": 1, "item": "coffee"}]
        assert client.app.state.db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert stored_orders(observer) == [(1, "coffee")]


# --- the dependency's scope, checked on every route -------------------------------------

def api_routes(app: FastAPI) -> list[APIRoute]:
    """Every ``APIRoute`` of ``app``, those of included routers too.

    Recent FastAPI versions keep an included router as one lazy entry in ``app.routes``;
    ``iter_route_contexts`` resolves it (the routes it yields answer ``path``,
    ``methods`` and ``dependant`` as the route does in the application). Older versions
    copy the routes into ``app.routes`` and have no ``iter_route_contexts``.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before lazy include_router
        return [route for route in app.routes if isinstance(route, APIRoute)]
    return [context for context in iter_route_contexts(app.routes)  # type: ignore[misc]
            if isinstance(context.original_route, APIRoute)]


def sessions_taken(app: FastAPI) -> dict[str, set[str | None]]:
    """``{"POST /orders/{order_id}": {"function"}, ...}``: the scope(s) with which each
    route takes ``get_db`` / ``get_async_db``, nested dependencies included."""
    def walk(dependant: Dependant) -> Iterator[Dependant]:
        for sub in dependant.dependencies:
            yield sub
            yield from walk(sub)

    taken: dict[str, set[str | None]] = {}
    for route in api_routes(app):
        scopes = {sub.scope for sub in walk(route.dependant)
                  if sub.call in (get_db, get_async_db)}
        if scopes:
            taken[f"{'/'.join(sorted(route.methods or ()))} {route.path}"] = scopes
    return taken


@pytest.mark.parametrize("factory", ["create_app", "create_async_app"])
def test_every_route_that_takes_a_session_commits_before_its_response(factory: str) -> None:
    """Pins: each route of the reference service, sync and async, that takes
    ``get_db`` / ``get_async_db`` (directly or through a dependency such as ``Caller``)
    takes it with ``scope="function"``: its COMMIT runs before the response is sent. A
    plain ``Depends(get_db)`` (scope "request") would commit after it, and a COMMIT that
    failed would still be answered 2xx. Before: a check at the service's start-up that
    read FastAPI's internals."""
    taken = sessions_taken(getattr(main, factory)())
    assert {route: scopes for route, scopes in taken.items() if scopes != {"function"}} == {}
    assert set(taken) == {  # the check saw every route that writes or reads the database
        "POST /orders/{order_id}", "POST /orders/{order_id}/fail", "GET /orders",
        "GET /orders/export", "GET /orders/summary", "POST /payments", "GET /reports/slow"}


def test_the_scope_check_finds_the_pitfall_services_request_scoped_sessions() -> None:
    """The check above is not vacuous: on ``examples.pitfalls`` it finds the two routes
    that take plain ``Depends(get_db)``, and a route added to the reference app with it."""
    taken = sessions_taken(pitfalls.create_pitfall_app())
    assert {route for route, scopes in taken.items() if scopes != {"function"}} == {
        "POST /orders/{order_id}", "GET /orders/export"}
    app = main.create_app()

    @app.post("/refunds/{refund_id}", status_code=201)
    def refund(refund_id: int, session: Annotated[Session, Depends(get_db)]) -> None:
        """The mistake: the default scope."""

    assert sessions_taken(app)["POST /refunds/{refund_id}"] == {None}


def test_the_module_level_apps_neither_connect_nor_read_settings_at_import() -> None:
    """Pins: ``uvicorn examples.fastapi_app:app`` (and ``:async_app``) have an app to
    serve, and importing it reads no settings: with ``ENVIRONMENT=production`` and no
    ``DATABASE_URL``, reading them would raise. Before, the module had no ``app``."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["ENVIRONMENT"] = "production"
    probe = ("import examples.fastapi_app as m, examples.service.main as s, examples.pitfalls; "
             "assert (m.app, m.async_app) == (s.app, s.async_app); "
             "print(type(m.app).__name__, type(m.async_app).__name__, "
             "hasattr(m.app.state, 'db'), hasattr(m.async_app.state, 'db'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FastAPI", "FastAPI", "False", "False"]


@pytest.mark.parametrize("factory", ["create_app", "create_async_app"])
def test_start_up_checks_the_connection_budget_and_warns_when_it_is_exceeded(
        factory: str, settings: Settings, clean_orders: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """Pins: the lifespan compares the pool's worst case with the server's
    ``max_connections`` (labkit's ``check_connection_budget``), sync and async: with
    ``DB_PROCESSES=10000`` it logs the warning and still starts."""
    with caplog.at_level(logging.WARNING, logger="labkit"):
        with TestClient(getattr(main, factory)(settings.replace(processes=10_000))) as client:
            assert client.get("/live").status_code == 200
    assert "connection budget exceeded: 10000 process(es)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="labkit"):
        with TestClient(getattr(main, factory)(settings)):
            pass
    assert "connection budget exceeded" not in caplog.text


def test_ready_is_200_when_the_database_answers(settings: Settings, clean_orders: None,
                                                 password: str) -> None:
    with TestClient(example.create_app(settings)) as client:
        response = client.get("/ready")
    assert response.status_code == 200
    assert response.json()["ok"] is True
    assert password not in response.text


def test_ready_is_503_within_its_timeout_when_the_database_is_stopped(
        throwaway_server: LocalServer) -> None:
    settings = Settings(url=throwaway_server.info().url(), connect_timeout=1)
    app = example.create_app(settings)
    with TestClient(app) as client:
        healthy = client.get("/ready")
        throwaway_server.stop()
        try:
            start = time.monotonic()
            down = client.get("/ready")
            elapsed = time.monotonic() - start
        finally:
            throwaway_server.start()
        assert healthy.status_code == 200
        assert down.status_code == 503
        assert down.json()["error"] in {"DatabaseUnavailableError", "ConnectionLostError"}
        assert elapsed < routes.READY_TIMEOUT + 1.0
        assert throwaway_server.info().password not in down.text
        recovered = client.get("/ready")
        assert recovered.status_code == 200
    with create_engine(Settings(url=throwaway_server.info().url()), pool=TEST_POOL).begin() as c:
        c.execute(text("DROP TABLE IF EXISTS example_orders, example_receipts, "
                       "example_payments"))


# --- the reference service's routes, served by uvicorn ----------------------------------

EXAMPLE_TARGETS = pytest.mark.parametrize(
    "target", ["examples.fastapi_app:app", "examples.fastapi_app:async_app"],
    ids=["sync", "async"])
# A pool of one connection that gives up quickly: one held stream exhausts it.
ONE_CONNECTION = {"DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "0", "DB_POOL_TIMEOUT": "0.5"}


@pytest.fixture
def clean_example_tables(observer: Engine, clean_orders: None) -> Iterator[None]:
    """No example table before or after the test (the service creates them)."""
    drop = "DROP TABLE IF EXISTS example_receipts, example_payments"
    with observer.begin() as conn:
        conn.execute(text(drop))
    yield
    with observer.begin() as conn:
        conn.execute(text(drop))


def _poll(observer: Engine, sql: str, *, until: object, timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        with observer.connect() as conn:
            value = conn.execute(text(sql)).scalar()
        if value == until or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@EXAMPLE_TARGETS
def test_live_stays_200_and_ready_is_503_within_its_timeout_while_the_database_is_down(
        target: str, throwaway_server: LocalServer, tmp_path: Path) -> None:
    """Pins: ``/live`` never touches the database, ``/ready`` is the bounded probe: during
    an outage a real uvicorn process answers ``/live`` 200 and ``/ready`` 503 (naming a
    labkit error, no password) within ``READY_TIMEOUT``, and ``/ready`` recovers."""
    url = throwaway_server.info().url()
    with uvicorn_server(target, url, tmp_path / "uvicorn.log",
                        env={"DB_CONNECT_TIMEOUT": "1"}) as base, httpx.Client(
                            base_url=base, timeout=10) as client:
        up = client.get("/ready")
        assert up.status_code == 200, up.text
        assert up.json()["ok"] is True and up.json()["pool_saturated"] is False
        throwaway_server.stop()
        try:
            live = client.get("/live")
            start = time.monotonic()
            down = client.get("/ready")
            elapsed = time.monotonic() - start
        finally:
            throwaway_server.start()
        assert live.status_code == 200 and live.json() == {"status": "alive"}
        assert down.status_code == 503, down.text
        assert down.json()["error"] in {"DatabaseUnavailableError", "ConnectionLostError"}
        assert elapsed < routes.READY_TIMEOUT + 1.0
        assert throwaway_server.info().password not in down.text
        assert client.get("/ready").status_code == 200
    with create_engine(Settings(url=url), pool=TEST_POOL).begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS example_orders, example_receipts, "
                          "example_payments"))


@EXAMPLE_TARGETS
def test_same_idempotency_key_sent_concurrently_stores_one_payment(
        target: str, db_url: URL, observer: Engine, clean_example_tables: None,
        tmp_path: Path) -> None:
    """Pins: ``POST /payments`` stores a payment once per ``Idempotency-Key``: six
    concurrent retries get one 201 and five 200 ``replayed``; one row; the key reused for
    another amount is a 422; no key is a 422 (validation)."""
    with uvicorn_server(target, db_url, tmp_path / "uvicorn.log") as base:
        same = Call("POST", "/payments", params={"amount_cents": 1250},
                    headers={"Idempotency-Key": "order-77"})
        result = HttpLoad(base, [[same]] * 6, timeout=10)
        with result:
            pass
        assert result.result.statuses() == {"201": 1, "200": 5}
        with httpx.Client(base_url=base, timeout=10) as client:
            other = client.post("/payments", params={"amount_cents": 99},
                                headers={"Idempotency-Key": "order-77"})
            assert other.status_code == 422
            assert client.post("/payments", params={"amount_cents": 1}).status_code == 422
    assert _poll(observer, "SELECT count(*) FROM example_payments", until=1) == 1
    with observer.connect() as conn:
        assert conn.execute(text("SELECT amount_cents FROM example_payments")).scalar() == 1250


@pytest.mark.parametrize("factory", ["create_app", "create_async_app"])
def test_lost_commit_answer_is_a_503_and_a_retry_with_the_same_key_finds_the_payment(
        factory: str, db_url: URL, observer: Engine, clean_example_tables: None) -> None:
    """Pins: a payment whose COMMIT reached the server but whose answer was lost (a real
    TCP proxy drops it and resets the connection) is answered 503 with ``Retry-After`` and
    ``"outcome": "unknown"``, not 500, so a client that retries 503s with its
    ``Idempotency-Key`` retries it; the retry finds the stored payment (200, replayed)
    and the payment is stored once."""
    with FaultProxy(str(db_url.host), int(db_url.port or 5432)) as proxy:
        app = getattr(main, factory)(Settings(url=proxy.url(db_url)))
        with TestClient(app) as client:
            proxy.drop_commit_reply(times=1)
            lost = client.post("/payments", params={"amount_cents": 700},
                               headers={"Idempotency-Key": "lost-answer"})
            assert proxy.armed == 0, "the COMMIT's answer was not dropped"
            assert lost.status_code == 503, lost.text
            assert lost.headers["Retry-After"] == "1"
            assert lost.json()["error"] == "CommitOutcomeUnknownError"
            assert lost.json()["outcome"] == "unknown"
            retry = client.post("/payments", params={"amount_cents": 700},
                                headers={"Idempotency-Key": "lost-answer"})
            assert retry.status_code == 200, retry.text
            assert retry.json()["replayed"] is True
    with observer.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM example_payments")).scalar() == 1


@EXAMPLE_TARGETS
def test_background_receipt_is_written_after_the_response_by_its_own_session(
        target: str, db_url: URL, observer: Engine, clean_example_tables: None,
        tmp_path: Path) -> None:
    """Pins: ``POST /orders/{id}/receipt`` answers 202 and its background task, with a
    session of its own, commits the receipt afterwards; the pool ends with nothing
    checked out."""
    with uvicorn_server(target, db_url, tmp_path / "uvicorn.log") as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            for order_id in (1, 2, 3):
                assert client.post(f"/orders/{order_id}/receipt").status_code == 202
        assert _poll(observer, "SELECT count(*) FROM example_receipts", until=3) == 3
        time.sleep(0.2)
        assert scrape(base)["labkit_pool_in_use"] == 0
    assert "Traceback" not in (tmp_path / "uvicorn.log").read_text()


@EXAMPLE_TARGETS
def test_streamed_export_returns_its_connection_before_the_first_byte(
        target: str, db_url: URL, observer: Engine, clean_example_tables: None,
        tmp_path: Path) -> None:
    """Pins: with ``SessionDep`` the export's session is closed before streaming, so four
    slow streams (1 s each) share a pool of ONE connection: all 200, every line
    delivered, no pool timeout, and ``/metrics`` shows no connection held for long."""
    with uvicorn_server(target, db_url, tmp_path / "uvicorn.log", env=ONE_CONNECTION) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            for order_id in range(1, 6):
                client.post(f"/orders/{order_id}", params={"item": f"item {order_id}"})
        calls = [[Call("GET", "/orders/export", params={"delay": 0.25}, at=0.05 * n)]
                 for n in range(4)]
        with HttpLoad(base, calls, timeout=10) as run, metrics_sampler(
                base, interval=0.05, t0=run.t0) as sampler:
            run.wait()
        assert run.result.statuses() == {"200": 4}
        assert all(r.body.count("\n") == 5 for r in run.result.records)
        assert min(r.end - r.start for r in run.result.records) >= 1.0  # really streamed
        metrics = scrape(base)
        assert metrics["labkit_pool_checkout_errors_total"] == 0
        # Sampled while four streams were open: the connection was back in the pool.
        assert sum(1 for v in sampler.series("labkit_pool_in_use")[1] if v > 0) <= 2


def test_request_scoped_session_holds_its_connection_for_the_whole_stream(
        db_url: URL, observer: Engine, clean_example_tables: None, tmp_path: Path) -> None:
    """Documents the pitfall (examples/pitfalls.py): plain ``Depends(get_db)`` keeps the
    connection until the stream ends. With a pool of one, a second export while the
    first streams waits ``pool_timeout`` and is answered 503 ``PoolTimeoutError``; the
    error, the failed checkout and the wait are on ``/metrics``."""
    with observer.begin() as conn:
        conn.execute(text("CREATE TABLE example_orders (id int PRIMARY KEY, item text)"))
        conn.execute(text("INSERT INTO example_orders SELECT g, 'x' FROM generate_series(1, 6) g"))
    with uvicorn_server("examples.pitfalls:create_pitfall_app", db_url,
                        tmp_path / "uvicorn.log", factory=True, env=ONE_CONNECTION) as base:
        calls = [[Call("GET", "/orders/export", params={"delay": 0.3}, label="slow")],
                 [Call("GET", "/orders/export", at=0.4, label="second")]]
        with HttpLoad(base, calls, timeout=10) as run:
            time.sleep(0.2)
            held = scrape(base)["labkit_pool_in_use"]
            run.wait()
        assert held == 1
        assert run.result.statuses("slow") == {"200": 1}
        assert run.result.statuses("second") == {"503": 1}
        second = run.result.by_label("second")[0]
        assert '"PoolTimeoutError"' in second.body
        assert second.end - second.start >= 0.5  # it waited pool_timeout first
        metrics = scrape(base)
        assert metrics['labkit_errors_total{error="PoolTimeoutError"}'] == 1
        assert metrics["labkit_pool_checkout_errors_total"] == 1
        assert metrics["labkit_pool_checkout_wait_seconds_sum"] >= 0.5
        assert metrics["labkit_pool_checkout_wait_seconds_count"] >= 2
        assert metrics["labkit_pool_checkout_wait_seconds_max"] >= 0.5


@pytest.mark.parametrize(("target", "factory", "blocks"), [
    ("examples.fastapi_app:app", False, False),
    ("examples.fastapi_app:async_app", False, False),
    ("examples.pitfalls:create_pitfall_app", True, True),
], ids=["def-handler", "async-session", "sync-session-in-async-def"])
def test_a_slow_query_blocks_live_only_with_a_sync_session_in_async_def(
        target: str, factory: bool, blocks: bool, db_url: URL, observer: Engine,
        clean_example_tables: None, tmp_path: Path) -> None:
    """Pins: the example's ``/reports/slow`` (a ``def`` handler, or ``AsyncSession``) leaves
    the event loop free: ``/live`` keeps answering in milliseconds during a 1 s query.
    Documents the pitfall: a sync session inside ``async def`` holds every other request,
    ``/live`` included, until its query ends."""
    with observer.begin() as conn:
        conn.execute(text("CREATE TABLE example_orders (id int PRIMARY KEY, item text)"))
    with uvicorn_server(target, db_url, tmp_path / "uvicorn.log", factory=factory) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/reports/slow", params={"seconds": 60}).status_code == 422
        calls = [[Call("GET", "/reports/slow", params={"seconds": 1.0}, label="report")],
                 [Call("GET", "/live", at=0.4 + 0.1 * k) for k in range(4)]]
        with HttpLoad(base, calls, timeout=10) as run:
            pass
    assert run.result.statuses("report") == {"200": 1}
    assert run.result.statuses("/live") == {"200": 4}
    slowest = max(r.end - r.start for r in run.result.by_label("/live"))
    if blocks:
        assert slowest > 0.4, slowest  # waited for the query (sent 0.4 s into a 1 s sleep)
    else:
        assert slowest < 0.3, slowest


def test_background_task_with_the_request_session_loses_its_write(
        db_url: URL, observer: Engine, clean_example_tables: None, tmp_path: Path) -> None:
    """Documents the pitfall (examples/pitfalls.py): a background task handed the
    request's session runs after ``get_db`` closed it; its write begins a transaction
    nobody commits. The client got 202 three times; nothing is stored."""
    with observer.begin() as conn:
        conn.execute(text("CREATE TABLE example_receipts (order_id int PRIMARY KEY, "
                          "sent_at timestamptz NOT NULL DEFAULT now())"))
    with uvicorn_server("examples.pitfalls:create_pitfall_app", db_url,
                        tmp_path / "uvicorn.log", factory=True) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            assert [client.post(f"/orders/{n}/receipt").status_code
                    for n in (1, 2, 3)] == [202, 202, 202]
        time.sleep(0.5)
    assert _poll(observer, "SELECT count(*) FROM example_receipts", until=0, timeout=1) == 0


# --- a client that hangs up; a dependency with a session of its own ----------------------

# What the service's connections are doing, seen by the server (the observer's own
# backend excluded): "active" while a query runs, "idle in transaction" if one leaked.
_SERVICE_STATES = ("SELECT state, count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                   "AND datname = current_database() "
                   "AND query LIKE '%AS orders FROM example_orders%' GROUP BY state")


def _hang_up(base: str, path: str, params: dict[str, float], *, after: float
             ) -> tuple[float, Sampler]:
    """Send one request, give up after ``after`` s (read timeout: the socket is closed);
    return when it hung up, on the sampler's clock, with ``/metrics`` sampled for 2 s."""
    with HttpLoad(base, [[Call("GET", path, params=params)]], timeout=after) as run, \
            metrics_sampler(base, interval=0.02, t0=run.t0) as sampler:
        run.wait()
        time.sleep(2.0)
    (record,) = run.result.records
    assert record.error == "ReadTimeout", record
    return record.end, sampler


def _in_use_until(sampler: Sampler, after: float) -> float:
    """The last sampled time (after ``after``) at which a connection was checked out."""
    times, in_use = sampler.series("labkit_pool_in_use")
    return max((t for t, v in zip(times, in_use) if v > 0 and t >= after), default=after)


@EXAMPLE_TARGETS
def test_a_client_hanging_up_frees_its_connection_only_when_the_query_ends(
        target: str, db_url: URL, observer: Engine, clean_example_tables: None,
        tmp_path: Path) -> None:
    """Pins what a disconnect does to a plain request, sync and async: nothing cancels
    the handler, so its 1.5 s query runs on and the connection is checked in when it
    ends (about 1.2 s after a hang-up at 0.3 s), cleanly: no invalidation, nothing left
    idle in transaction."""
    with uvicorn_server(target, db_url, tmp_path / "uvicorn.log") as base:
        hung_up, sampler = _hang_up(base, "/reports/slow", {"seconds": 1.5}, after=0.3)
        held_for = _in_use_until(sampler, hung_up) - hung_up
        metrics = scrape(base)
    assert 0.7 < held_for < 2.0, held_for
    assert sampler.series("labkit_pool_in_use")[1][-1] == 0
    assert metrics["labkit_pool_invalidations_total"] == 0
    with observer.connect() as conn:
        assert dict(conn.execute(text(_SERVICE_STATES)).all()) == {}


def test_a_cancelled_async_stream_gives_its_connection_back_at_once(
        db_url: URL, observer: Engine, clean_example_tables: None, tmp_path: Path) -> None:
    """Pins the async stream's clean-up under cancellation: Starlette cancels the stream
    when its client hangs up, mid-query here; ``manager.session()`` (rollback and close
    shielded) and SQLAlchemy's pool hand the connection back within a few sampling
    intervals, closed (invalidated) rather than reused half-read, and the server is
    left with no connection idle in transaction. The query itself runs on server-side."""
    with uvicorn_server("examples.fastapi_app:async_app", db_url,
                        tmp_path / "uvicorn.log") as base:
        hung_up, sampler = _hang_up(base, "/reports/feed", {"seconds": 1.5, "chunks": 1},
                                    after=0.3)
        held_for = _in_use_until(sampler, hung_up) - hung_up
        metrics = scrape(base)
        with observer.connect() as conn:
            states = dict(conn.execute(text(_SERVICE_STATES)).all())
    assert held_for < 0.4, held_for
    assert metrics["labkit_pool_invalidations_total"] == 1
    assert metrics["labkit_pool_checkins_total"] == metrics["labkit_pool_checkouts_total"]
    assert "idle in transaction" not in states, states


def test_a_dependency_with_its_own_session_stalls_a_small_pool_and_a_shared_one_does_not(
        db_url: URL, observer: Engine, clean_example_tables: None, tmp_path: Path) -> None:
    """Pins ``GET /orders/summary`` with a pool of 2: the reference's ``Caller`` shares
    the request's session (one connection per request), so six requests at once are all
    answered. Documents the pitfall: a dependency with a session of its own makes each
    request hold one connection while it waits for a second; they stall until
    ``pool_timeout`` and are answered 503 ``PoolTimeoutError``."""
    with observer.begin() as conn:
        conn.execute(text("CREATE TABLE example_orders (id int PRIMARY KEY, item text)"))
    pool = {"DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "0", "DB_POOL_TIMEOUT": "1"}
    burst = [[Call("GET", "/orders/summary", params={"seconds": 0.2})] for _ in range(6)]
    outcomes = {}
    for name, target, factory in [("shared", "examples.fastapi_app:app", False),
                                  ("own", "examples.pitfalls:create_pitfall_app", True)]:
        with uvicorn_server(target, db_url, tmp_path / f"{name}.log", factory=factory,
                            env=pool) as base:
            with HttpLoad(base, burst, timeout=10) as run:
                pass
            outcomes[name] = run.result
    assert outcomes["shared"].statuses() == {"200": 6}
    assert {r.body.count('"caller"') for r in outcomes["shared"].records} == {1}
    failed = [r for r in outcomes["own"].records if not r.ok]
    assert failed, outcomes["own"].statuses()
    assert all(r.status == 503 and '"PoolTimeoutError"' in r.body
               and r.end - r.start >= 0.9 for r in failed)



@pytest.mark.parametrize(("cleanup", "invalidated"), [
    ("session_scope", 0), ("anyio_shield", 0), ("unshielded", 1)])
def test_a_cancelled_clean_up_needs_a_shield_to_roll_back_and_reuse_the_connection(
        cleanup: str, invalidated: int, db_url: URL, observer: Engine, tmp_path: Path) -> None:
    """Pins what protects an async clean-up that Starlette cancels (client hung up while
    the stream's session was idle in a transaction): shielded (labkit's
    ``manager.session()``, or ``anyio.CancelScope(shield=True)``), the ROLLBACK runs and
    the connection goes back to the pool for reuse. Documents the unshielded
    ``await session.close()``: cancelled again at once, so the pool closes the connection
    instead (one invalidation, a new connection for the next request). Either way nothing
    stays checked out or idle in transaction."""
    with uvicorn_server("examples.pitfalls:create_cancellation_app", db_url,
                        tmp_path / "uvicorn.log", factory=True) as base:
        hung_up, sampler = _hang_up(base, "/reports/held", {"cleanup": cleanup, "seconds": 2.0},
                                    after=0.3)
        held_for = _in_use_until(sampler, hung_up) - hung_up
        metrics = scrape(base)
        with observer.connect() as conn:
            idle_in_transaction = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
                "datname = current_database() AND state = 'idle in transaction' AND "
                "query = 'SELECT 1'")).scalar()
    assert held_for < 0.4, held_for
    assert metrics["labkit_pool_in_use"] == 0
    assert metrics["labkit_pool_invalidations_total"] == invalidated, metrics
    assert idle_in_transaction == 0
