"""A pytest plugin: every test runs against a real PostgreSQL and leaves it as it found it.

Enable it with ``pytest_plugins = ["labkit.testing"]`` (in a copy: ``yourapp.db.testing``).
The database is ``--labkit-db-url``, else ``LABKIT_TEST_DATABASE_URL``, else
``DATABASE_URL``; one whose name (path, ``?dbname=``, ``?database=``) is not a test
database is refused unless ``--labkit-allow-any-db``. Each test runs in a transaction that
is rolled back; sessions join it with savepoints, so code under test may commit. Fixtures:
``labkit_db_url``, ``labkit_settings``, ``labkit_metadata`` (override it), ``labkit_engine``,
``labkit_connection``, ``labkit_sessionmaker``, ``labkit_session``, ``labkit_db_override``,
and their async twins (``labkit_async_*``, on the session's event loop). What a rollback
cannot show (deferred constraints, commit-time serialization failures, other connections,
sequences) needs real commits: docs/recipes/testing.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, NoReturn, Protocol, TypeVar

import pytest
from sqlalchemy import Connection, MetaData, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from .config import PoolProfile, Settings, mask_url, parse_url
from .engine import create_async_engine, create_engine
from .errors import ConfigurationError
from .session import async_session_scope, session_scope
from .web import get_async_db, get_db

try:  # The async fixtures need pytest-asyncio; the sync ones work without it.
    import pytest_asyncio
    _HAS_PYTEST_ASYNCIO = True
except ImportError:
    _HAS_PYTEST_ASYNCIO = False

__all__ = [
    "DATABASE_URL_ENV", "TESTING_POOL", "TEST_DATABASE_URL_ENV",
    "async_isolated_sessionmaker", "check_test_database", "configured_url",
    "create_database", "isolated_sessionmaker", "looks_like_test_database",
    "override_get_async_db", "override_get_db",
]

TEST_DATABASE_URL_ENV = "LABKIT_TEST_DATABASE_URL"
DATABASE_URL_ENV = "DATABASE_URL"

# One test holds one connection; a few more for code that opens its own (a health check).
# Pre-ping: a suite that outlives a server restart reconnects instead of failing.
TESTING_POOL = PoolProfile(pool_size=2, max_overflow=8, pool_timeout=10.0,
                           pool_pre_ping=True)

# Transaction-scoped advisory lock key: two test runs creating the schema take turns.
_SCHEMA_LOCK = 7411015

_TEST_WORD = re.compile(r"tests?\d*|testing")


# --- which database -----------------------------------------------------------------

def looks_like_test_database(name: str | None) -> bool:
    """Return True when ``name`` has ``test``, ``tests`` or ``testing`` as a word (``app_test``,
    ``test-orders``, ``labkit_tests_gw1``; not ``contest``, ``latest`` or ``testdata``)."""
    if not name:
        return False
    return any(_TEST_WORD.fullmatch(word)
               for word in re.split(r"[^a-z0-9]+", name.lower()) if word)


def database_names(url: URL) -> list[str | None]:
    """Every database name ``url`` may connect to: its path, ``?dbname=``, ``?database=``.

    ``None`` stands for a name left to libpq's defaults (``PGDATABASE``, the user name)
    or to a ``?service=`` file: it cannot be checked.
    """
    names: list[str | None] = [url.database] if url.database else []
    for key in ("dbname", "database"):
        value = url.query.get(key)
        names += [value] if isinstance(value, str) else list(value or ())
    if "service" in url.query or not names:
        names.append(None)
    return names


def check_test_database(url: URL, *, allow_any: bool = False, source: str = "the URL") -> None:
    """Raise ``ConfigurationError`` unless every name ``url`` may connect to is a test
    database (``looks_like_test_database``), however the URL gives it."""
    wrong = [name for name in database_names(url) if not looks_like_test_database(name)]
    if allow_any or not wrong:
        return
    raise ConfigurationError(
        f"labkit.testing refuses to use database {wrong[0]!r} ({mask_url(url)}, from "
        f"{source}): its name does not look like a test database, so it may hold data "
        "that matters. Name a test database (one whose name contains 'test' as a word, "
        "e.g. app_test) with --labkit-db-url or LABKIT_TEST_DATABASE_URL, or pass "
        "--labkit-allow-any-db to use this one on purpose.")


def configured_url(option: str | None = None,
                   env: Mapping[str, str] | None = None) -> tuple[URL, str] | None:
    """Return the test database's URL and its source (``--labkit-db-url``,
    ``LABKIT_TEST_DATABASE_URL``, ``DATABASE_URL``), or ``None``; parsed, not checked."""
    env = os.environ if env is None else env
    for value, source in ((option, "--labkit-db-url"),
                          (env.get(TEST_DATABASE_URL_ENV), TEST_DATABASE_URL_ENV),
                          (env.get(DATABASE_URL_ENV), DATABASE_URL_ENV)):
        if value and value.strip():
            return parse_url(value.strip()), source
    return None


def create_database(url: URL, *, allow_any: bool = False) -> bool:
    """Create the test database ``url`` names unless it exists; True if this call created it.

    Connects to the server's ``postgres`` database (needs ``CREATEDB``); safe from two
    processes at once; the name is checked like the plugin's."""
    check_test_database(url, allow_any=allow_any)
    maintenance = create_engine(Settings(url=url.set(database="postgres")),
                                poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with maintenance.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                  {"name": url.database}).first()
            if exists is not None:
                return False
            quoted = conn.dialect.identifier_preparer.quote(str(url.database))
            try:
                conn.execute(text(f"CREATE DATABASE {quoted}"))
            except sa_exc.DBAPIError as exc:
                # Another process created it meanwhile: 42P04, or the catalog's 23505.
                if getattr(exc.orig, "pgcode", None) in ("42P04", "23505"):
                    return False
                raise
            return True
    finally:
        maintenance.dispose()


