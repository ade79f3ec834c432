"""Fixtures: a real PostgreSQL (DATABASE_URL, else the local server), never a mock.

Two databases on that server. The kit's own (``db_url``: DATABASE_URL, else the local
server's ``labkit``) for tests that commit and watch another connection see it; and
``labkit_test`` for ``labkit.testing``'s fixtures (``labkit_session`` and the rest: every
test's work rolled back), which refuse a database whose name does not say "test".
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
import pytest_asyncio  # noqa: F401  (registers the asyncio mode)
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from labkit import Settings, TEST_POOL, create_async_engine, create_engine
from labkit.errors import LabkitError, is_database_error, translate_error
from labkit.lab import LocalServer, database_url
from labkit.lab.faults import throwaway_server as throwaway

# labkit.testing: rollback-per-test fixtures (labkit_session, ...); pytester runs the
# plugin in pytest sessions of its own (tests/test_testing.py).
pytest_plugins = ["labkit.testing", "pytester"]

# The plugin's database when none is named: on the kit's server, created on first use.
TEST_DATABASE = "labkit_test"


# The drivers labkit speaks, as a test parameter: psycopg2 and psycopg 3 behind a sync
# engine, asyncpg and psycopg 3 behind an async one.
DRIVERS = ["psycopg2", "asyncpg", "psycopg", "psycopg-async"]


def is_async(driver: str) -> bool:
    """True when ``driver`` (one of ``DRIVERS``) runs behind an async engine."""
    return driver in ("asyncpg", "psycopg-async")


def for_driver(settings: Settings, driver: str) -> Settings:
    """``settings`` with ``Settings.driver`` set for ``driver`` (one of ``DRIVERS``)."""
    return settings.replace(driver="psycopg" if driver.split("-")[0] == "psycopg" else None)


@pytest.fixture(scope="session")
def db_url() -> URL:
    """The shared server's URL: DATABASE_URL if set, else the local server (started once)."""
    return database_url()


@pytest.fixture(scope="session")
def labkit_db_url(pytestconfig: pytest.Config, db_url: URL) -> URL:
    """``labkit.testing``'s database: ``--labkit-db-url`` or LABKIT_TEST_DATABASE_URL if
    given, else ``labkit_test`` on the kit's server (created once).

    Overrides the plugin's fixture only to leave DATABASE_URL out: in the kit it names the
    shared ``labkit`` database, which the plugin rightly refuses. The plugin's engine
    fixtures still check that the name says "test".
    """
    # Imported here, not at the top: pytest imports the plugin itself (and rewrites it).
    from labkit.testing import configured_url, create_database

    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    found = configured_url(pytestconfig.getoption("labkit_db_url"), env)
    if found is not None:
        return found[0]
    url = db_url.set(database=TEST_DATABASE)
    create_database(url)
    return url


@pytest.fixture(scope="session")
def password(db_url: URL) -> str:
    """The configured password, which no output may contain."""
    return str(db_url.password or "")


@pytest.fixture
def settings(db_url: URL) -> Settings:
    return Settings(url=db_url)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = create_engine(settings)
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def async_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(settings)
    yield eng
    await eng.dispose()


@pytest.fixture
def observer(db_url: URL) -> Iterator[Engine]:
    """A second engine with its own connections, to see what others committed."""
    eng = create_engine(Settings(url=db_url, pool=TEST_POOL))
    yield eng
    eng.dispose()


@contextlib.contextmanager
def translated(*, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Re-raise a database error from the block as its labkit error (``translate_error``);
    labkit's own and the caller's own exceptions pass unchanged. Sync and async alike:
    ``with translated(): await conn.execute(...)``."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LabkitError) or not is_database_error(exc):
            raise
        raise translate_error(exc, secrets=secrets) from exc


@contextlib.contextmanager
def fresh_table(observer: Engine, prefix: str, columns: str) -> Iterator[str]:
    """Create a uniquely named table ``prefix_<hex> (columns)``; drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with observer.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} ({columns})"))
    try:
        yield name
    finally:
        with observer.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


@contextlib.contextmanager
def own_schema(db_url: URL, schema: str) -> Iterator[URL]:
    """``db_url`` with ``search_path`` set to a fresh schema ``schema``, dropped afterwards.

    Whatever the code under test creates lands there (both drivers apply the URL's
    ``options``), so modules running at the same time never share a table.
    """
    admin = create_engine(Settings(url=db_url, pool=TEST_POOL))
    try:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        yield db_url.update_query_dict({"options": f"-c search_path={schema}"})
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    finally:
        admin.dispose()


@pytest.fixture
def table(observer: Engine) -> Iterator[str]:
    """A fresh table ``(id int primary key, note text not null)`` dropped afterwards."""
    with fresh_table(observer, "t", "id int PRIMARY KEY, note text NOT NULL") as name:
        yield name


def count_rows(observer: Engine, table: str) -> int:
    with observer.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture(scope="module")
def throwaway_server() -> Iterator[LocalServer]:
    """A private server for tests that stop or break it; never the shared one.

    One per module, so a module's pauses, stops and roles never reach another's. Its files
    live in a folder of their own (``/tmp/labkit-throwaway-*``, deleted afterwards), not
    under pytest's temporary root: every pytest session started on the machine resets
    ``/tmp/pytest-of-<user>`` to mode 0700, and when the tests run as root the server runs
    as another user (``labkit-pg``), which then can no longer reach its data directory:
    ``pg_ctl status`` and ``stop`` fail half-way through the module.
    """
    with throwaway() as server:
        yield server


@pytest.fixture
def stopped_server_url(throwaway_server: LocalServer) -> Iterator[URL]:
    """The URL of a server that is stopped for the duration of the test."""
    url = throwaway_server.info().url()
    throwaway_server.stop()
    yield url
    throwaway_server.start()


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                accepted.append(conn)
            except OSError:
                continue

    worker = threading.Thread(target=accept, daemon=True)
    worker.start()
    yield sock.getsockname()[1]
    stop.set()
    worker.join()
    for conn in accepted:
        conn.close()
    sock.close()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- running on several workers (``make test``: ``pytest -n 3``) ---------------------------

# A module's tests share tables and servers, so each module runs on one worker.
_NOTEBOOKS = "tests/test_notebooks.py"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Schedule by module, except the notebooks: each one is a unit of its own.

    Notebooks are the longest tests (30-90 s each) and need nothing from one another (they
    have their own database, or a throwaway server each), so they start first, spread over
    the workers, and the short modules fill the gaps.
    """
    from xdist.scheduler import LoadScopeScheduling

    class ModulesNotebooksApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path == _NOTEBOOKS:
                return nodeid
            return path

    config.option.loadscopereorder = False  # keep the collection order set below
    return ModulesNotebooksApart(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker, collect the notebooks first, so they are scheduled first."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.nodeid.split("::", 1)[0] != _NOTEBOOKS)
