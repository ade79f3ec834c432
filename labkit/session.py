"""Sessions: factories, a transactional scope, a request dependency, a lifespan manager.

The unit of work is ``session_scope``: it flushes and commits when the block ends
normally, rolls back when it raises, and always closes the session so its connection
goes back to the pool. Everything else here is built on it.

A commit can fail in two ways that must not be confused:

- The server *answers* no (a deferred constraint, a serialization failure): the
  transaction is rolled back, and the driver's error is raised as it is.
- The connection is lost while ``COMMIT`` is in flight: the server may have committed
  and only its answer was lost. That is raised as ``CommitOutcomeUnknownError``, never
  as a retryable ``ConnectionLostError``, because running the work again could store it
  twice (``run_in_transaction`` only retries it for work declared idempotent).

Pending ORM changes are flushed *before* the commit, so a failure while flushing is an
ordinary error (nothing was committed); only the ``COMMIT`` itself can end "unknown".

Sessions are made with ``autoflush=False`` (SQL is sent when you flush or commit, not
behind your back on every query) and ``expire_on_commit=False`` (objects stay readable
after commit without a new SELECT per attribute; notebook 03 counts the difference).
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

try:  # Only for FastAPI: it injects the request into a parameter annotated as Request.
    from starlette.requests import Request
except ImportError:  # the core works without it
    Request = Any  # type: ignore[misc,assignment]

from labkit.config import Settings
from labkit.engine import create_async_engine, create_engine
from labkit.errors import CommitOutcomeUnknownError, LabkitError, _sqlstate, redact

__all__ = [
    "AsyncSessionManager",
    "SessionManager",
    "async_session_scope",
    "create_async_sessionmaker",
    "create_sessionmaker",
    "get_async_db",
    "get_db",
    "session_scope",
]


def create_sessionmaker(engine: Engine, **options: Any) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine`` (autoflush and expire_on_commit off)."""
    return sessionmaker(bind=engine, **{"autoflush": False, "expire_on_commit": False, **options})


def create_async_sessionmaker(engine: AsyncEngine,
                              **options: Any) -> async_sessionmaker[AsyncSession]:
    """Async twin of [`create_sessionmaker`][labkit.create_sessionmaker]."""
    return async_sessionmaker(bind=engine,
                              **{"autoflush": False, "expire_on_commit": False, **options})


# SQLSTATEs that say nothing about whether a COMMIT in flight was committed: the server
# ending the session (it may have committed first), or "resolution unknown" itself.
_OUTCOME_UNKNOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03", "40003"})

_COMMIT_OUTCOME_UNKNOWN = (
    "The connection was lost while COMMIT was in flight, so the outcome is unknown: the "
    "server may have committed the transaction and lost only its answer, or not. Do not "
    "run the work again blindly, it could be stored twice. Check whether it was stored "
    "(look it up by a key you chose), or make the work idempotent (an idempotency key with "
    "ON CONFLICT DO NOTHING) and retry it with run_in_transaction(..., idempotent=True).")


def _commit_outcome_unknown(exc: BaseException) -> bool:
    """Return True when a failed COMMIT got no answer from the server.

    An answer that says no (a deferred unique violation, a serialization failure) is a
    definite rollback: it comes with a SQLSTATE on a connection that is still open. A
    lost or invalidated connection, a connection-class SQLSTATE (08), a server ending the
    session (57P0x), or a driver error with no SQLSTATE at all (a socket error, a client
    timeout) leaves the outcome unknown. When in doubt: unknown, never "not committed".
    """
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        code = _sqlstate(exc)
        return code is None or code[:2] == "08" or code in _OUTCOME_UNKNOWN_SQLSTATES
    return isinstance(exc, (OSError, EOFError, TimeoutError, asyncio.TimeoutError))


def _outcome_unknown_error(exc: BaseException) -> CommitOutcomeUnknownError:
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    detail = redact(" ".join(lines[:2])[:300])
    return CommitOutcomeUnknownError(f"{_COMMIT_OUTCOME_UNKNOWN} [{type(orig).__name__}: "
                                     f"{detail or 'no message'}]")


