"""``labkit.testing``: rollback-per-test fixtures, against the real server.

Three levels. The fixtures used directly, as a project's tests would (the kit's conftest
enables the plugin on ``labkit_test``), with every effect checked through a second
connection (``committed``). The plugin in pytest sessions of its own (``pytester``):
database choice and refusal, isolation between tests, the event-loop check. And a bare
project in a new virtual environment, with the copied core, a FastAPI app and tests that
commit, run twice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlalchemy import Engine, Identity, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from labkit import (
    TEST_POOL,
    ConfigurationError,
    Settings,
    async_session_scope,
    create_engine,
    create_sessionmaker,
    session_scope,
)
from labkit.testing import (
    async_isolated_sessionmaker,
    check_test_database,
    configured_url,
    create_database,
    isolated_sessionmaker,
    looks_like_test_database,
)
from labkit.web import get_async_db, get_db

ROOT = Path(__file__).resolve().parents[1]


def url_as_text(url: URL) -> str:
    """The URL with its password, for a command line or an environment variable."""
    return url.render_as_string(hide_password=False)
# The async fixtures live on the session's event loop; so must the tests that use them.
on_session_loop = pytest.mark.asyncio(loop_scope="session")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "labkit_testing_notes"

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    body: Mapped[str] = mapped_column(unique=True)


@pytest.fixture(scope="module")
def notes(labkit_engine: Engine) -> str:
    """The notes table in the test database, created once and kept (as a migration would)."""
    with labkit_engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(7411016)"))
        Base.metadata.create_all(conn)
    return Note.__tablename__


@pytest.fixture
def committed(labkit_db_url: URL) -> Iterator[Engine]:
    """Another client of the test database: it sees only what was really committed."""
    engine = create_engine(Settings(url=labkit_db_url, pool=TEST_POOL))
    yield engine
    engine.dispose()


@pytest.fixture
def token() -> str:
    """A body no other test (nor a concurrent run) writes."""
    return f"n-{uuid.uuid4().hex[:12]}"


def stored(engine: Engine, prefix: str) -> int:
    """Rows whose body starts with ``prefix``, as a new connection sees them."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Note)
                                .where(Note.body.startswith(prefix))).scalar_one())


def count(session: Session, prefix: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Note)
                              .where(Note.body.startswith(prefix))) or 0)


# --- which database ---------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("test", True), ("app_test", True), ("test-orders", True), ("labkit_tests_gw1", True),
    ("APP_TESTING", True), ("app_test2", True),
    ("app", False), ("contest", False), ("latest", False), ("testdata", False),
    ("labkit", False), ("", False), (None, False),
])
def test_only_names_with_test_as_a_word_look_like_a_test_database(name, expected):
    assert looks_like_test_database(name) is expected


def test_a_database_not_named_for_tests_is_refused_unless_allowed():
    url = URL.create("postgresql", username="u", password="hunter2", host="h", database="app")
    with pytest.raises(ConfigurationError, match="refuses to use database 'app'") as info:
        check_test_database(url, source="DATABASE_URL")
    assert "--labkit-allow-any-db" in str(info.value) and "DATABASE_URL" in str(info.value)
    assert "hunter2" not in str(info.value)
    check_test_database(url, allow_any=True)
    check_test_database(url.set(database="app_test"))


# Each URL may reach a database whose name does not say "test", however it names it.
# Port 1: were the name let through, create_database would fail to connect instead.
NOT_ONLY_TEST_DATABASES = {
    "path": "postgresql://u:hunter2@127.0.0.1:1/app",
    "dbname overrides a test path": "postgresql://u:hunter2@127.0.0.1:1/app_test?dbname=app",
    "dbname, no path": "postgresql://u:hunter2@127.0.0.1:1/?dbname=app",
    "dbname given twice": "postgresql://u:hunter2@127.0.0.1:1/app_test"
                          "?dbname=app_test&dbname=app",
    "database (asyncpg)": "postgresql+asyncpg://u:hunter2@127.0.0.1:1/app_test?database=app",
    "database, no path": "postgresql://u:hunter2@127.0.0.1:1?database=app",
    "service file": "postgresql://u:hunter2@127.0.0.1:1/app_test?service=prod",
    "service file, no path": "postgresql://u:hunter2@127.0.0.1:1?service=app_test",
    "no name (PGDATABASE, the user's)": "postgresql://u:hunter2@127.0.0.1:1",
    "no name, empty path": "postgresql://u:hunter2@127.0.0.1:1/",
}


