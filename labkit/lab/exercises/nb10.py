"""Exercises of notebook 10, testing against a real database.

10.1: a per-test fixture that must keep each test's writes to itself even though the
code under test commits, and must survive the code's own rollback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, Text, func, insert, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session, sessionmaker

from labkit import DEVELOPMENT_POOL, TEST_POOL, Settings, create_engine, session_scope
from labkit.lab.exercises import ExerciseFailed, exercise, require, unique_name

_APPLICATION = "labkit-exercise-10-1"


def _place_customer(factory: sessionmaker[Session], table: Table, name: str) -> None:
    """The code under test: one transaction, committed when the block ends."""
    with session_scope(factory) as session:
        session.execute(insert(table).values(name=name))


def _count(factory: Callable[[], Session], table: Table, name: str | None = None) -> int:
    query = select(func.count()).select_from(table)
    if name is not None:
        query = query.where(table.c.name == name)
    with factory() as session:
        return int(session.scalar(query) or 0)


def _fixture(per_test_sessions: Any, engine: Engine) -> contextlib.AbstractContextManager[Any]:
    made = per_test_sessions(engine)
    if not hasattr(made, "__enter__"):
        raise ExerciseFailed("per_test_sessions(engine) must return a context manager "
                             "(decorate the generator with @contextlib.contextmanager)")
    return made  # type: ignore[no-any-return]


@exercise("10.1", title="A test fixture that leaks what the code commits",
          hint="Open one connection, begin a transaction on it, bind the sessionmaker to "
               "that connection with join_transaction_mode=\"create_savepoint\", and roll "
               "the transaction back when the test ends (labkit.testing's "
               "isolated_sessionmaker does exactly this).")
def check_fixture_isolation(namespace: Mapping[str, Any], url: URL) -> str:
    """Run two tests through the learner's fixture; nothing may leak, the set-up must stay."""
    per_test_sessions = require(namespace, "per_test_sessions", callable)
    metadata = MetaData()
    table = Table(unique_name("ex10_customers"), metadata,
                  Column("id", Integer, primary_key=True, autoincrement=True),
                  Column("name", Text, nullable=False, unique=True))
    # Short timeouts: a fixture that holds a lock or a connection cannot hang the check.
    engine = create_engine(Settings(url=url, application_name=_APPLICATION,
                                    statement_timeout_ms=3000),
                           pool=DEVELOPMENT_POOL.replace(pool_size=2, max_overflow=0,
                                                         pool_timeout=3.0))
    observer = create_engine(Settings(url=url, application_name=f"{_APPLICATION}-observer",
                                      statement_timeout_ms=3000), pool=TEST_POOL)
    others: sessionmaker[Session] = sessionmaker(bind=observer)  # another client
    metadata.create_all(observer)
    try:
        # Test 1: the code under test commits an order.
        with _fixture(per_test_sessions, engine) as factory:
            _place_customer(factory, table, "ada")
            seen_by_test = _count(factory, table)
            seen_by_others = _count(others, table)
        if seen_by_test != 1:
            raise ExerciseFailed(f"inside the test, the code's committed row was seen "
                                 f"{seen_by_test} times instead of once: the test must see "
                                 "what its code wrote")
        if seen_by_others:
            raise ExerciseFailed("the code's commit was a real COMMIT: another connection "
                                 "saw the row while the test ran, and it stays for the next "
                                 "test (data leaks between tests)")
        left = _count(others, table)
        if left:
            raise ExerciseFailed(f"{left} row(s) of the first test were still in the table "
                                 "after it: the next test starts dirty")
        # Test 2: the test sets up a customer, the code fails on it and rolls back.
        with _fixture(per_test_sessions, engine) as factory:
            with factory() as session:
                session.execute(insert(table).values(name="grace"))
                session.commit()
            code_failed = False
            try:
                _place_customer(factory, table, "grace")   # duplicate: IntegrityError
            except sa_exc.IntegrityError:
                code_failed = True
            set_up_left = _count(factory, table, "grace")
        if not code_failed:
            raise ExerciseFailed("the second test's set-up was not visible to the code under "
                                 "test (its duplicate insert did not fail)")
        if set_up_left != 1:
            raise ExerciseFailed("the code under test rolled back after an error, and the "
                                 "test's own set-up disappeared with it: the code's "
                                 "rollback() reached the test's outer transaction")
        left = _count(others, table)
        if left:
            raise ExerciseFailed(f"{left} row(s) of the second test outlived it")
    finally:
        engine.dispose()
        with observer.connect() as conn:
            # A fixture that never let go of its connection would block the DROP.
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = :name AND pid <> pg_backend_pid()"),
                         {"name": _APPLICATION})
            conn.commit()
        metadata.drop_all(observer)
        observer.dispose()
    return ("2 tests: the code's commit stayed inside the first test (0 rows seen by another "
            "connection, 0 left after it); the second test's set-up survived the code's rollback")
