"""The FastAPI recipe, exercised with real HTTP requests against the real server."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from examples.fastapi_app import HEALTH_TIMEOUT, create_app
from labkit import TEST_POOL, Settings, create_engine


@pytest.fixture
def clean_orders(observer):
    with observer.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS example_orders"))
    yield
    with observer.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS example_orders"))


def test_request_commits_and_a_failing_request_rolls_back(settings, observer, clean_orders):
    with TestClient(create_app(settings)) as client:
        assert client.post("/orders/1", params={"item": "coffee"}).status_code == 201
        assert client.post("/orders/1", params={"item": "again"}).status_code == 409
        assert client.post("/orders/2/fail").status_code == 500
        assert client.get("/orders").json() == [{"id": 1, "item": "coffee"}]
        pool = client.app.state.db.engine.pool
        assert pool.checkedout() == 0
    with observer.connect() as conn:
        ids = conn.execute(text("SELECT id FROM example_orders")).scalars().all()
    assert ids == [1]


def test_health_is_200_when_the_database_answers(settings, clean_orders, password):
    with TestClient(create_app(settings)) as client:
        response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["ok"] is True
    assert password not in response.text


def test_health_is_503_within_its_timeout_when_the_database_is_stopped(throwaway_server):
    settings = Settings(url=throwaway_server.info().url(), connect_timeout=1)
    app = create_app(settings)
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
        assert elapsed < HEALTH_TIMEOUT + 1.0
        assert throwaway_server.info().password not in down.text
        recovered = client.get("/health")
        assert recovered.status_code == 200
    with create_engine(Settings(url=throwaway_server.info().url()), pool=TEST_POOL).begin() as c:
        c.execute(text("DROP TABLE IF EXISTS example_orders"))
