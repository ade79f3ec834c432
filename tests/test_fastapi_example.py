"""The FastAPI recipe, exercised with real HTTP requests against the real server.

Two ways of sending them: FastAPI's in-process ``TestClient`` for the routes and the
health check, and real ``uvicorn`` processes for the one promise that depends on when
bytes leave the server: a client never receives a 2xx for a transaction that did not
commit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import examples.fastapi_app as example
from labkit import (
    TEST_POOL,
    AsyncSessionManager,
    SessionManager,
    Settings,
    create_engine,
    get_async_db,
    get_db,
)
from labkit.lab import LocalServer

ROOT = Path(__file__).resolve().parents[1]
UVICORN_START_TIMEOUT = 30.0
# A table whose uniqueness is checked at COMMIT, not at INSERT: the duplicate passes the
# handler and only the COMMIT can report it, as a serialization failure or a connection
# lost during COMMIT would. The example's CREATE TABLE IF NOT EXISTS leaves it as it is.
DEFERRED_ORDERS = ("CREATE TABLE example_orders (id int NOT NULL, item text NOT NULL, "
                   "CONSTRAINT example_orders_id_deferred UNIQUE (id) "
                   "DEFERRABLE INITIALLY DEFERRED)")


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
def uvicorn_server(target: str, db_url: URL, log: Path, *,
                   factory: bool = False) -> Iterator[str]:
    """Run ``uvicorn target`` as a real process on a free port; yield its base URL.

    It serves once its lifespan has started (uvicorn accepts connections only then),
    and is stopped with SIGTERM, so its lifespan closes the pool.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [sys.executable, "-m", "uvicorn", target, "--app-dir", str(ROOT),
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    if factory:
        command.append("--factory")
    env = {**os.environ, "DATABASE_URL": db_url.render_as_string(hide_password=False)}
    env.pop("ENVIRONMENT", None)
    base = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"uvicorn {target} exited with {process.returncode}:\n"
                            f"{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/openapi.json", timeout=1).status_code == 200:
                    break
            if time.monotonic() - start > UVICORN_START_TIMEOUT:
                pytest.fail(f"uvicorn {target} did not serve within {UVICORN_START_TIMEOUT} s:"
                            f"\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        print(f"uvicorn {target}: serving after {time.monotonic() - start:.2f} s")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def test_an_app_taking_get_db_without_function_scope_refuses_to_start(
        settings: Settings, clean_orders: None) -> None:
    """Pins: the example's lifespan refuses a route whose session would commit after
    the response (plain ``Depends(get_db)``), naming the route; before, it started."""
    app = example.create_app(settings)

    @app.post("/refunds/{refund_id}", status_code=201)
    def refund(refund_id: int, session: Annotated[Session, Depends(get_db)]) -> None:
        """The mistake: the default scope, "request"."""

    with pytest.raises(RuntimeError, match=r"POST /refunds/\{refund_id\}"), TestClient(app):
        pass


def test_the_module_level_apps_neither_connect_nor_read_settings_at_import() -> None:
    """Pins: ``uvicorn examples.fastapi_app:app`` (and ``:async_app``) have an app to
    serve, and importing it reads no settings: with ``ENVIRONMENT=production`` and no
    ``DATABASE_URL``, reading them would raise. Before, the module had no ``app``."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["ENVIRONMENT"] = "production"
    probe = ("import examples.fastapi_app as m; "
             "print(type(m.app).__name__, type(m.async_app).__name__, "
             "hasattr(m.app.state, 'db'), hasattr(m.async_app.state, 'db'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FastAPI", "FastAPI", "False", "False"]


def test_health_is_200_when_the_database_answers(settings: Settings, clean_orders: None,
                                                 password: str) -> None:
    with TestClient(example.create_app(settings)) as client:
        response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["ok"] is True
    assert password not in response.text


def test_health_is_503_within_its_timeout_when_the_database_is_stopped(
        throwaway_server: LocalServer) -> None:
    settings = Settings(url=throwaway_server.info().url(), connect_timeout=1)
    app = example.create_app(settings)
    with TestClient(app) as client:
        healthy = client.get("/health")
        throwaway_server.stop()
        try:
            start = time.monotonic()
            down = client.get("/health")
            elapsed = time.monotonic() - start
        finally:
            throwaway_server.start()
        assert healthy.status_code == 200
        assert down.status_code == 503
        assert down.json()["error"] in {"DatabaseUnavailableError", "ConnectionLostError"}
        assert elapsed < example.HEALTH_TIMEOUT + 1.0
        assert throwaway_server.info().password not in down.text
        recovered = client.get("/health")
        assert recovered.status_code == 200
    with create_engine(Settings(url=throwaway_server.info().url()), pool=TEST_POOL).begin() as c:
        c.execute(text("DROP TABLE IF EXISTS example_orders"))
