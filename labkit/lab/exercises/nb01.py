"""Exercises of notebook 01 (first contact): the request dependency."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import sessionmaker

from labkit.lab.exercises import (
    ExerciseFailed,
    exercise,
    require,
    scratch_engine,
    scratch_schema,
    unique_name,
)

REQUESTS = 6  # every second one fails


class HandlerFailed(Exception):
    """The error the check's handler raises after writing, as a failing request would."""


@exercise("01.1", title="A request dependency that leaks its session",
          hint="Wrap the yield: commit after it in `try`, roll back in `except` (and "
               "re-raise), close in `finally`, so the failing path runs it too.")
def leaky_dependency(namespace: Mapping[str, Any], url: URL) -> str:
    """Play the framework for 6 requests, every second one failing after it wrote a row.

    Passes when no connection is left checked out or idle in transaction on the server,
    the rows of the successful requests are committed, those of the failed ones are not,
    and the handler's error reaches the framework.
    """
    get_db = require(namespace, "get_db", callable)
    app_name = unique_name("labkit-ex01")
    with scratch_schema(url) as schema:
        engine = scratch_engine(url, schema=schema, application_name=app_name,
                                pool_size=REQUESTS, pool_timeout=2.0)
        observer = scratch_engine(url, schema=schema, pool_size=1)   # sees what others left
        keep: list[Any] = []   # the framework's references, so that nothing is collected early
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE orders (id int PRIMARY KEY)"))
            factory = sessionmaker(engine)
            swallowed = _play_requests(get_db, factory, keep)
            leaked = engine.pool.checkedout()  # type: ignore[attr-defined]
            with observer.connect() as conn:
                idle_in_tx = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name "
                    "AND state LIKE 'idle in transaction%'"), {"name": app_name}).scalar_one()
                stored = conn.execute(text("SELECT id FROM orders ORDER BY id")).scalars().all()
        finally:
            for session in keep:
                if hasattr(session, "close"):
                    session.close()
            engine.dispose()
            observer.dispose()
    failed = REQUESTS // 2
    if leaked or idle_in_tx:
        raise ExerciseFailed(
            f"after {REQUESTS} requests ({failed} failed), {leaked} connections are still "
            f"checked out of the pool and the server shows {idle_in_tx} sessions idle in "
            "transaction: a session that is not closed keeps its connection (and, idle in "
            "transaction, the locks of what it wrote)")
    expected = list(range(0, REQUESTS, 2))
    if stored != expected:
        raise ExerciseFailed(f"stored order ids {stored}, expected {expected}: the "
                             "successful requests must be committed, the failed ones not")
    if swallowed:
        raise ExerciseFailed(f"{swallowed} failed requests looked successful: `get_db` "
                             "swallowed the handler's error; re-raise it after the rollback")
    return (f"{REQUESTS} requests ({failed} failed): {len(stored)} committed, "
            "0 connections left checked out, 0 idle in transaction")


def _play_requests(get_db: Any, factory: sessionmaker[Any], keep: list[Any]) -> int:
    """Drive ``get_db`` as FastAPI does; return how many failures it swallowed."""
    swallowed = 0
    for i in range(REQUESTS):
        dependency = get_db(factory)
        session = next(dependency)
        keep += [dependency, session]
        session.execute(text("INSERT INTO orders VALUES (:id)"), {"id": i})
        if i % 2 == 0:                       # the handler returned: resume after the yield
            next(dependency, None)
            continue
        error = HandlerFailed(f"request {i} failed after writing")
        try:                                 # the handler raised: throw it into get_db
            dependency.throw(error)
        except HandlerFailed:
            pass
        except StopIteration:
            swallowed += 1
    return swallowed
