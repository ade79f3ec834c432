"""Sessions: factories, a transactional scope, a request dependency, a lifespan manager.

The unit of work is :func:`session_scope`: it commits when the block ends normally,
rolls back when it raises, and always closes the session so its connection goes back
to the pool. Everything else here is built on it.

Sessions are made with ``autoflush=False`` (SQL is sent when you flush or commit, not
behind your back on every query) and ``expire_on_commit=False`` (objects stay readable
after commit without a new SELECT per attribute; notebook 03 counts the difference).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

try:  # Only for FastAPI: it injects the request into a parameter annotated as Request.
    from starlette.requests import Request
except ImportError:  # the core works without it
    Request = Any  # type: ignore[misc,assignment]

from labkit.config import Settings
from labkit.engine import create_async_engine, create_engine
from labkit.errors import LabkitError

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
    """Async twin of :func:`create_sessionmaker`."""
    return async_sessionmaker(bind=engine,
                              **{"autoflush": False, "expire_on_commit": False, **options})


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Run a block in one transaction: commit on success, roll back on error, close.

    The original exception propagates unchanged, even when the rollback itself fails
    (a dead connection cannot roll back; closing it discards it from the pool).

    Example::

        with session_scope(factory) as session:
            session.add(Order(id=1))
        # committed here, and the connection is back in the pool
    """
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            session.rollback()
        raise
    finally:
        session.close()


@contextlib.asynccontextmanager
async def async_session_scope(factory: async_sessionmaker[AsyncSession]
                              ) -> AsyncIterator[AsyncSession]:
    """Async twin of :func:`session_scope`; close is shielded from cancellation."""
    import asyncio

    session = factory()
    try:
        yield session
        await session.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(session.rollback())
        raise
    finally:
        # A cancelled task must still hand its connection back to the pool.
        with contextlib.suppress(Exception):
            await asyncio.shield(session.close())


def get_db(request: Request) -> Iterator[Session]:
    """Request dependency: one session per request, committed when the handler returns.

    Reads the :class:`SessionManager` from ``request.app.state.db`` (set it in the
    application's lifespan) rather than from a module global. With FastAPI::

        SessionDep = Annotated[Session, Depends(get_db)]

        @app.post("/orders")
        def create(session: SessionDep): ...
    """
    manager: SessionManager = request.app.state.db
    with manager.session() as session:
        yield session


async def get_async_db(request: Request) -> AsyncIterator[AsyncSession]:
    """Async twin of :func:`get_db`; reads ``request.app.state.db`` (an AsyncSessionManager)."""
    manager: AsyncSessionManager = request.app.state.db
    async with manager.session() as session:
        yield session


class SessionManager:
    """Own one engine and its session factory for an application's lifetime.

    Call :meth:`init` at start-up and :meth:`close` at shutdown (a lifespan)::

        manager = SessionManager()
        manager.init(Settings.from_env())
        with manager.session() as session: ...
        manager.close()
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
        """Return a :func:`session_scope` on this manager's factory."""
        return session_scope(self.factory)

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        """Yield a Core connection inside a transaction (committed on success)."""
        with self.engine.begin() as connection:
            yield connection

    def close(self) -> None:
        """Dispose of the engine's pool; safe to call twice."""
        if self._engine is not None:
            self._engine.dispose()
        self._engine = None
        self._factory = None


class AsyncSessionManager:
    """Async twin of :class:`SessionManager`."""

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
        """Return an :func:`async_session_scope` on this manager's factory."""
        return async_session_scope(self.factory)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """Yield a Core connection inside a transaction (committed on success)."""
        async with self.engine.begin() as connection:
            yield connection

    async def close(self) -> None:
        """Dispose of the engine's pool; safe to call twice."""
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = None
        self._factory = None