@pytest.mark.parametrize("url", list(NOT_ONLY_TEST_DATABASES.values()),
                         ids=list(NOT_ONLY_TEST_DATABASES))
def test_a_url_that_may_reach_another_database_is_refused_however_it_names_it(url):
    """Pins: ``check_test_database`` and ``create_database`` look at every name the URL
    may connect to (its path, ``?dbname=``, ``?database=``) and refuse when any is not a
    test database's, or when the name cannot be checked (``?service=``, none at all:
    libpq's defaults decide). ``create_database`` refuses before connecting. Guards against:
    a test-sounding path with ``?dbname=app`` connected to ``app``."""
    parsed = make_url(url)
    with pytest.raises(ConfigurationError, match="refuses to use database") as info:
        check_test_database(parsed, source="DATABASE_URL")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError, match="refuses to use database"):
        create_database(parsed)
    check_test_database(parsed, allow_any=True)  # on purpose: allowed


@pytest.mark.parametrize("url", [
    "postgresql://u@h/app_test",
    "postgresql://u@h/app_test?dbname=app_test",
    "postgresql://u@h/?dbname=test-orders",
    "postgresql+asyncpg://u@h/app_test?database=app_tests_gw1",
    "postgresql://u@h/app_test?dbname=",  # an empty value is dropped: the path decides
])
def test_a_url_naming_only_test_databases_is_accepted(url):
    check_test_database(make_url(url))


def test_the_url_comes_from_the_option_then_labkit_test_database_url_then_database_url():
    env = {"LABKIT_TEST_DATABASE_URL": "postgresql://u@h/from_env_test",
           "DATABASE_URL": "postgresql://u@h/from_database_url_test"}
    url, source = configured_url("postgresql://u@h/from_option_test", env) or (None, None)
    assert (url.database, source) == ("from_option_test", "--labkit-db-url")
    url, source = configured_url(None, env) or (None, None)
    assert (url.database, source) == ("from_env_test", "LABKIT_TEST_DATABASE_URL")
    url, source = configured_url(" ", {"DATABASE_URL": env["DATABASE_URL"]}) or (None, None)
    assert (url.database, source) == ("from_database_url_test", "DATABASE_URL")
    assert configured_url(None, {}) is None


def test_create_database_creates_a_test_database_once_and_refuses_other_names(labkit_db_url):
    url = labkit_db_url.set(database=f"labkit_test_{uuid.uuid4().hex[:8]}")
    admin = create_engine(Settings(url=labkit_db_url, pool=TEST_POOL),
                          isolation_level="AUTOCOMMIT")
    try:
        assert create_database(url) is True
        assert create_database(url) is False
        with admin.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pg_database WHERE datname = :n"),
                                {"n": url.database}).scalar_one() == 1
        with pytest.raises(ConfigurationError, match="does not look like a test database"):
            create_database(url.set(database="labkit_scratch"))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}"'))
        admin.dispose()


# --- isolation: sync ------------------------------------------------------------------

def test_a_commit_in_the_code_is_seen_by_the_test_and_by_no_other_connection(
        labkit_sessionmaker, labkit_session, committed, notes, token):
    with session_scope(labkit_sessionmaker) as session:  # the code under test commits
        session.add(Note(body=token))
    assert count(labkit_session, token) == 1  # a later session of the test sees it
    assert stored(committed, token) == 0      # nobody else does: it was a savepoint


def test_isolated_sessionmaker_rolls_back_everything_the_code_committed(
        labkit_engine, committed, notes, token):
    with isolated_sessionmaker(labkit_engine) as factory:
        for n in range(3):
            with session_scope(factory) as session:
                session.add(Note(body=f"{token}-{n}"))
        with factory() as session:
            session.add(Note(body=f"{token}-x"))
            session.commit()
            assert count(session, token) == 4
        assert stored(committed, token) == 0
    assert stored(committed, token) == 0
    assert labkit_engine.pool.checkedout() == 0


