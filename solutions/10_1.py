"""Exercise 10.1, solved: one transaction per test, joined by savepoints, rolled back.

What was wrong: the factory was bound to the engine, so every session got a connection
of its own and the code's ``commit()`` was a real ``COMMIT``: the row stayed for the
next test. Bound to one connection whose transaction the fixture began, with
``join_transaction_mode="create_savepoint"``, a session's ``commit()`` only releases a
savepoint and its ``rollback()`` returns to that savepoint (the test's set-up stays);
the fixture rolls the whole transaction back at the end. ``labkit.testing``'s
``isolated_sessionmaker`` is this fixture.
"""

import contextlib

from sqlalchemy.orm import sessionmaker


@contextlib.contextmanager
def per_test_sessions(engine):
    """Give one test a session factory; nothing the test or its code writes may outlive it."""
    with engine.connect() as connection:
        transaction = connection.begin()
        factory = sessionmaker(bind=connection, autoflush=False, expire_on_commit=False,
                               join_transaction_mode="create_savepoint")
        try:
            yield factory
        finally:
            if transaction.is_active:
                transaction.rollback()
