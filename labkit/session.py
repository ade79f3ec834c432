"""Sessions: factories (``autoflush``, ``expire_on_commit`` off) and a transactional scope."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine, exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn

from .engine import _ERROR_SEEN
from .errors import CommitOutcomeUnknownError, ProgrammingError, redact, sqlstate_of

__all__ = ["async_session_scope", "create_async_sessionmaker", "create_sessionmaker",
           "session_scope"]
_DEFAULTS = {"autoflush": False, "expire_on_commit": False}
_UNKNOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03", "40003"})


def create_sessionmaker(engine: Engine, **options: Any) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine`` (autoflush and expire_on_commit off)."""
    return sessionmaker(bind=engine, **{**_DEFAULTS, **options})


def create_async_sessionmaker(engine: AsyncEngine,
                              **options: Any) -> async_sessionmaker[AsyncSession]:
    """Async twin of [`create_sessionmaker`][labkit.create_sessionmaker]."""
    return async_sessionmaker(bind=engine, **{**_DEFAULTS, **options})


def _raise_if_aborted(exc: Exception) -> None:
    if isinstance(exc, sa_exc.DBAPIError) and sqlstate_of(exc) == "25P02":
        raise ProgrammingError(
            "PostgreSQL rolled this transaction back: a statement in the block failed and the "
            "block caught the error and went on, so nothing was stored. Put a savepoint around "
            "the statement that may fail (with session.begin_nested(): ...), or let the error "
            "end the scope. (SQLSTATE 25P02)", sqlstate="25P02") from exc


def _raise_if_outcome_unknown(exc: Exception) -> None:
    code = sqlstate_of(exc)
    if not (exc.connection_invalidated or code is None or code[:2] == "08"
            or code in _UNKNOWN_SQLSTATES if isinstance(exc, sa_exc.DBAPIError)
            else isinstance(exc, (OSError, EOFError, TimeoutError))):
        return  # a refusal on an open connection (deferred constraint...): rolled back
    orig = getattr(exc, "orig", None) or exc
    detail = redact(" ".join(str(orig).split())[:300]) or "no message"
    raise CommitOutcomeUnknownError(
        "The connection was lost while COMMIT was in flight, so the outcome is unknown: the "
        "work may be stored. Look it up by a key you chose, or make it idempotent and use "
        f"run_in_transaction(..., idempotent=True). [{type(orig).__name__}: {detail}]",
        sqlstate=code) from exc


@contextlib.contextmanager
def _raising(translate: Callable[[Exception], None]) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        translate(exc)
        raise


def check_and_commit(connection: Connection, commit: Callable[[], None]) -> None:
    """Commit; raise instead if the transaction was aborted or COMMIT's answer was lost."""
    if connection.info.get(_ERROR_SEEN):
        with _raising(_raise_if_aborted):
            connection.exec_driver_sql("SELECT 1")
    with _raising(_raise_if_outcome_unknown):
        commit()


def _flush_and_commit(session: Session) -> None:
    session.flush()
    if session.in_transaction():
        check_and_commit(session.connection(), session.commit)


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Run a block in one transaction: commit, or roll back on error; always close. Raises
    ``ProgrammingError`` if it swallowed a database error, ``CommitOutcomeUnknownError``."""
    session = factory()
    try:
        yield session
        _flush_and_commit(session)
    except BaseException:
        with contextlib.suppress(Exception):
            session.rollback()
        raise
    finally:
        session.close()


@contextlib.asynccontextmanager
async def async_session_scope(factory: async_sessionmaker[AsyncSession]
                              ) -> AsyncIterator[AsyncSession]:
    """Async twin of ``session_scope``; rollback and close are shielded from cancellation."""
    session = factory()
    try:
        yield session
        await greenlet_spawn(_flush_and_commit, session.sync_session)  # one hop, not three
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(session.rollback())
        raise
    finally:
        with contextlib.suppress(Exception):  # a cancelled task still returns its connection
            await asyncio.shield(session.close())