def test_a_rollback_in_the_code_keeps_what_the_test_set_up(
        labkit_session, labkit_sessionmaker, committed, notes, token):
    """The reason for ``create_savepoint``: with SQLAlchemy's default join mode a
    session's ``rollback()`` rolls back the test's whole transaction, set-up included."""
    labkit_session.add(Note(body=f"{token}-setup"))
    labkit_session.commit()
    with pytest.raises(sa_exc.IntegrityError):
        with session_scope(labkit_sessionmaker) as session:  # fails at flush: rolled back
            session.add(Note(body=f"{token}-setup"))
    with session_scope(labkit_sessionmaker) as session:  # the code goes on and commits
        session.add(Note(body=f"{token}-after"))
    assert count(labkit_session, f"{token}-setup") == 1
    assert count(labkit_session, token) == 2
    assert stored(committed, token) == 0


def test_test_sessions_are_made_like_the_apps(labkit_sessionmaker, labkit_engine):
    app_options = {k: v for k, v in create_sessionmaker(labkit_engine).kw.items()
                   if k != "bind"}
    test_options = {k: v for k, v in labkit_sessionmaker.kw.items() if k != "bind"}
    assert test_options == {**app_options, "join_transaction_mode": "create_savepoint"}


# --- isolation: async -----------------------------------------------------------------

async def async_count(session: AsyncSession, prefix: str) -> int:
    return int(await session.scalar(select(func.count()).select_from(Note)
                                    .where(Note.body.startswith(prefix))) or 0)


@on_session_loop
async def test_async_a_commit_in_the_code_is_seen_by_the_test_and_by_no_other_connection(
        labkit_async_sessionmaker, labkit_async_session, committed, notes, token):
    async with async_session_scope(labkit_async_sessionmaker) as session:
        session.add(Note(body=token))
    assert await async_count(labkit_async_session, token) == 1
    assert stored(committed, token) == 0


@on_session_loop
async def test_async_isolated_sessionmaker_rolls_back_everything_the_code_committed(
        labkit_async_engine, committed, notes, token):
    async with async_isolated_sessionmaker(labkit_async_engine) as factory:
        for n in range(3):
            async with async_session_scope(factory) as session:
                session.add(Note(body=f"{token}-{n}"))
        async with factory() as session:
            assert await async_count(session, token) == 3
    assert stored(committed, token) == 0
    assert labkit_async_engine.sync_engine.pool.checkedout() == 0


@on_session_loop
async def test_async_a_rollback_in_the_code_keeps_what_the_test_set_up(
        labkit_async_session, labkit_async_sessionmaker, committed, notes, token):
    labkit_async_session.add(Note(body=f"{token}-setup"))
    await labkit_async_session.commit()
    with pytest.raises(sa_exc.IntegrityError):
        async with async_session_scope(labkit_async_sessionmaker) as session:
            session.add(Note(body=f"{token}-setup"))
    async with async_session_scope(labkit_async_sessionmaker) as session:
        session.add(Note(body=f"{token}-after"))
    assert await async_count(labkit_async_session, f"{token}-setup") == 1
    assert await async_count(labkit_async_session, token) == 2
    assert stored(committed, token) == 0


# --- FastAPI: get_db and get_async_db overridden ----------------------------------------

SessionDep = Annotated[Session, Depends(get_db, scope="function")]
AsyncSessionDep = Annotated[AsyncSession, Depends(get_async_db, scope="function")]


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "conflict"}, status_code=409)


def notes_app() -> FastAPI:
    """A sync app: the note is only added to the session, so the INSERT (and a duplicate's
    failure) happens when ``get_db`` flushes and commits, after the handler returned."""
    app = FastAPI()
    app.add_exception_handler(sa_exc.IntegrityError, _conflict)

    @app.post("/notes/{body}", status_code=201)
    def add(body: str, session: SessionDep) -> dict[str, str]:
        session.add(Note(body=body))
        return {"body": body}

    @app.get("/notes/{prefix}/count")
    def how_many(prefix: str, session: SessionDep) -> int:
        return count(session, prefix)

    return app