# --- isolation, without pytest --------------------------------------------------------

@contextlib.contextmanager
def isolated_sessionmaker(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Yield a session factory whose commits are savepoints in one transaction, rolled back.

    Each session's ``commit()`` releases a savepoint (later sessions see the work, other
    connections never do); on exit everything is rolled back."""
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield _joined_sessionmaker(connection)
        finally:
            if transaction.is_active:
                transaction.rollback()


@contextlib.asynccontextmanager
async def async_isolated_sessionmaker(engine: AsyncEngine
                                      ) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Async twin of ``isolated_sessionmaker``; use it on the event loop of ``engine``'s pool."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        try:
            yield _async_joined_sessionmaker(connection)
        finally:
            if transaction.is_active:
                await transaction.rollback()


def _joined_sessionmaker(connection: Connection) -> sessionmaker[Session]:
    # The options of labkit.create_sessionmaker, plus the one that makes commit() safe.
    return sessionmaker(bind=connection, autoflush=False, expire_on_commit=False,
                        join_transaction_mode="create_savepoint")


def _async_joined_sessionmaker(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(bind=connection, autoflush=False, expire_on_commit=False,
                              join_transaction_mode="create_savepoint")


def override_get_db(factory: sessionmaker[Session]) -> Callable[[], Iterator[Session]]:
    """Return a replacement for ``get_db`` yielding ``session_scope`` sessions from ``factory``:
    ``app.dependency_overrides[get_db] = override_get_db(factory)``."""
    def get_test_db() -> Iterator[Session]:
        with session_scope(factory) as session:
            yield session
    return get_test_db


def override_get_async_db(factory: async_sessionmaker[AsyncSession]
                          ) -> Callable[[], AsyncIterator[AsyncSession]]:
    """Async twin of ``override_get_db``, for ``get_async_db``."""
    async def get_test_async_db() -> AsyncIterator[AsyncSession]:
        async with async_session_scope(factory) as session:
            yield session
    return get_test_async_db


# --- the plugin -----------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--labkit-db-url`` and ``--labkit-allow-any-db``."""
    group = parser.getgroup("labkit", "labkit.testing: a real PostgreSQL per test")
    group.addoption("--labkit-db-url", dest="labkit_db_url", default=None, metavar="URL",
                    help="the test database (else LABKIT_TEST_DATABASE_URL, else "
                         "DATABASE_URL)")
    group.addoption("--labkit-allow-any-db", dest="labkit_allow_any_db", action="store_true",
                    default=False,
                    help="use the database even if its name does not contain 'test'")