def _commit(commit: Callable[[], None]) -> None:
    """Run ``commit()``; raise ``CommitOutcomeUnknownError`` if its answer was lost."""
    try:
        commit()
    except Exception as exc:
        if _commit_outcome_unknown(exc):
            raise _outcome_unknown_error(exc) from exc
        raise


async def _async_commit(commit: Callable[[], Awaitable[None]]) -> None:
    """Async twin of ``_commit``."""
    try:
        await commit()
    except Exception as exc:
        if _commit_outcome_unknown(exc):
            raise _outcome_unknown_error(exc) from exc
        raise


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Run a block in one transaction: flush and commit on success, roll back on error, close.

    The block's pending changes are flushed first: a failure there (a constraint
    checked at once, a lost connection) is raised as it is, and nothing was committed,
    so running the whole block again is safe. Then ``COMMIT`` is sent:

    - if the server answers with an error (a deferred constraint, a serialization
      failure), the transaction was rolled back, and that error is raised as it is;
    - if the connection is lost before the answer arrives, the server may have
      committed or not: ``CommitOutcomeUnknownError`` is raised, chained to the
      driver's error. It is not transient: do not simply run the block again.

    Any other exception propagates unchanged, even when the rollback itself fails (a
    dead connection cannot roll back; closing it discards it from the pool). Commit
    inside the block yourself and a lost answer is yours to handle: the scope can only
    guard the commit it makes.

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
        _commit(session.commit)
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

    A task cancelled while ``COMMIT`` is in flight gets ``CancelledError`` (cancellation
    is never turned into another error): its commit's outcome is unknown too.
    """
    session = factory()
    try:
        yield session
        await session.flush()
        await _async_commit(session.commit)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(session.rollback())
        raise
    finally:
        # A cancelled task must still hand its connection back to the pool.
        with contextlib.suppress(Exception):
            await asyncio.shield(session.close())


def get_db(request: Request) -> Iterator[Session]:
    """Yield the request's session: commit when the handler returns, roll back if it raises.

    With FastAPI, declare it with ``scope="function"`` (FastAPI 0.121 or later); the
    scope is required, not a detail. The commit is the code after ``yield``, and for a
    dependency with ``yield`` FastAPI's default scope, ``"request"``, runs that code
    *after the response has been sent* (FastAPI 0.118 and later). A COMMIT that fails
    there (a deferred constraint, a serialization failure, a connection lost during
    COMMIT) fails too late: the client already has its 2xx for a write that was rolled
    back, or whose fate is unknown. With ``scope="function"`` the commit runs when the
    handler returns and before the response is sent, so a failed commit reaches the
    application's exception handlers and the client gets an error instead
    (``examples/fastapi_app.py`` answers 409 for an ``IntegrityError``, 500 otherwise).

    The session is closed before the response is sent: a ``StreamingResponse`` or a
    background task must not use it, but open its own with ``manager.session()``.

    Reads the ``SessionManager`` from ``request.app.state.db`` (set it in the
    application's lifespan) rather than from a module global.

    Args:
        request: The current request; FastAPI passes it.

    Yields:
        A session in one transaction, committed or rolled back, then closed, when the
        handler is done.

    Example:
        ```python
        SessionDep = Annotated[Session, Depends(get_db, scope="function")]

        @app.post("/orders/{order_id}", status_code=201)
        def create_order(order_id: int, session: SessionDep) -> dict[str, int]:
            session.execute(insert_order, {"id": order_id})
            return {"id": order_id}  # sent only once the COMMIT has succeeded
        ```
    """
    manager: SessionManager = request.app.state.db
    with manager.session() as session:
        yield session


async def get_async_db(request: Request) -> AsyncIterator[AsyncSession]:
    """Async twin of ``get_db``: declare it with ``scope="function"`` too (FastAPI 0.121+).

    Without that scope FastAPI commits after the response has been sent, and a COMMIT
    that fails is still answered 2xx; see ``get_db``. Reads the ``AsyncSessionManager``
    from ``request.app.state.db``.

    Args:
        request: The current request; FastAPI passes it.

    Yields:
        An ``AsyncSession`` in one transaction, committed or rolled back, then closed,
        when the handler is done.

    Example:
        ```python
        AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_db, scope="function")]
        ```
    """
    manager: AsyncSessionManager = request.app.state.db
    async with manager.session() as session:
        yield session


class SessionManager:
    """Own one engine and its session factory for an application's lifetime.

    Call [`init`][labkit.session.SessionManager.init] at start-up and
    [`close`][labkit.session.SessionManager.close] at shutdown (a lifespan).

    Example:
        ```python
        manager = SessionManager()
        manager.init(Settings.from_env())
        with manager.session() as session: ...
        manager.close()
        ```
    """

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._factory: sessionmaker[Session] | None = None
        self.settings: Settings | None = None

    def __repr__(self) -> str:
        state = "open" if self._engine is not None else "closed"
        return f"<SessionManager {state} {self.settings!r}>"

    def init(self, settings: Settings, **engine_options: Any) -> None:
        """Create the engine and session factory; no connection is opened yet."""
        if self._engine is not None:
            raise LabkitError("SessionManager.init() called twice; call close() first")
        self.settings = settings
        self._engine = create_engine(settings, **engine_options)
        self._factory = create_sessionmaker(self._engine)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise LabkitError("SessionManager is not initialised: call init() at start-up")
        return self._engine

    @property
    def factory(self) -> sessionmaker[Session]:
        if self._factory is None:
            raise LabkitError("SessionManager is not initialised: call init() at start-up")
        return self._factory

    def session(self) -> contextlib.AbstractContextManager[Session]:
        """Return a [`session_scope`][labkit.session_scope] on this manager's factory."""
        return session_scope(self.factory)

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        """Yield a Core connection inside a transaction: committed on success, else rolled back.

        As in ``session_scope``, a connection lost while ``COMMIT`` is in flight raises
        ``CommitOutcomeUnknownError``; an error the server answers is raised as it is.
        """
        with self.engine.connect() as connection:
            transaction = connection.begin()
            try:
                yield connection
            except BaseException:
                with contextlib.suppress(Exception):
                    transaction.rollback()
                raise
            if transaction.is_active:
                _commit(transaction.commit)

    def close(self) -> None:
        """Dispose of the engine's pool; safe to call twice."""
        if self._engine is not None:
            self._engine.dispose()
        self._engine = None
        self._factory = None


class AsyncSessionManager:
    """Async twin of [`SessionManager`][labkit.SessionManager]."""

    def __init__(self) -> None:
        self._engine: AsyncEngine | None = None
        self._factory: async_sessionmaker[AsyncSession] | None = None
        self.settings: Settings | None = None

    def __repr__(self) -> str:
        state = "open" if self._engine is not None else "closed"
        return f"<AsyncSessionManager {state} {self.settings!r}>"

    def init(self, settings: Settings, **engine_options: Any) -> None:
        """Create the engine and session factory; no connection is opened yet."""
        if self._engine is not None:
            raise LabkitError("AsyncSessionManager.init() called twice; call close() first")
        self.settings = settings
        self._engine = create_async_engine(settings, **engine_options)
        self._factory = create_async_sessionmaker(self._engine)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise LabkitError("AsyncSessionManager is not initialised: call init() at start-up")
        return self._engine

    @property
    def factory(self) -> async_sessionmaker[AsyncSession]:
        if self._factory is None:
            raise LabkitError("AsyncSessionManager is not initialised: call init() at start-up")
        return self._factory

    def session(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
        """Return an [`async_session_scope`][labkit.async_session_scope] on the factory."""
        return async_session_scope(self.factory)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """Async twin of ``SessionManager.connect``."""
        async with self.engine.connect() as connection:
            transaction = await connection.begin()
            try:
                yield connection
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(transaction.rollback())
                raise
            if transaction.is_active:
                await _async_commit(transaction.commit)

    async def close(self) -> None:
        """Dispose of the engine's pool; safe to call twice."""
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = None
        self._factory = None