def async_notes_app() -> FastAPI:
    """Async twin of ``notes_app``, on ``get_async_db``."""
    app = FastAPI()
    app.add_exception_handler(sa_exc.IntegrityError, _conflict)

    @app.post("/notes/{body}", status_code=201)
    async def add(body: str, session: AsyncSessionDep) -> dict[str, str]:
        session.add(Note(body=body))
        return {"body": body}

    @app.get("/notes/{prefix}/count")
    async def how_many(prefix: str, session: AsyncSessionDep) -> int:
        return await async_count(session, prefix)

    return app


def test_get_db_override_hands_the_test_session_to_the_app_and_commits_before_responding(
        labkit_db_override, labkit_session, committed, notes, token):
    app = labkit_db_override(notes_app())
    labkit_session.add(Note(body=f"{token}-seed"))
    labkit_session.commit()  # a savepoint: only the test's connection sees it
    with TestClient(app) as client:
        assert client.get(f"/notes/{token}/count").json() == 1  # the app is on that connection
        assert client.post(f"/notes/{token}-new").status_code == 201
        # scope="function" kept: the duplicate fails at the flush after the handler,
        # before the response, so the client gets 409, not 201.
        assert client.post(f"/notes/{token}-new").status_code == 409
        assert client.get(f"/notes/{token}/count").json() == 2
    assert count(labkit_session, token) == 2
    assert stored(committed, token) == 0
    assert get_db in app.dependency_overrides


def test_the_override_is_removed_from_the_app_after_the_test(pytester, labkit_db_url):
    pytester.makeconftest('pytest_plugins = ["labkit.testing"]')
    pytester.makeini(INNER_INI)
    pytester.makepyfile(test_app="""
        from fastapi import FastAPI
        from labkit.web import get_db
        app = FastAPI()
        def test_installs(labkit_db_override):
            labkit_db_override(app)
            assert get_db in app.dependency_overrides
        def test_removed_afterwards():
            assert app.dependency_overrides == {}
    """)
    result = pytester.runpytest("-p", "no:cacheprovider",
                                f"--labkit-db-url={url_as_text(labkit_db_url)}")
    result.assert_outcomes(passed=2)


@on_session_loop
async def test_get_async_db_override_hands_the_test_session_to_the_app(
        labkit_async_db_override, labkit_async_session, committed, notes, token):
    app = labkit_async_db_override(async_notes_app())
    labkit_async_session.add(Note(body=f"{token}-seed"))
    await labkit_async_session.commit()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get(f"/notes/{token}/count")).json() == 1
        assert (await client.post(f"/notes/{token}-new")).status_code == 201
        assert (await client.post(f"/notes/{token}-new")).status_code == 409
        assert (await client.get(f"/notes/{token}/count")).json() == 2
    assert await async_count(labkit_async_session, token) == 2
    assert stored(committed, token) == 0


# --- the plugin in sessions of its own --------------------------------------------------

INNER_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"

INNER_CONFTEST = """
    import pytest
    from sqlalchemy import Identity, MetaData, Table, Column, Integer, Text
    pytest_plugins = ["labkit.testing"]
    metadata = MetaData()
    entries = Table("labkit_testing_pytester_entries", metadata,
                    Column("id", Integer, Identity(), primary_key=True),
                    Column("body", Text, nullable=False))

    @pytest.fixture(scope="session")
    def labkit_metadata():
        return metadata
"""

# Three tests that commit; each must find only its own row.
INNER_TESTS = """
    import pytest
    from sqlalchemy import func, insert, select
    from conftest import entries

    def write_and_commit(session, body):
        session.execute(insert(entries).values(body=body))
        session.commit()
        return session.scalar(select(func.count()).select_from(entries))

    @pytest.mark.parametrize("n", [1, 2, 3])
    def test_commits(labkit_session, n):
        assert write_and_commit(labkit_session, f"entry {n}") == 1
"""