def pytest_report_header(config: pytest.Config) -> str | None:
    """Show which database the tests use (password masked), when it is configured."""
    try:
        found = configured_url(config.getoption("labkit_db_url"))
    except ConfigurationError as exc:
        return f"labkit.testing: {exc}"
    if found is None:
        return None
    url, source = found
    return f"labkit.testing: {mask_url(url)} (from {source})"


class _HasDependencyOverrides(Protocol):
    dependency_overrides: dict[Callable[..., Any], Callable[..., Any]]


_App = TypeVar("_App", bound=_HasDependencyOverrides)


def _fail(exc: ConfigurationError) -> NoReturn:
    pytest.fail(str(exc), pytrace=False)


def _checked(config: pytest.Config, url: URL) -> URL:
    try:
        check_test_database(url, allow_any=bool(config.getoption("labkit_allow_any_db")),
                            source="labkit_db_url")
    except ConfigurationError as exc:
        _fail(exc)
    return url


@pytest.fixture(scope="session")
def labkit_db_url(pytestconfig: pytest.Config) -> URL:
    """The test database's URL: ``--labkit-db-url``, ``LABKIT_TEST_DATABASE_URL``, ``DATABASE_URL``.

    Override this fixture to choose the database in code (the name is still checked).
    """
    try:
        found = configured_url(pytestconfig.getoption("labkit_db_url"))
    except ConfigurationError as exc:
        _fail(exc)
    if found is None:
        pytest.fail("labkit.testing needs a test database and none is configured: pass "
                    "--labkit-db-url=postgresql://user:password@host:5432/app_test, or set "
                    "LABKIT_TEST_DATABASE_URL (or DATABASE_URL)", pytrace=False)
    url, source = found
    try:
        check_test_database(url, allow_any=bool(pytestconfig.getoption("labkit_allow_any_db")),
                            source=source)
    except ConfigurationError as exc:
        _fail(exc)
    return url


@pytest.fixture(scope="session")
def labkit_settings(labkit_db_url: URL) -> Settings:
    """``Settings`` for the test database: ``ENVIRONMENT=test``, ``TESTING_POOL``."""
    return Settings(url=labkit_db_url, environment="test", pool=TESTING_POOL,
                    application_name="labkit-tests")


@pytest.fixture(scope="session")
def labkit_metadata() -> MetaData | None:
    """The tables the tests need: ``None``; override it to return your ``MetaData`` (missing
    tables are created once per session and kept)."""
    return None


