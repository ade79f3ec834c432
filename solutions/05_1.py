"""Exercise 05.1, solved: the dependency shares the request's session.

What was wrong: ``get_caller`` opened a session of its own (``manager.session()``) and,
as a ``yield`` dependency, kept it until the request ended, next to the handler's
``SessionDep``. Each request then held two pooled connections at once: with as many
simultaneous requests as the pool has connections, each held one and waited for a
second, until ``pool_timeout`` answered them 503. Taking ``session: SessionDep`` as a
parameter, the dependency gets the very session the handler gets (FastAPI resolves a
dependency once per request), so a request needs one connection.
"""

from typing import Annotated

from fastapi import Depends
from sqlalchemy import text
from sqlalchemy.orm import Session

from labkit.web import get_db

SessionDep = Annotated[Session, Depends(get_db, scope="function")]


def get_caller(session: SessionDep) -> str:
    """Return the database role serving the request, read on the request's session."""
    return str(session.execute(text("SELECT current_user")).scalar_one())