@pytest.fixture
def plugin_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
                   ) -> pytest.Pytester:
    """A project whose conftest enables the plugin, with no database URL in its env."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("LABKIT_TEST_DATABASE_URL", raising=False)
    pytester.makeconftest(textwrap.dedent(INNER_CONFTEST))
    pytester.makeini(INNER_INI)
    pytester.makepyfile(test_entries=textwrap.dedent(INNER_TESTS))
    return pytester


def clear_entries(url: URL) -> None:
    """Remove rows a broken run (one that committed) may have left behind."""
    engine = create_engine(Settings(url=url, pool=TEST_POOL))
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS labkit_testing_pytester_entries"))
    finally:
        engine.dispose()


def committed_entries(url: URL) -> int | None:
    engine = create_engine(Settings(url=url, pool=TEST_POOL))
    try:
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT count(*) FROM labkit_testing_pytester_entries")).scalar()
    except sa_exc.ProgrammingError:
        return None  # no table yet
    finally:
        engine.dispose()


def test_tests_that_commit_see_only_their_own_rows_and_leave_no_row_behind(
        plugin_project, monkeypatch, labkit_db_url, password):
    clear_entries(labkit_db_url)
    monkeypatch.setenv("LABKIT_TEST_DATABASE_URL", url_as_text(labkit_db_url))
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/ignored_test")
    for _ in range(2):
        result = plugin_project.runpytest("-p", "no:cacheprovider")
        result.assert_outcomes(passed=3)
        assert committed_entries(labkit_db_url) == 0
    header = "\n".join(result.outlines[:8])
    assert "labkit.testing: postgresql://" in header and "LABKIT_TEST_DATABASE_URL" in header
    assert password not in result.stdout.str()


def test_the_command_line_option_wins_over_the_environment(plugin_project, monkeypatch,
                                                          labkit_db_url):
    clear_entries(labkit_db_url)
    monkeypatch.setenv("LABKIT_TEST_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/no_test")
    result = plugin_project.runpytest("-p", "no:cacheprovider",
                                      f"--labkit-db-url={url_as_text(labkit_db_url)}")
    result.assert_outcomes(passed=3)


def test_a_database_not_named_for_tests_is_refused_before_anything_runs(
        plugin_project, monkeypatch, db_url, observer):
    """``DATABASE_URL`` left on the kit's shared ``labkit`` database: every test errors
    with the reason, and the plugin creates nothing there."""
    assert db_url.database == "labkit"
    monkeypatch.setenv("DATABASE_URL", url_as_text(db_url))
    result = plugin_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*refuses to use database 'labkit'*from DATABASE_URL*"])
    assert committed_entries(db_url) is None


def test_allow_any_db_runs_against_another_name_on_purpose(pytester, monkeypatch, db_url):
    monkeypatch.setenv("DATABASE_URL", url_as_text(db_url))
    pytester.makeconftest('pytest_plugins = ["labkit.testing"]')
    pytester.makeini(INNER_INI)
    pytester.makepyfile(test_read="""
        from sqlalchemy import text
        def test_reads(labkit_session):
            assert labkit_session.execute(text("SELECT current_database()")).scalar() == "labkit"
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(errors=1)
    pytester.runpytest("-p", "no:cacheprovider", "--labkit-allow-any-db").assert_outcomes(
        passed=1)


def test_no_database_configured_is_a_clear_error(plugin_project):
    result = plugin_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*needs a test database and none is configured*"
                                 "--labkit-db-url*LABKIT_TEST_DATABASE_URL*"])


ASYNC_INNER_TESTS = """
    from sqlalchemy import text

    async def test_one(labkit_async_session):
        assert (await labkit_async_session.execute(text("SELECT 1"))).scalar() == 1

    async def test_two(labkit_async_session):
        assert (await labkit_async_session.execute(text("SELECT 2"))).scalar() == 2
"""


