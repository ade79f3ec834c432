"""Solution 01.1: a request dependency that always hands its connection back.

What was wrong: the code after ``yield`` ran only when the handler returned. When the
handler raised, the framework threw the error into the generator at the ``yield``, so
neither ``commit()`` nor ``close()`` ran: the session kept its pooled connection, idle
in transaction on the server, holding the locks of what it had written. ``try`` /
``except`` / ``finally`` around the ``yield`` makes the failing path roll back, re-raise
and close too.
"""

from collections.abc import Iterator

from sqlalchemy.orm import Session, sessionmaker


def get_db(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session for one request: commit if the handler returns, roll back if it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except Exception:
        session.rollback()
        raise                 # the framework must still see the handler's error
    finally:
        session.close()       # the connection goes back to the pool, whatever happened
