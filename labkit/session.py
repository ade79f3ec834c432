"""Sessions: factories and a transactional scope, sync and async.

``session_scope`` is the unit of work: flush and commit when the block ends, roll back
when it raises, always close. It never reports success for work PostgreSQL did not
store: a block that caught a database error and went on raises ``ProgrammingError``
(the transaction was aborted, and COMMIT would roll it back), and a COMMIT whose answer
was lost raises ``CommitOutcomeUnknownError``. Factories set ``autoflush=False`` and
``expire_on_commit=False``; docs/concepts/sessions.md measures what each changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .engine import _ERROR_SEEN
from .errors import CommitOutcomeUnknownError, ProgrammingError, redact, sqlstate_of

__all__ = ["async_session_scope", "create_async_sessionmaker", "create_sessionmaker",
           "session_scope"]

_DEFAULTS = {"autoflush": False, "expire_on_commit": False}
# A server ending the session (it may have committed first) or "resolution unknown".
_UNKNOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03", "40003"})


def create_sessionmaker(engine: Engine, **options: Any) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine`` (autoflush and expire_on_commit off)."""
    return sessionmaker(bind=engine, **{**_DEFAULTS, **options})


def create_async_sessionmaker(engine: AsyncEngine,
                              **options: Any) -> async_sessionmaker[AsyncSession]:
    """Async twin of [`create_sessionmaker`][labkit.create_sessionmaker]."""
    return async_sessionmaker(bind=engine, **{**_DEFAULTS, **options})


def _outcome_unknown(exc: BaseException) -> bool:
    """True when a failed COMMIT got no answer: a lost connection, never a server's "no".

    A refusal (deferred constraint, serialization failure) comes with a SQLSTATE on an
    open connection: rolled back. When in doubt: unknown, never "not committed".
    """
    if isinstance(exc, sa_exc.DBAPIError):
        code = sqlstate_of(exc)
        return bool(exc.connection_invalidated or code is None or code[:2] == "08"
                    or code in _UNKNOWN_SQLSTATES)
    return isinstance(exc, (OSError, EOFError, TimeoutError))


def _unknown_error(exc: BaseException) -> CommitOutcomeUnknownError:
    orig = getattr(exc, "orig", None) or exc
    detail = redact(" ".join(str(orig).split())[:300]) or "no message"
    return CommitOutcomeUnknownError(
        "The connection was lost while COMMIT was in flight, so the outcome is unknown: the "
        "server may have committed and lost only its answer. Do not run the work again "
        "blindly; look it up by a key you chose, or make it idempotent and use "
        f"run_in_transaction(..., idempotent=True). [{type(orig).__name__}: {detail}]",
        sqlstate=sqlstate_of(exc))


def _aborted_error(exc: BaseException) -> ProgrammingError:
    return ProgrammingError(
        "PostgreSQL rolled this transaction back: a statement in the block failed and the "
        "block caught the error and went on, so every later statement was ignored and "
        "COMMIT would have rolled back. Nothing was stored. Put a savepoint around the "
        "statement that may fail (with session.begin_nested(): ...), or let the error end "
        "the scope. (SQLSTATE 25P02)", sqlstate="25P02")


def check_and_commit(connection: Connection, commit: Callable[[], None]) -> None:
    """Commit, raising instead when PostgreSQL aborted the transaction or the answer was lost.

    The abort check costs a round trip only after a database error inside the
    transaction (labkit's engines record one); a savepoint that undid the error passes.
    """
    if connection.info.get(_ERROR_SEEN):
        try:
            connection.exec_driver_sql("SELECT 1")
        except sa_exc.DBAPIError as exc:
            if sqlstate_of(exc) == "25P02":
                raise _aborted_error(exc) from exc
            raise
    try:
        commit()
    except Exception as exc:
        if _outcome_unknown(exc):
            raise _unknown_error(exc) from exc
        raise


async def async_check_and_commit(connection: AsyncConnection,
                                 commit: Callable[[], Awaitable[None]]) -> None:
    """Async twin of ``check_and_commit``."""
    if connection.info.get(_ERROR_SEEN):
        try:
            await connection.exec_driver_sql("SELECT 1")
        except sa_exc.DBAPIError as exc:
            if sqlstate_of(exc) == "25P02":
                raise _aborted_error(exc) from exc
            raise
    try:
        await commit()
    except Exception as exc:
        if _outcome_unknown(exc):
            raise _unknown_error(exc) from exc
        raise


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Run a block in one transaction: commit on success, roll back on error, always close.

    Raises:
        ProgrammingError: the block caught a database error and went on (SQLSTATE 25P02).
        CommitOutcomeUnknownError: the connection was lost while COMMIT was in flight.
        Exception: any error of the block or the flush, unchanged; nothing was committed.

    Example:
        ```python
        with session_scope(factory) as session:
            session.add(Order(id=1))
        # committed here, and the connection is back in the pool
        ```
    """
    session = factory()
    try:
        yield session
        session.flush()
        if session.in_transaction():
            check_and_commit(session.connection(), session.commit)
    except BaseException:
        with contextlib.suppress(Exception):
            session.rollback()
        raise
    finally:
        session.close()


@contextlib.asynccontextmanager
async def async_session_scope(factory: async_sessionmaker[AsyncSession]
                              ) -> AsyncIterator[AsyncSession]:
    """Async twin of ``session_scope``; rollback and close are shielded from cancellation.

    A task cancelled while COMMIT is in flight gets ``CancelledError``: its outcome is
    unknown too.
    """
    session = factory()
    try:
        yield session
        await session.flush()
        if session.in_transaction():
            await async_check_and_commit(await session.connection(), session.commit)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(session.rollback())
        raise
    finally:
        with contextlib.suppress(Exception):  # a cancelled task still returns its connection
            await asyncio.shield(session.close())