def test_async_fixtures_off_the_session_loop_fail_early_and_name_the_fix(
        pytester, labkit_db_url):
    pytester.makeconftest('pytest_plugins = ["labkit.testing"]')
    pytester.makepyfile(test_async=textwrap.dedent(ASYNC_INNER_TESTS))
    pytester.makeini("[pytest]\nasyncio_mode = auto\n"
                     "asyncio_default_fixture_loop_scope = function\n")
    url = f"--labkit-db-url={url_as_text(labkit_db_url)}"
    wrong = pytester.runpytest("-p", "no:cacheprovider", url)
    wrong.assert_outcomes(errors=2)
    wrong.stdout.fnmatch_lines(["*runs on a function-scoped loop*"
                                "asyncio_default_test_loop_scope = session*"
                                "loop_scope=\"session\"*"])
    pytester.makeini("[pytest]\nasyncio_mode = auto\n"
                     "asyncio_default_fixture_loop_scope = function\n"
                     "asyncio_default_test_loop_scope = session\n")
    pytester.runpytest("-p", "no:cacheprovider", url).assert_outcomes(passed=2)


# --- a bare project: the copied core, a FastAPI app, tests that commit ------------------

BARE_MODELS = """
    from sqlalchemy import Identity
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(Identity(), primary_key=True)
        body: Mapped[str]
"""

BARE_MIGRATE = """
    # What a deployment's migration does: the schema, and one row that must survive.
    from sqlalchemy import func, select
    from myapp.db import Settings, create_engine, session_scope, create_sessionmaker
    from myapp.models import Base, Note

    engine = create_engine(Settings.from_env())
    Base.metadata.create_all(engine)
    with session_scope(create_sessionmaker(engine)) as session:
        if not session.scalar(select(func.count()).select_from(Note)):
            session.add(Note(body="seeded by the migration"))
    engine.dispose()
"""

BARE_APP = """
    from contextlib import asynccontextmanager
    from typing import Annotated
    from fastapi import Depends, FastAPI
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session
    from myapp.db import Settings
    from myapp.db.web import SessionManager, get_db
    from myapp.models import Note

    SessionDep = Annotated[Session, Depends(get_db, scope="function")]

    def add_note(session, body):
        session.add(Note(body=body))
        session.commit()

    async def add_note_async(session, body):
        session.add(Note(body=body))
        await session.commit()

    def create_app():
        @asynccontextmanager
        async def lifespan(app):
            app.state.db = SessionManager()
            app.state.db.init(Settings.from_env())
            yield
            app.state.db.close()

        app = FastAPI(lifespan=lifespan)

        @app.post("/notes", status_code=201)
        def create(body: str, session: SessionDep):
            session.add(Note(body=body))
            return {"body": body}

        @app.get("/notes/count")
        def how_many(session: SessionDep):
            return session.scalar(select(func.count()).select_from(Note))

        return app
"""

BARE_CONFTEST = """
    import pytest
    from fastapi.testclient import TestClient
    from myapp.main import create_app
    from myapp.models import Base

    pytest_plugins = ["myapp.db.testing"]

    @pytest.fixture(scope="session")
    def labkit_metadata():
        return Base.metadata

    @pytest.fixture
    def client(labkit_db_override):
        with TestClient(labkit_db_override(create_app())) as client:
            yield client
"""

# Three tests that commit. The migration's row is there, and each test's own: one more.
BARE_TESTS = """
    from sqlalchemy import func, select
    from myapp.main import add_note, add_note_async
    from myapp.models import Note

    def test_the_api_stores_a_note(client, labkit_session):
        assert client.post("/notes", params={"body": "from the api"}).status_code == 201
        assert client.get("/notes/count").json() == 2
        assert labkit_session.scalar(select(func.count()).select_from(Note)) == 2

    def test_the_service_commits_a_note(labkit_session):
        add_note(labkit_session, "from the service")
        assert labkit_session.scalar(select(func.count()).select_from(Note)) == 2

    async def test_the_async_service_commits_a_note(labkit_async_session):
        await add_note_async(labkit_async_session, "from async code")
        count = await labkit_async_session.scalar(select(func.count()).select_from(Note))
        assert count == 2
"""

BARE_INI = """
    [pytest]
    asyncio_mode = auto
    asyncio_default_fixture_loop_scope = function
    asyncio_default_test_loop_scope = session
"""

