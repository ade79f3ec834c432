"""A COMMIT whose answer is lost: reported, never silently retried, through a real TCP proxy.

Every test runs the real drivers (psycopg2 and asyncpg) against the real server through
``labkit.lab.proxy.FaultProxy``, which relays the client's COMMIT to the server, waits
for the server's answer, drops it and resets the client's connection: the server has
committed, the client cannot know. Rows are counted through a second engine that does
not go through the proxy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from labkit import (
    DEFAULT_RETRY,
    CommitOutcomeUnknownError,
    ConnectionLostError,
    IntegrityError,
    RetryExhaustedError,
    RetryPolicy,
    Settings,
    TransientError,
    async_run_in_transaction,
    async_session_scope,
    create_async_engine,
    create_async_sessionmaker,
    create_engine,
    create_sessionmaker,
    run_in_transaction,
    session_scope,
)
from labkit.lab.proxy import FaultProxy
from labkit.retry import Attempt
from labkit.web import AsyncSessionManager, SessionManager
from tests.conftest import DRIVERS, count_rows, for_driver, fresh_table, is_async

FAST = RetryPolicy(max_attempts=4, initial_delay=0.01, max_delay=0.05)


@pytest.fixture
def proxy(db_url: URL) -> Iterator[FaultProxy]:
    """A fault proxy in front of the shared server; it only ever breaks its own links."""
    with FaultProxy(str(db_url.host), int(db_url.port or 5432)) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def proxied(db_url: URL, proxy: FaultProxy) -> Settings:
    """Settings whose connections go through the proxy."""
    return Settings(url=proxy.url(db_url), application_name="labkit-commit-outcome")


@pytest.fixture
def payments(observer: Engine) -> Iterator[str]:
    """A table with NO unique key: a commit stored twice shows as two rows."""
    with fresh_table(observer, "pay", "payer text NOT NULL, amount int NOT NULL") as name:
        yield name


@pytest.fixture
def keyed_payments(observer: Engine) -> Iterator[str]:
    """A table keyed by a client-chosen idempotency key."""
    with fresh_table(observer, "kpay", "key text PRIMARY KEY, amount int NOT NULL") as name:
        yield name


@dataclass
class Client:
    """One driver's way through labkit: ``run_in_transaction`` or its async twin.

    ``run`` is a coroutine for both, so one test body covers both drivers; the sync
    call runs in a worker thread, as a threadpool endpoint would run it.
    """

    driver: str
    settings: Settings
    calls: int = 0
    rowcounts: list[int] = field(default_factory=list)
    _sync: Any = None
    _async: Any = None

    def __post_init__(self) -> None:
        settings = for_driver(self.settings, self.driver)
        if not is_async(self.driver):
            self._sync = create_engine(settings)
        else:
            self._async = create_async_engine(settings)

    async def run(self, sql: str, params: dict[str, Any], *, repeat: int = 1,
                  **options: Any) -> None:
        """Run ``sql`` ``repeat`` times in one transaction, through ``run_in_transaction``."""
        if self._sync is not None:
            factory = create_sessionmaker(self._sync)

            def work(session: Any) -> None:
                self.calls += 1
                for _ in range(repeat):
                    self.rowcounts.append(session.execute(text(sql), params).rowcount)

            await asyncio.to_thread(run_in_transaction, factory, work, **options)
        else:
            async_factory = create_async_sessionmaker(self._async)

            async def async_work(session: Any) -> None:
                self.calls += 1
                for _ in range(repeat):
                    result = await session.execute(text(sql), params)
                    self.rowcounts.append(result.rowcount)

            await async_run_in_transaction(async_factory, async_work, **options)

    async def dispose(self) -> None:
        if self._sync is not None:
            self._sync.dispose()
        else:
            await self._async.dispose()


@pytest_asyncio.fixture(params=DRIVERS)
async def client(request: pytest.FixtureRequest, proxied: Settings) -> AsyncIterator[Client]:
    through = Client(request.param, proxied)
    yield through
    await through.dispose()


def retries(seen: list[Attempt]) -> Callable[[Attempt], None]:
    return seen.append


# --- through run_in_transaction, both drivers --------------------------------------

@pytest.mark.parametrize("policy", [FAST, DEFAULT_RETRY], ids=["retry-transient", "default"])
async def test_lost_commit_answer_is_reported_not_retried_and_stored_once(
        client: Client, proxy: FaultProxy, observer: Engine, payments: str, password: str,
        policy: RetryPolicy):
    """Pins: a lost answer to COMMIT raises ``CommitOutcomeUnknownError`` at once, under a
    policy retrying every transient error and under the default one.

    Old code: ``ConnectionLostError`` was retried, and the payment was stored twice.
    """
    seen: list[Attempt] = []
    proxy.drop_commit_reply(times=1)
    error: BaseException | None = None
    try:
        await client.run(f"INSERT INTO {payments} VALUES ('alice', 100)", {},
                         policy=policy, on_retry=retries(seen))
    except Exception as exc:  # noqa: BLE001 - checked below, after the rows
        error = exc
    assert proxy.get_stats()["replies_dropped"] == 1
    assert count_rows(observer, payments) == 1, "the payment was stored twice"  # server committed
    assert isinstance(error, CommitOutcomeUnknownError), error
    assert client.calls == 1 and seen == []   # no second attempt, no retry callback
    assert isinstance(error.__cause__, sa_exc.DBAPIError)
    assert error.__cause__.connection_invalidated
    assert "unknown" in str(error) and "idempotent=True" in str(error)
    assert not password or password not in str(error)


async def test_idempotent_work_is_retried_after_a_lost_commit_answer_and_stored_once(
        client: Client, proxy: FaultProxy, observer: Engine, keyed_payments: str):
    """Pins: ``idempotent=True`` retries a lost commit; ``ON CONFLICT`` makes it harmless.

    Old code: ``run_in_transaction`` had no ``idempotent`` opt-in.
    """
    seen: list[Attempt] = []
    proxy.drop_commit_reply(times=1)
    await client.run(f"INSERT INTO {keyed_payments} VALUES (:key, 100) ON CONFLICT DO NOTHING",
                     {"key": "order-42"}, policy=FAST, on_retry=retries(seen),
                     idempotent=True)
    assert count_rows(observer, keyed_payments) == 1
    assert client.calls == 2
    assert client.rowcounts == [1, 0]   # the retry found the first attempt's row
    assert [type(a.error) for a in seen] == [CommitOutcomeUnknownError]


async def test_idempotent_retries_that_run_out_say_the_work_may_be_stored(
        client: Client, proxy: FaultProxy, observer: Engine, keyed_payments: str):
    """Pins: exhausted retries of lost commits end in ``RetryExhaustedError`` that says so.

    Old code: no opt-in; lost commits were retried as plain lost connections.
    """
    proxy.drop_commit_reply(times=2)
    with pytest.raises(RetryExhaustedError) as info:
        await client.run(f"INSERT INTO {keyed_payments} VALUES (:key, 100) "
                         f"ON CONFLICT DO NOTHING", {"key": "order-43"},
                         policy=RetryPolicy(max_attempts=2, initial_delay=0.01), idempotent=True)
    assert isinstance(info.value.last_error, CommitOutcomeUnknownError)
    assert "may have been stored" in str(info.value)
    assert info.value.attempts == 2
    assert count_rows(observer, keyed_payments) == 1


async def test_deferred_unique_violation_at_commit_is_an_integrity_error(
        client: Client, proxy: FaultProxy, observer: Engine):
    """Guard: an error the server *answers* at COMMIT is a definite rollback, not "unknown".

    Passes on the old code too; it pins that the new classification does not swallow
    server answers: a deferred unique constraint fails at COMMIT as ``IntegrityError``,
    once, with nothing stored.
    """
    with fresh_table(observer, "dpay",
                     "key text NOT NULL, UNIQUE (key) DEFERRABLE INITIALLY DEFERRED") as name:
        with pytest.raises(IntegrityError):
            await client.run(f"INSERT INTO {name} VALUES ('same')", {}, repeat=2,
                             policy=FAST)
        assert client.calls == 1
        assert client.rowcounts == [1, 1]   # both INSERTs ran: the check waited for COMMIT
        assert count_rows(observer, name) == 0
        assert proxy.get_stats()["commits"] == 1


async def test_connection_lost_before_commit_is_retried_and_stored_once(
        client: Client, proxy: FaultProxy, observer: Engine, payments: str):
    """Guard: a connection lost during a statement, before COMMIT, is still retried.

    Passes on the old code too; it pins that only the COMMIT itself became "unknown":
    the INSERT ran on the server, its answer was lost and the link reset, the server
    rolled the transaction back, and the retry stores the payment once.
    """
    seen: list[Attempt] = []
    proxy.drop_reply("INSERT", times=1)
    await client.run(f"INSERT INTO {payments} VALUES ('bob', 100)", {}, policy=FAST,
                     on_retry=retries(seen))
    assert count_rows(observer, payments) == 1
    assert client.calls == 2
    # A lost connection (how each driver words it is test_errors' business): transient.
    assert len(seen) == 1 and isinstance(seen[0].error, TransientError)


# --- the scopes and the managers' connect(), each driver -----------------------------

def test_session_scope_raises_outcome_unknown_when_the_commit_answer_is_lost(
        proxied: Settings, proxy: FaultProxy, observer: Engine, payments: str):
    """Pins: ``session_scope`` turns a connection lost during COMMIT into "unknown".

    Old code: the driver's ``OperationalError`` (a retryable lost connection).
    """
    engine = create_engine(proxied)
    try:
        proxy.drop_commit_reply(times=1)
        with pytest.raises(CommitOutcomeUnknownError):
            with session_scope(create_sessionmaker(engine)) as session:
                session.execute(text(f"INSERT INTO {payments} VALUES ('carol', 5)"))
        assert count_rows(observer, payments) == 1
        assert engine.pool.checkedout() == 0   # the dead connection went back (discarded)
    finally:
        engine.dispose()


async def test_async_session_scope_raises_outcome_unknown_when_the_commit_answer_is_lost(
        proxied: Settings, proxy: FaultProxy, observer: Engine, payments: str):
    """Pins: ``async_session_scope`` does the same through asyncpg.

    Old code: SQLAlchemy's ``DBAPIError`` wrapping asyncpg's "connection was closed".
    """
    engine = create_async_engine(proxied)
    try:
        proxy.drop_commit_reply(times=1)
        with pytest.raises(CommitOutcomeUnknownError):
            async with async_session_scope(create_async_sessionmaker(engine)) as session:
                await session.execute(text(f"INSERT INTO {payments} VALUES ('carol', 5)"))
        assert count_rows(observer, payments) == 1
        assert engine.sync_engine.pool.checkedout() == 0
    finally:
        await engine.dispose()


def test_session_scope_flush_failure_is_not_reported_as_unknown(
        proxied: Settings, proxy: FaultProxy, observer: Engine):
    """Guard: pending ORM changes are flushed before COMMIT; losing the flush is ordinary.

    Passes on the old code too; pins that a connection lost while *flushing* (the
    INSERT's answer dropped) is a lost connection with nothing committed, not "unknown",
    and that ``run_in_transaction`` retries it and stores the object once.
    """
    class Base(DeclarativeBase):
        pass

    class Payment(Base):
        __tablename__ = f"orm_{uuid.uuid4().hex[:12]}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    Base.metadata.create_all(observer)
    engine = create_engine(proxied)
    factory = create_sessionmaker(engine)
    try:
        proxy.drop_reply("INSERT", times=1)
        with pytest.raises(sa_exc.OperationalError):
            with session_scope(factory) as session:
                session.add(Payment(id=1))        # pending: sent when the scope flushes
        assert proxy.get_stats()["commits"] == 0
        assert count_rows(observer, Payment.__tablename__) == 0

        seen: list[Attempt] = []
        proxy.drop_reply("INSERT", times=1)
        run_in_transaction(factory, lambda session: session.add(Payment(id=2)), policy=FAST,
                           on_retry=seen.append)
        assert [type(a.error) for a in seen] == [ConnectionLostError]
        assert count_rows(observer, Payment.__tablename__) == 1
    finally:
        engine.dispose()
        Base.metadata.drop_all(observer)


def test_manager_connect_raises_outcome_unknown_when_the_commit_answer_is_lost(
        proxied: Settings, proxy: FaultProxy, observer: Engine, payments: str):
    """Pins: ``SessionManager.connect`` (Core) reports a lost COMMIT answer as unknown.

    Old code: ``engine.begin()`` raised the driver's ``OperationalError``.
    """
    manager = SessionManager()
    manager.init(proxied)
    try:
        proxy.drop_commit_reply(times=1)
        with pytest.raises(CommitOutcomeUnknownError):
            with manager.connect() as conn:
                conn.execute(text(f"INSERT INTO {payments} VALUES ('dave', 7)"))
        assert count_rows(observer, payments) == 1
        with manager.connect() as conn:   # and commits as before when nothing breaks
            conn.execute(text(f"INSERT INTO {payments} VALUES ('erin', 8)"))
        assert count_rows(observer, payments) == 2
    finally:
        manager.close()


async def test_async_manager_connect_raises_outcome_unknown_when_the_commit_answer_is_lost(
        proxied: Settings, proxy: FaultProxy, observer: Engine, payments: str):
    """Pins: ``AsyncSessionManager.connect`` does the same through asyncpg.

    Old code: ``engine.begin()`` raised SQLAlchemy's ``DBAPIError``.
    """
    manager = AsyncSessionManager()
    manager.init(proxied)
    try:
        proxy.drop_commit_reply(times=1)
        with pytest.raises(CommitOutcomeUnknownError):
            async with manager.connect() as conn:
                await conn.execute(text(f"INSERT INTO {payments} VALUES ('dave', 7)"))
        assert count_rows(observer, payments) == 1
        async with manager.connect() as conn:
            await conn.execute(text(f"INSERT INTO {payments} VALUES ('erin', 8)"))
        assert count_rows(observer, payments) == 2
    finally:
        await manager.close()


# --- the proxy itself -----------------------------------------------------------------

class Boom(Exception):
    pass


def test_fault_proxy_relays_until_armed_counts_and_closes_every_link_on_exit(db_url: URL):
    """The proxy relays untouched until armed, counts what it did, and cleans up on exit.

    New tool, no old behaviour: pins that ``how="close"`` cuts after the server
    committed, and that leaving the block, even by an exception, closes the listener and
    every relayed connection.
    """
    import psycopg2

    def connect(port: int) -> Any:
        return psycopg2.connect(host="127.0.0.1", port=port, user=db_url.username,
                                password=db_url.password, dbname=db_url.database,
                                connect_timeout=5)

    with pytest.raises(Boom):
        with FaultProxy(str(db_url.host), int(db_url.port or 5432)) as proxy:
            port = proxy.port
            conn = connect(port)
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.commit()
            assert proxy.get_stats()["commits"] == 1
            assert proxy.get_stats()["replies_dropped"] == 0

            proxy.drop_commit_reply(times=1, how="close")
            assert proxy.armed == 1
            with conn.cursor() as cur:
                cur.execute("SELECT txid_current()")
                txid = cur.fetchone()[0]
            with pytest.raises(psycopg2.OperationalError):
                conn.commit()
            stats = proxy.get_stats()
            assert (stats["commits"], stats["replies_dropped"], stats["cuts"]) == (2, 1, 1)
            assert proxy.armed == 0
            direct = connect(int(db_url.port or 5432))
            with direct.cursor() as cur:   # the server did commit before the cut
                cur.execute("SELECT txid_status(%s)", (txid,))
                assert cur.fetchone()[0] == "committed"
            direct.close()

            survivor = connect(port)
            assert proxy.get_stats()["open_connections"] == 1
            raise Boom
    with pytest.raises(psycopg2.OperationalError):
        with survivor.cursor() as cur:
            cur.execute("SELECT 1")
    with pytest.raises(psycopg2.OperationalError):
        connect(port)
