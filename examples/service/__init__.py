"""A reference FastAPI service on labkit, in four small modules.

- ``db.py``: the lifespan (one ``SessionManager`` per application: wait for the
  database, check the connection budget, create the tables) and ``SessionDep``, the
  session a handler takes, committed before the response is sent;
- ``routes.py``: the routes as module-level routers (probes, orders, payments, reports),
  ``def`` handlers on a ``Session``; ``async_routes.py``, the async twin;
- ``metrics.py``: ``GET /metrics``, ``PoolMetrics.snapshot()`` for Prometheus;
- ``main.py``: ``create_app()`` / ``create_async_app()`` and the error handlers.

Serve it with ``uvicorn examples.service.main:app`` (or ``:async_app``).
"""
