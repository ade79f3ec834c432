"""Exercises of notebook 05, a request's life in a real web server.

05.1: a FastAPI dependency that opens a session of its own next to the request's
``SessionDep``, so that every request holds two pooled connections at once and a burst
as large as the pool stalls until ``pool_timeout``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Annotated, Any

import httpx
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from labkit import DEVELOPMENT_POOL, Settings
from labkit.web import SessionManager, get_db
from labkit.lab.exercises import ExerciseFailed, exercise, require
from labkit.lab.server import free_port

_APPLICATION = "labkit-exercise-08-1"
# The pool the check serves with, and a burst of three times as many requests.
_POOL_SIZE = 2
_BURST = 3 * _POOL_SIZE
_POOL_TIMEOUT_S = 2.0
_QUERY_S = 0.2
_START_TIMEOUT_S = 10.0

_SessionDep = Annotated[Session, Depends(get_db, scope="function")]


def _service(get_caller: Any, url: URL) -> FastAPI:
    """The route under test: the handler's query on ``SessionDep``, plus ``get_caller``."""
    settings = Settings(url=url, application_name=_APPLICATION, statement_timeout_ms=5000,
                        connect_timeout=3,
                        pool=DEVELOPMENT_POOL.replace(pool_size=_POOL_SIZE, max_overflow=0,
                                                      pool_timeout=_POOL_TIMEOUT_S))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = SessionManager()
        manager.init(settings)
        app.state.db = manager
        try:
            yield
        finally:
            manager.close()

    app = FastAPI(lifespan=lifespan)

    async def pool_timeout(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__}, status_code=503)

    app.add_exception_handler(sa_exc.TimeoutError, pool_timeout)

    # The default-value form: this module's annotations are strings, resolved in its
    # globals, where the learner's get_caller is not.
    @app.get("/summary")
    def summary(session: _SessionDep,
                caller: str = Depends(get_caller)) -> dict[str, object]:
        session.execute(text("SELECT pg_sleep(:s)"), {"s": _QUERY_S})
        return {"caller": caller}

    return app


@contextlib.contextmanager
def _served(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="critical", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True, name="exercise-08-1-uvicorn")
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ExerciseFailed("the service did not start: does the code cell run "
                                     "on its own?")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _burst(base_url: str) -> list[tuple[int | None, float, str]]:
    """Send ``_BURST`` requests at once; return (status, seconds, body) of each."""
    answers: list[tuple[int | None, float, str]] = []
    lock = threading.Lock()

    def one() -> None:
        start = time.monotonic()
        try:
            response = httpx.get(f"{base_url}/summary", timeout=5 * _POOL_TIMEOUT_S)
            status, body = response.status_code, response.text
        except httpx.HTTPError as exc:
            status, body = None, type(exc).__name__
        with lock:
            answers.append((status, time.monotonic() - start, body))

    threads = [threading.Thread(target=one) for _ in range(_BURST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@exercise("05.1", title="A dependency that takes a second connection",
          hint="Let get_caller take the request's session as a parameter "
               "(session: SessionDep) instead of opening one with manager.session(): "
               "FastAPI resolves SessionDep once per request and shares it, so each "
               "request holds one connection. Keep scope=\"function\" in SessionDep.")
def check_one_connection_per_request(namespace: Mapping[str, Any], url: URL) -> str:
    """Serve a route using the learner's ``get_caller``; a burst of twice the pool's size
    must be answered 200, each with the database role as the caller."""
    get_caller = require(namespace, "get_caller", callable)
    with _served(_service(get_caller, url)) as base_url:
        answers = _burst(base_url)
        with httpx.Client(timeout=5) as client:
            single = client.get(f"{base_url}/summary")
    if single.status_code != 200:
        raise ExerciseFailed(f"even a single request failed ({single.status_code}: "
                             f"{single.text[:200]})")
    role = url.username or ""
    caller = single.json().get("caller")
    if role and caller != role:
        raise ExerciseFailed(f"get_caller should return the database role ({role!r}), "
                             f"got {caller!r}")
    failed = [(status, seconds) for status, seconds, _ in answers if status != 200]
    if failed:
        slowest = max(seconds for _, seconds in failed)
        raise ExerciseFailed(
            f"{len(failed)} of {_BURST} simultaneous requests failed "
            f"({sorted({str(status) for status, _ in failed})}, after up to {slowest:.1f} s) "
            f"with a pool of {_POOL_SIZE} (pool_timeout {_POOL_TIMEOUT_S:g} s): each request "
            "held one connection for get_caller and waited for a second for the handler")
    slowest = max(seconds for _, seconds, _ in answers)
    return (f"{_BURST} simultaneous requests on a pool of {_POOL_SIZE}: all 200, the slowest "
            f"in {slowest:.2f} s; one connection per request")
