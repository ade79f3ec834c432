"""A test database that cannot be dropped: a pool still holds connections to it.

``DROP DATABASE`` refuses while any session uses the database ("database … is being
accessed by other users", SQLSTATE 55006); an engine's pool keeps its connections open
after the last test used them. Dispose of the engine first, or terminate the sessions
with ``DROP DATABASE … WITH (FORCE)`` (PostgreSQL 13+). docs/recipes/testing.md shows it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from labkit import DatabaseError, Settings, TEST_POOL, create_async_engine, create_engine
from tests.conftest import translated


@pytest.fixture
def admin(db_url: URL) -> Iterator[Engine]:
    """AUTOCOMMIT on the server's ``postgres`` database: CREATE and DROP DATABASE."""
    engine = create_engine(Settings(url=db_url.set(database="postgres")), pool=TEST_POOL,
                           isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def scratch_url(db_url: URL, admin: Engine) -> Iterator[URL]:
    name = f"labkit_drop_{uuid.uuid4().hex[:8]}_test"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield db_url.set(database=name)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _drop(admin: Engine, url: URL, *, force: bool = False) -> None:
    with translated(), admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{url.database}"' + (" WITH (FORCE)" * force)))


def _exists(admin: Engine, url: URL) -> bool:
    with admin.connect() as conn:
        return conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                            {"n": url.database}).first() is not None


def _refused(admin: Engine, url: URL) -> None:
    with pytest.raises(DatabaseError) as refused:  # the pool's idle connection is a session
        _drop(admin, url)
    assert refused.value.sqlstate == "55006"
    assert f'database "{url.database}" is being accessed by other users' in str(refused.value)


def test_a_pool_that_still_holds_connections_blocks_drop_database_until_disposed(
        admin, scratch_url):
    engine = create_engine(Settings(url=scratch_url))
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    _refused(admin, scratch_url)
    engine.dispose()
    _drop(admin, scratch_url)
    assert not _exists(admin, scratch_url)


def test_an_async_pool_that_still_holds_connections_blocks_drop_database_until_disposed(
        admin, scratch_url):
    async def scenario() -> None:
        engine = create_async_engine(Settings(url=scratch_url))
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        _refused(admin, scratch_url)
        await engine.dispose()
        _drop(admin, scratch_url)

    asyncio.run(scenario())
    assert not _exists(admin, scratch_url)


def test_drop_database_with_force_ends_the_sessions_a_pool_still_holds(admin, scratch_url):
    engine = create_engine(Settings(url=scratch_url))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        _drop(admin, scratch_url, force=True)
        assert not _exists(admin, scratch_url)
    finally:
        engine.dispose()