def fingerprint(url: URL) -> tuple[list[tuple[str, int, str]], dict[str, int | None]]:
    """What is in the database: each public table's row count and rows (hashed), and
    each sequence's position."""
    engine = create_engine(Settings(url=url, pool=TEST_POOL))
    try:
        with engine.connect() as conn:
            names = conn.execute(text("SELECT tablename FROM pg_tables "
                                      "WHERE schemaname = 'public' ORDER BY 1")).scalars()
            tables = []
            for name in list(names):
                rows, digest = conn.execute(text(
                    f'SELECT count(*), md5(coalesce(string_agg(t::text, \',\' '
                    f'ORDER BY t::text), \'\')) FROM "{name}" t')).one()
                tables.append((str(name), int(rows), str(digest)))
            sequences = {r.sequencename: r.last_value for r in conn.execute(text(
                "SELECT sequencename, last_value FROM pg_sequences "
                "WHERE schemaname = 'public'"))}
        return tables, sequences
    finally:
        engine.dispose()


def write(folder: Path, name: str, source: str) -> None:
    (folder / name).write_text(textwrap.dedent(source).lstrip())


@pytest.mark.slow
def test_a_bare_project_passes_its_committing_tests_twice_and_leaves_its_database_as_it_was(
        tmp_path, labkit_db_url, password):
    """The README's copy (every top-level module, now with ``testing.py``, renamed to
    ``myapp.db``) in a virtual environment with only what such a project installs: the
    three tests commit (through the API, sync code, async code), each sees only the
    migration's row and its own, and the database ends as it began, twice."""
    url = labkit_db_url.set(database="labkit_bare_test")
    create_database(url)
    admin = create_engine(Settings(url=url, pool=TEST_POOL))
    with admin.begin() as conn:  # start from nothing: no table left by an earlier run
        conn.execute(text("DROP TABLE IF EXISTS notes"))
    admin.dispose()

    project = tmp_path / "project"
    (project / "myapp" / "db").mkdir(parents=True)
    (project / "tests").mkdir()
    for module in sorted((ROOT / "labkit").glob("*.py")):
        (project / "myapp" / "db" / module.name).write_text(
            module.read_text().replace("from labkit.", "from myapp.db."))
    assert (project / "myapp" / "db" / "testing.py").exists()
    write(project / "myapp", "__init__.py", "")
    write(project / "myapp", "models.py", BARE_MODELS)
    write(project / "myapp", "migrate.py", BARE_MIGRATE)
    write(project / "myapp", "main.py", BARE_APP)
    write(project, "conftest.py", BARE_CONFTEST)
    write(project / "tests", "test_notes.py", BARE_TESTS)
    write(project, "pytest.ini", BARE_INI)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "sqlalchemy[asyncio]>=2.0.36,<2.2",
         "asyncpg>=0.30,<0.33", "psycopg2-binary>=2.9.9,<2.10", "fastapi>=0.121,<1",
         "httpx>=0.27,<1", "pytest>=8.3,<10", "pytest-asyncio>=1.0,<2"],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": url_as_text(url)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(py), *args], cwd=project, capture_output=True, text=True,
                              timeout=300, env=env)

    try:
        check_twice(run, url, password)
        lab = run("-c", "import importlib.util as u; print(u.find_spec('labkit'))")
        assert lab.stdout.strip() == "None"
    finally:
        admin = create_engine(Settings(url=url, pool=TEST_POOL))
        with admin.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS notes"))
        admin.dispose()
        shutil.rmtree(venv)


def check_twice(run: Callable[..., subprocess.CompletedProcess[str]], url: URL,
                password: str) -> None:
    """Migrate, then run the bare project's tests twice, fingerprinting the database."""
    migrated = run("-m", "myapp.migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    before = fingerprint(url)
    assert [(name, rows) for name, rows, _ in before[0]] == [("notes", 1)]
    runs = []
    for _ in range(2):
        done = run("-m", "pytest", "-q", "-p", "no:cacheprovider")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "3 passed" in done.stdout
        assert password not in done.stdout + done.stderr
        runs.append(fingerprint(url))
    tables = [fp[0] for fp in runs]
    assert tables == [before[0], before[0]]  # same tables, same rows, byte for byte
    # Rolled back is not undone: nextval() is never rolled back, so the identity grows.
    sequences = [before[1]] + [fp[1] for fp in runs]
    assert [s["notes_id_seq"] for s in sequences] == [1, 4, 7], json.dumps(sequences)