@pytest.fixture(scope="session")
def labkit_engine(pytestconfig: pytest.Config, labkit_settings: Settings,
                  labkit_metadata: MetaData | None) -> Iterator[Engine]:
    """The sync engine on the test database; disposed of when the session ends."""
    _checked(pytestconfig, labkit_settings.url)
    engine = create_engine(labkit_settings)
    try:
        if labkit_metadata is not None:
            with engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
                labkit_metadata.create_all(conn, checkfirst=True)
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def labkit_connection(labkit_engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction rolled back when the test ends (do not commit it)."""
    with labkit_engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            if transaction.is_active:
                transaction.rollback()


@pytest.fixture
def labkit_sessionmaker(labkit_connection: Connection) -> sessionmaker[Session]:
    """Sessions joined to the test's transaction: ``commit()`` is a savepoint, never a COMMIT.

    Pass it to code that takes a session factory, e.g. ``session_scope(labkit_sessionmaker)``.
    """
    return _joined_sessionmaker(labkit_connection)


@pytest.fixture
def labkit_session(labkit_sessionmaker: sessionmaker[Session]) -> Iterator[Session]:
    """One session joined to the test's transaction; closed after the test."""
    with labkit_sessionmaker() as session:
        yield session


@pytest.fixture
def labkit_db_override(labkit_sessionmaker: sessionmaker[Session]
                       ) -> Iterator[Callable[[_App], _App]]:
    """A function ``override(app)`` that makes the app's ``get_db`` yield test sessions (each
    committed as a savepoint); removed from every app when the test ends."""
    apps: list[_HasDependencyOverrides] = []

    def override(app: _App) -> _App:
        app.dependency_overrides[get_db] = override_get_db(labkit_sessionmaker)
        apps.append(app)
        return app

    yield override
    for app in apps:
        app.dependency_overrides.pop(get_db, None)


# --- async twins ----------------------------------------------------------------------

# Most specific first: the error names the fixture the test most likely asked for.
_SESSION_LOOP_FIXTURES = ("labkit_async_session", "labkit_async_db_override",
                          "labkit_async_sessionmaker", "labkit_async_connection",
                          "labkit_async_engine")


@pytest.fixture(autouse=True)
def _labkit_session_loop_check(request: pytest.FixtureRequest) -> None:
    """Fail, before any connection, a test that would use the async fixtures off their loop."""
    used = [name for name in _SESSION_LOOP_FIXTURES if name in request.fixturenames]
    if used:
        _require_session_loop(request.node, used[0])


def _require_session_loop(item: pytest.Item, fixture: str) -> None:
    """Fail a test that would use a session-loop connection from its own event loop."""
    marker = item.get_closest_marker("asyncio")
    if marker is None:  # not an asyncio test: nothing awaits on another loop
        return
    scope = (marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
             or item.config.getini("asyncio_default_test_loop_scope") or "function")
    if scope != "session":
        pytest.fail(
            f"{item.nodeid} uses {fixture}, whose connection belongs to the session's event "
            f"loop, but the test runs on a {scope}-scoped loop: asyncpg would fail with "
            "'attached to a different loop'. Run it on the session's loop: set "
            "asyncio_default_test_loop_scope = session in the pytest configuration, or mark "
            "it @pytest.mark.asyncio(loop_scope=\"session\").", pytrace=False)


if _HAS_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture(scope="session", loop_scope="session")
    async def labkit_async_engine(pytestconfig: pytest.Config, labkit_settings: Settings,
                                  labkit_metadata: MetaData | None
                                  ) -> AsyncIterator[AsyncEngine]:
        """The async engine on the test database, on the session's event loop."""
        _checked(pytestconfig, labkit_settings.url)
        engine = create_async_engine(labkit_settings)
        try:
            if labkit_metadata is not None:
                async with engine.begin() as conn:
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": _SCHEMA_LOCK})
                    await conn.run_sync(labkit_metadata.create_all, checkfirst=True)
            yield engine
        finally:
            await engine.dispose()

    @pytest_asyncio.fixture(loop_scope="session")
    async def labkit_async_connection(labkit_async_engine: AsyncEngine
                                      ) -> AsyncIterator[AsyncConnection]:
        """Async twin of ``labkit_connection``; the test must run on the session's loop."""
        async with labkit_async_engine.connect() as connection:
            transaction = await connection.begin()
            try:
                yield connection
            finally:
                if transaction.is_active:
                    await transaction.rollback()

    @pytest.fixture
    def labkit_async_sessionmaker(labkit_async_connection: AsyncConnection
                                  ) -> async_sessionmaker[AsyncSession]:
        """Async twin of ``labkit_sessionmaker``."""
        return _async_joined_sessionmaker(labkit_async_connection)

    @pytest_asyncio.fixture(loop_scope="session")
    async def labkit_async_session(labkit_async_sessionmaker: async_sessionmaker[AsyncSession]
                                   ) -> AsyncIterator[AsyncSession]:
        """Async twin of ``labkit_session``."""
        async with labkit_async_sessionmaker() as session:
            yield session

    @pytest.fixture
    def labkit_async_db_override(labkit_async_sessionmaker: async_sessionmaker[AsyncSession]
                                 ) -> Iterator[Callable[[_App], _App]]:
        """Async twin of ``labkit_db_override``, for ``get_async_db``; send requests from the
    test's event loop (``httpx.AsyncClient`` with ``ASGITransport``)."""
        apps: list[_HasDependencyOverrides] = []

        def override(app: _App) -> _App:
            app.dependency_overrides[get_async_db] = override_get_async_db(
                labkit_async_sessionmaker)
            apps.append(app)
            return app

        yield override
        for app in apps:
            app.dependency_overrides.pop(get_async_db, None)
