"""For web applications: a session manager per application lifespan, and ``get_db``.

Optional: needs the core only (and FastAPI/Starlette to be useful). The manager owns one
engine and its session factory between ``init`` (start-up) and ``close`` (shutdown);
``get_db`` / ``get_async_db`` read it from ``request.app.state.db``, never a global.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn

try:  # FastAPI injects the request into a parameter annotated as Request
    from starlette.requests import Request
except ImportError:  # pragma: no cover - the module works without Starlette
    Request = Any  # type: ignore[misc,assignment]

from .config import Settings
from .engine import create_async_engine, create_engine
from .errors import LabkitError
from .session import (
    async_session_scope,
    check_and_commit,
    create_async_sessionmaker,
    create_sessionmaker,
    session_scope,
)

__all__ = ["AsyncSessionManager", "SessionManager", "get_async_db", "get_db"]


class SessionManager:
    """Own one engine and its session factory for an application's lifetime.

    Example:
        ```python
        manager = SessionManager()
        manager.init(Settings.from_env())      # lifespan start: no connection yet
        with manager.session() as session: ...
        manager.close()                         # lifespan end
        ```
    """

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._factory: sessionmaker[Session] | None = None
        self.settings: Settings | None = None

    def __repr__(self) -> str:
        return f"<SessionManager {'open' if self._engine else 'closed'} {self.settings!r}>"

    def init(self, settings: Settings, **engine_options: Any) -> None:
        """Create the engine and the session factory; no connection is opened yet."""
        if self._engine is not None:
            raise LabkitError("SessionManager.init() called twice; call close() first")
        self.settings = settings
        self._engine = create_engine(settings, **engine_options)
        self._factory = create_sessionmaker(self._engine)

    @property
    def engine(self) -> Engine:
        """The engine; ``LabkitError`` before ``init()``."""
        if self._engine is None:
            raise LabkitError("SessionManager is not initialised: call init() at start-up")
        return self._engine

    @property
    def factory(self) -> sessionmaker[Session]:
        """The session factory; ``LabkitError`` before ``init()``."""
        if self._factory is None:
            raise LabkitError("SessionManager is not initialised: call init() at start-up")
        return self._factory

    def session(self) -> contextlib.AbstractContextManager[Session]:
        """A ``session_scope`` on this manager's factory."""
        return session_scope(self.factory)

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        """A Core connection in a transaction: whatever is open at the end is committed
        (work after an inner ``commit()`` too), with ``session_scope``'s checks."""
        with self.engine.connect() as connection:
            try:
                yield connection
                if connection.in_transaction():
                    check_and_commit(connection, connection.commit)
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.rollback()
                raise

    def close(self) -> None:
        """Dispose of the engine's pool; safe to call twice."""
        if self._engine is not None:
            self._engine.dispose()
        self._engine = self._factory = None


class AsyncSessionManager:
    """Async twin of ``SessionManager``."""

    def __init__(self) -> None:
        self._engine: AsyncEngine | None = None
        self._factory: async_sessionmaker[AsyncSession] | None = None
        self.settings: Settings | None = None

    def __repr__(self) -> str:
        return f"<AsyncSessionManager {'open' if self._engine else 'closed'} {self.settings!r}>"

    def init(self, settings: Settings, **engine_options: Any) -> None:
        """Create the engine and the session factory; no connection is opened yet."""
        if self._engine is not None:
            raise LabkitError("AsyncSessionManager.init() called twice; call close() first")
        self.settings = settings
        self._engine = create_async_engine(settings, **engine_options)
        self._factory = create_async_sessionmaker(self._engine)

    @property
    def engine(self) -> AsyncEngine:
        """The engine; ``LabkitError`` before ``init()``."""
        if self._engine is None:
            raise LabkitError("AsyncSessionManager is not initialised: call init() at start-up")
        return self._engine

    @property
    def factory(self) -> async_sessionmaker[AsyncSession]:
        """The session factory; ``LabkitError`` before ``init()``."""
        if self._factory is None:
            raise LabkitError("AsyncSessionManager is not initialised: call init() at start-up")
        return self._factory

    def session(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
        """An ``async_session_scope`` on this manager's factory."""
        return async_session_scope(self.factory)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """Async twin of ``SessionManager.connect``."""
        async with self.engine.connect() as connection:
            try:
                yield connection
                if connection.in_transaction():
                    sync = connection.sync_connection  # one hop into SQLAlchemy, as in the scope
                    await greenlet_spawn(check_and_commit, sync, sync.commit)  # type: ignore[union-attr]
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.rollback())
                raise

    async def close(self) -> None:
        """Dispose of the engine's pool; safe to call twice."""
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = self._factory = None


def get_db(request: Request) -> Iterator[Session]:
    """Yield the request's session from ``request.app.state.db`` (a ``SessionManager``).

    Declare it with ``scope="function"`` (FastAPI 0.121+): FastAPI's default runs the
    code after ``yield`` (the COMMIT) after the response is sent, so a COMMIT that fails
    would still be answered 2xx. The session is closed before the response: streams and
    background tasks open their own with ``manager.session()``.

    Example:
        ```python
        SessionDep = Annotated[Session, Depends(get_db, scope="function")]
        ```
    """
    manager: SessionManager = request.app.state.db
    with manager.session() as session:
        yield session


async def get_async_db(request: Request) -> AsyncIterator[AsyncSession]:
    """Async twin of ``get_db``; declare it with ``scope="function"`` too."""
    manager: AsyncSessionManager = request.app.state.db
    async with manager.session() as session:
        yield session
