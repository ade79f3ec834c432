"""Session scope, dependency and manager, sync and async, against the real server.

Every effect is observed through a second engine (``observer``), as another client
of the database would see it.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from labkit import (
    DEVELOPMENT_POOL,
    LabkitError,
    PoolMetrics,
    async_session_scope,
    create_async_engine,
    create_async_sessionmaker,
    create_sessionmaker,
    session_scope,
)
from labkit.errors import ProgrammingError
from labkit.web import AsyncSessionManager, SessionManager, get_async_db, get_db
from tests.conftest import count_rows


class Boom(Exception):
    pass


def insert(table: str, id_: int) -> text:
    return text(f"INSERT INTO {table} (id, note) VALUES ({id_}, 'n{id_}')")


# --- sync ------------------------------------------------------------------------

def test_commit_persists_for_another_connection(engine, observer, table):
    factory = create_sessionmaker(engine)
    with session_scope(factory) as session:
        session.execute(insert(table, 1))
        assert count_rows(observer, table) == 0  # not committed yet: invisible to others
    assert count_rows(observer, table) == 1


def test_rollback_on_error_leaves_no_row(engine, observer, table):
    factory = create_sessionmaker(engine)
    with pytest.raises(Boom):
        with session_scope(factory) as session:
            session.execute(insert(table, 1))
            raise Boom
    assert count_rows(observer, table) == 0


def test_session_is_closed_and_connection_returned_even_on_error(engine, table):
    metrics = PoolMetrics.attach(engine)
    factory = create_sessionmaker(engine)
    for fail in (False, True):
        with pytest.raises(Boom) if fail else _nothing():
            with session_scope(factory) as session:
                session.execute(insert(table, 10 + fail))
                assert engine.pool.checkedout() == 1
                if fail:
                    raise Boom
        assert engine.pool.checkedout() == 0
    snap = metrics.snapshot()
    assert snap["checkouts"] == snap["checkins"] == 2
    assert snap["in_use"] == 0


def test_savepoint_rollback_keeps_the_outer_work(engine, observer, table):
    factory = create_sessionmaker(engine)
    with session_scope(factory) as session:
        session.execute(insert(table, 1))
        with pytest.raises(Boom):
            with session.begin_nested():
                session.execute(insert(table, 2))
                raise Boom
        session.execute(insert(table, 3))
    with observer.connect() as conn:
        ids = conn.execute(text(f"SELECT id FROM {table} ORDER BY id")).scalars().all()
    assert ids == [1, 3]


def test_sessions_do_not_autoflush_or_expire_on_commit(engine):
    factory = create_sessionmaker(engine)
    session = factory()
    assert session.autoflush is False
    assert session.expire_on_commit is False
    session.close()


def test_get_db_commits_after_the_handler_and_rolls_back_when_it_raises(
        settings, observer, table):
    manager = SessionManager()
    manager.init(settings)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(db=manager)))
    try:
        dependency = get_db(request)
        session = next(dependency)
        session.execute(insert(table, 1))
        with pytest.raises(StopIteration):
            next(dependency)  # the handler returned: the framework resumes the generator
        assert count_rows(observer, table) == 1

        dependency = get_db(request)
        session = next(dependency)
        session.execute(insert(table, 2))
        with pytest.raises(Boom):
            dependency.throw(Boom())  # the handler raised: the framework throws it in
        assert count_rows(observer, table) == 1
        assert manager.engine.pool.checkedout() == 0
    finally:
        manager.close()


def test_session_manager_lifespan(settings, observer, table):
    manager = SessionManager()
    with pytest.raises(LabkitError, match="not initialised"):
        manager.session()
    manager.init(settings)
    with manager.session() as session:
        session.execute(insert(table, 1))
    with manager.connect() as conn:
        conn.execute(insert(table, 2))
    assert count_rows(observer, table) == 2
    with pytest.raises(LabkitError, match="twice"):
        manager.init(settings)
    manager.close()
    manager.close()  # idempotent
    with pytest.raises(LabkitError, match="not initialised"):
        _ = manager.engine


# --- async -----------------------------------------------------------------------

async def test_async_commit_persists_for_another_connection(async_engine, observer, table):
    factory = create_async_sessionmaker(async_engine)
    async with async_session_scope(factory) as session:
        await session.execute(insert(table, 1))
        assert count_rows(observer, table) == 0
    assert count_rows(observer, table) == 1


async def test_async_rollback_on_error_leaves_no_row(async_engine, observer, table):
    factory = create_async_sessionmaker(async_engine)
    with pytest.raises(Boom):
        async with async_session_scope(factory) as session:
            await session.execute(insert(table, 1))
            raise Boom
    assert count_rows(observer, table) == 0


async def test_async_session_is_closed_and_connection_returned_even_on_error(
        async_engine, table):
    factory = create_async_sessionmaker(async_engine)
    pool = async_engine.sync_engine.pool
    with pytest.raises(Boom):
        async with async_session_scope(factory) as session:
            await session.execute(insert(table, 1))
            assert pool.checkedout() == 1
            raise Boom
    assert pool.checkedout() == 0


async def test_async_savepoint_rollback_keeps_the_outer_work(async_engine, observer, table):
    factory = create_async_sessionmaker(async_engine)
    async with async_session_scope(factory) as session:
        await session.execute(insert(table, 1))
        with pytest.raises(Boom):
            async with session.begin_nested():
                await session.execute(insert(table, 2))
                raise Boom
        await session.execute(insert(table, 3))
    with observer.connect() as conn:
        ids = conn.execute(text(f"SELECT id FROM {table} ORDER BY id")).scalars().all()
    assert ids == [1, 3]


async def test_async_get_db_commits_after_the_handler(settings, observer, table):
    manager = AsyncSessionManager()
    manager.init(settings)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(db=manager)))
    try:
        dependency = get_async_db(request)
        session = await dependency.__anext__()
        await session.execute(insert(table, 1))
        with pytest.raises(StopAsyncIteration):
            await dependency.__anext__()
        assert count_rows(observer, table) == 1
        dependency = get_async_db(request)
        session = await dependency.__anext__()
        await session.execute(insert(table, 2))
        with pytest.raises(Boom):
            await dependency.athrow(Boom())
        assert count_rows(observer, table) == 1
    finally:
        await manager.close()


async def test_async_session_manager_lifespan(settings, observer, table):
    manager = AsyncSessionManager()
    manager.init(settings)
    async with manager.session() as session:
        await session.execute(insert(table, 1))
    async with manager.connect() as conn:
        await conn.execute(insert(table, 2))
    await manager.close()
    assert count_rows(observer, table) == 2
    with pytest.raises(LabkitError, match="not initialised"):
        _ = manager.engine


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


async def test_a_commit_refused_mid_statement_lends_no_open_transaction_to_the_next_request(
        settings, observer):
    """Regression: one ``AsyncSession`` shared by two tasks, one commits during the other's
    statement.

    asyncpg refuses that COMMIT ("another operation is in progress") and SQLAlchemy's
    adapter forgets the transaction the server still has open. Without labkit's check-in
    guard the connection went back to the pool idle in transaction, and the next, unrelated
    request failed on it. Now it is closed at check-in, and the next request gets a clean one.
    """
    engine = create_async_engine(settings,
                                 pool=DEVELOPMENT_POOL.replace(pool_size=1, max_overflow=0))
    factory = create_async_sessionmaker(engine)
    try:
        async with factory() as shared:
            await shared.execute(text("SELECT 1"))
            raw = await (await shared.connection()).get_raw_connection()
            pid = raw.driver_connection.get_server_pid()  # type: ignore[union-attr]
            _, refused = await asyncio.gather(shared.execute(text("SELECT pg_sleep(0.1)")),
                                              shared.commit(), return_exceptions=True)
        assert isinstance(refused, sa_exc.InterfaceError)        # the race did happen
        assert "another operation is in progress" in str(refused)
        with observer.connect() as conn:
            state = conn.execute(text("SELECT state FROM pg_stat_activity WHERE pid = :pid"),
                                 {"pid": pid}).scalar()
        assert state != "idle in transaction"
        async with factory() as next_request:
            assert (await next_request.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


# --- a block that caught a database error and went on ------------------------------

def test_a_scope_that_swallowed_a_database_error_raises_instead_of_committing(
        engine, observer, table):
    """PostgreSQL aborted the transaction at the failed statement: COMMIT would roll it
    back, so the scope says so (SQLSTATE 25P02) instead of reporting success."""
    factory = create_sessionmaker(engine)
    with pytest.raises(ProgrammingError) as info:
        with session_scope(factory) as session:
            session.execute(insert(table, 1))
            with pytest.raises(sa_exc.IntegrityError):
                session.execute(insert(table, 1))   # duplicate key, caught by the block
    assert info.value.sqlstate == "25P02"
    assert "savepoint" in str(info.value)
    assert count_rows(observer, table) == 0
    assert engine.pool.checkedout() == 0


def test_a_savepoint_around_the_failing_statement_lets_the_scope_commit(
        engine, observer, table):
    factory = create_sessionmaker(engine)
    with session_scope(factory) as session:
        session.execute(insert(table, 1))
        with pytest.raises(sa_exc.IntegrityError):
            with session.begin_nested():
                session.execute(insert(table, 1))
        session.execute(insert(table, 2))
    assert count_rows(observer, table) == 2


def test_manager_connect_that_swallowed_a_database_error_raises(settings, observer, table):
    manager = SessionManager()
    manager.init(settings)
    try:
        with pytest.raises(ProgrammingError) as info:
            with manager.connect() as conn:
                conn.execute(insert(table, 1))
                with pytest.raises(sa_exc.IntegrityError):
                    conn.execute(insert(table, 1))
        assert info.value.sqlstate == "25P02"
        assert count_rows(observer, table) == 0
        with manager.connect() as conn:   # the next block on the same pool commits
            conn.execute(insert(table, 3))
        assert count_rows(observer, table) == 1
    finally:
        manager.close()


async def test_async_scope_that_swallowed_a_database_error_raises_instead_of_committing(
        async_engine, observer, table):
    factory = create_async_sessionmaker(async_engine)
    with pytest.raises(ProgrammingError) as info:
        async with async_session_scope(factory) as session:
            await session.execute(insert(table, 1))
            with pytest.raises(sa_exc.IntegrityError):
                await session.execute(insert(table, 1))
    assert info.value.sqlstate == "25P02"
    assert count_rows(observer, table) == 0
    assert async_engine.sync_engine.pool.checkedout() == 0


async def test_async_savepoint_around_the_failing_statement_lets_the_scope_commit(
        async_engine, observer, table):
    factory = create_async_sessionmaker(async_engine)
    async with async_session_scope(factory) as session:
        await session.execute(insert(table, 1))
        with pytest.raises(sa_exc.IntegrityError):
            async with session.begin_nested():
                await session.execute(insert(table, 1))
        await session.execute(insert(table, 2))
    assert count_rows(observer, table) == 2


async def test_async_manager_connect_that_swallowed_a_database_error_raises(
        settings, observer, table):
    manager = AsyncSessionManager()
    manager.init(settings)
    try:
        with pytest.raises(ProgrammingError) as info:
            async with manager.connect() as conn:
                await conn.execute(insert(table, 1))
                with pytest.raises(sa_exc.IntegrityError):
                    await conn.execute(insert(table, 1))
        assert info.value.sqlstate == "25P02"
        assert count_rows(observer, table) == 0
        async with manager.connect() as conn:
            await conn.execute(insert(table, 3))
        assert count_rows(observer, table) == 1
    finally:
        await manager.close()
