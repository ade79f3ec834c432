"""Exercises of notebook 04 (commit semantics): where the transaction ends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import sessionmaker
from sqlalchemy.orm.exc import DetachedInstanceError

from labkit.lab.exercises import (
    ExerciseFailed,
    exercise,
    require,
    scratch_engine,
    scratch_schema,
)

OPENING = {1: 100, 2: 100}


def _balances(engine: Any) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, balance FROM accounts ORDER BY id")).all()
    return {int(i): int(b) for i, b in rows}


@exercise("04.1", title="A transfer that commits too early",
          hint="One transfer is one transaction: run both UPDATEs in one "
               "`with factory.begin() as session:` block (it commits at the end and rolls "
               "back on error) and remove the commit in the middle.")
def early_commit(namespace: Mapping[str, Any], url: URL) -> str:
    """Transfer 30 between two accounts, then 50 to an account that does not exist.

    Passes when the first transfer moves the money, the second raises and changes no
    balance, and every session is closed.
    """
    transfer = require(namespace, "transfer", callable)
    with scratch_schema(url) as schema:
        engine = scratch_engine(url, schema=schema, pool_size=2)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE accounts (id int PRIMARY KEY, "
                                  "balance int NOT NULL CHECK (balance >= 0))"))
                for account, balance in OPENING.items():
                    conn.execute(text("INSERT INTO accounts VALUES (:i, :b)"),
                                 {"i": account, "b": balance})
            factory = sessionmaker(engine)
            transfer(factory, 1, 2, 30)
            after_good = _balances(engine)
            raised: BaseException | None = None
            try:
                transfer(factory, 1, 99, 50)
            except Exception as exc:        # the learner's code decides which error
                raised = exc
            after_bad = _balances(engine)
            left_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        finally:
            engine.dispose()
    if after_good != {1: 70, 2: 130}:
        raise ExerciseFailed(f"transfer(factory, 1, 2, 30) left the balances at {after_good}, "
                             "expected {1: 70, 2: 130}: the good transfer must be committed")
    if after_bad != after_good:
        lost = sum(after_good.values()) - sum(after_bad.values())
        raise ExerciseFailed(
            f"transfer(factory, 1, 99, 50) to an account that does not exist changed the "
            f"balances from {after_good} to {after_bad}: {lost} vanished, because the debit "
            "was committed before the credit failed")
    if raised is None:
        raise ExerciseFailed("transfer(factory, 1, 99, 50) to an account that does not "
                             "exist returned quietly: the caller must learn that it failed")
    if left_out:
        raise ExerciseFailed(f"{left_out} connections were left checked out: close the session")
    return ("the good transfer committed both updates; the failed one raised "
            f"{type(raised).__name__} and changed nothing (total still {sum(after_bad.values())})")


@exercise("04.2", title="An object read after its session committed and closed",
          hint="A commit expires every loaded attribute (SQLAlchemy's default), and a "
               "closed session cannot reload them. Open the session with "
               "`factory(expire_on_commit=False)` (labkit's sessions do), or refresh the "
               "object before the session closes.")
def expired_after_commit(namespace: Mapping[str, Any], url: URL) -> str:
    """Create a note through a factory with SQLAlchemy's defaults, then read it back.

    Passes when the returned object's ``id`` and ``text`` can be read after the function
    returned, the note is committed, and no connection is left checked out.
    """
    create_note = require(namespace, "create_note", callable)
    base = require(namespace, "ExerciseBase")
    metadata = getattr(base, "metadata", None)
    if metadata is None or "notes" not in metadata.tables:
        raise ExerciseFailed("`ExerciseBase` should be the declarative base of the `Note` "
                             "model (table `notes`)")
    with scratch_schema(url) as schema:
        engine = scratch_engine(url, schema=schema, pool_size=2)
        selects_after: list[str] = []
        try:
            metadata.create_all(engine)
            factory = sessionmaker(engine)             # SQLAlchemy's defaults, on purpose
            note = create_note(factory, 7, "buy milk")
            event.listen(engine, "before_cursor_execute",
                         lambda conn, cursor, statement, *args: selects_after.append(statement))
            try:
                seen = (note.id, note.text)
            except DetachedInstanceError as exc:
                raise ExerciseFailed(
                    "reading the returned note raised DetachedInstanceError "
                    f"({str(exc).split(' (Background')[0]}): the commit expired its attributes and "
                    "the session that could have reloaded them is closed") from None
            extra = len(selects_after)
            with engine.connect() as conn:
                stored = conn.execute(text("SELECT id, text FROM notes")).all()
            left_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        finally:
            engine.dispose()
    if seen != (7, "buy milk"):
        raise ExerciseFailed(f"the returned note reads {seen}, expected (7, 'buy milk')")
    if [tuple(row) for row in stored] != [(7, "buy milk")]:
        raise ExerciseFailed(f"the table holds {stored}: the note must be committed")
    if left_out:
        raise ExerciseFailed(f"{left_out} connections were left checked out: close the session")
    return ("the note is committed and readable after its session closed, "
            f"with {extra} queries sent to read it")
