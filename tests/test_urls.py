"""One DATABASE_URL for both drivers, and passwords that never show: against the real server.

``sslmode`` / ``ssl`` and ``options`` are translated per driver (psycopg2 speaks libpq,
asyncpg has its own names); a password with an unencoded ``@`` is refused before it can
leak into a host-name error; a ``?password=`` is masked wherever a URL is shown.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from labkit import (
    TEST_POOL,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    Settings,
    create_async_engine,
    create_engine,
    mask_url,
)
from labkit.config import URL_PARAMETERS, parse_url, to_async_url, to_sync_url
from labkit.engine import engine_kwargs
from labkit.errors import translate_error

from tests.conftest import DRIVERS, for_driver, is_async


def url_as_text(url: URL) -> str:
    """The URL with its password, as DATABASE_URL takes it."""
    return url.render_as_string(hide_password=False)


def with_query(url: URL, query: str) -> str:
    """``url`` as text (password included) with ``query`` appended as typed by a user."""
    raw = url_as_text(url)
    return f"{raw}{'&' if '?' in raw else '?'}{query}"


def scalars(settings: Settings, driver: str, *queries: str, **overrides: Any) -> list[Any]:
    """Run ``queries`` on one connection through ``driver``; return the first column."""
    settings = for_driver(settings, driver)
    if not is_async(driver):
        engine = create_engine(settings, **overrides)
        try:
            with engine.connect() as conn:
                return [conn.execute(text(q)).scalar_one() for q in queries]
        finally:
            engine.dispose()

    async def run() -> list[Any]:
        async_engine = create_async_engine(settings, **overrides)
        try:
            async with async_engine.connect() as conn:
                return [(await conn.execute(text(q))).scalar_one() for q in queries]
        finally:
            await async_engine.dispose()

    return asyncio.run(run())


# --- SSL modes ------------------------------------------------------------------------

@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("query", ["sslmode=disable", "sslmode=prefer",
                                   "ssl=disable", "ssl=prefer"])
def test_one_url_with_an_ssl_mode_connects_through_both_drivers(db_url, driver, query):
    """Pins: libpq's ``sslmode`` works with asyncpg and asyncpg's ``ssl`` with psycopg2.

    Before, ``?sslmode=`` reached ``asyncpg.connect()`` as an unexpected keyword
    argument (TypeError) and ``?ssl=`` was an invalid libpq option for psycopg2.
    """
    settings = Settings(url=with_query(db_url, query), pool=TEST_POOL)
    assert scalars(settings, driver, "SELECT 42") == [42]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("query", ["sslmode=require", "ssl=require"])
def test_ssl_required_by_a_server_without_ssl_is_a_labkit_error_through_both(
        db_url, password, driver, query):
    """Pins: ``sslmode=require`` against a server without TLS fails as a labkit
    ``DatabaseError`` that names SSL, through both drivers, never a TypeError about
    an unexpected ``sslmode`` argument."""
    settings = Settings(url=with_query(db_url, query), pool=TEST_POOL)
    with pytest.raises(Exception) as info:
        scalars(settings, driver, "SELECT 1")
    assert not isinstance(info.value, TypeError)
    error = translate_error(info.value)
    assert isinstance(error, DatabaseError), repr(error)
    assert "SSL" in str(error) and "unexpected keyword" not in str(error)
    assert not password or password not in str(error)


def test_ssl_mode_is_spelled_per_driver():
    """Pins: ``sslmode`` ↔ ``ssl`` is renamed for the driver; no parameter is left behind."""
    sync = to_sync_url("postgresql://u:p@h/d?ssl=verify-full")
    assert dict(sync.query) == {"sslmode": "verify-full"}
    async_ = to_async_url("postgresql://u:p@h/d?sslmode=require")
    assert dict(async_.query) == {"ssl": "require"}
    both = "postgresql://u:p@h/d?sslmode=require&ssl=require"
    assert dict(to_sync_url(both).query) == {"sslmode": "require"}
    assert dict(to_async_url(both).query) == {"ssl": "require"}


@pytest.mark.parametrize("url, words", [
    ("postgresql://u:p@h/d?sslmode=require&ssl=disable", "sslmode and ssl with different"),
    ("postgresql://u:p@h/d?ssl=true", "ssl='true' is not one of disable, allow"),
    ("postgresql://u:p@h/d?sslmode=on", "sslmode='on' is not one of disable, allow"),
    ("postgresql://u:p@h/d?sslmode=require&sslmode=disable", "'sslmode' is given twice"),
])
def test_contradictory_or_unknown_ssl_modes_are_configuration_errors(url, words):
    """Pins: an SSL mode either driver would misread is refused for both, by name."""
    for convert in (to_sync_url, to_async_url, lambda u: Settings(url=u)):
        with pytest.raises(ConfigurationError, match=words):
            convert(url)


@pytest.mark.parametrize("name, hint", [
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslcrl", "PGSSLCRL"),
])
def test_certificate_file_parameters_are_refused_with_the_environment_variable(name, hint):
    """Pins: a certificate file in the URL is refused when Settings is made, naming the
    environment variable both drivers read instead, never showing the password."""
    url = f"postgresql://u:hunter2@h/d?sslmode=verify-full&{name}=/etc/ssl/x.pem"
    with pytest.raises(ConfigurationError, match=name) as info:
        Settings(url=url)
    assert f"set {hint}" in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.parametrize("query", ["sslmod=require", "statement_timeout=5",
                                   "keepalives_idle=30", "prepared_statement_cache_size=0"])
def test_unknown_url_parameters_are_refused_naming_the_accepted_ones(query):
    """Pins: a typo or one driver's own option is refused at once, not at the first
    connect of one driver only; the message lists what is accepted."""
    name = query.split("=")[0]
    with pytest.raises(ConfigurationError, match=f"unknown URL parameter '{name}'") as info:
        Settings(url=f"postgresql://u:hunter2@h/d?{query}")
    for accepted in URL_PARAMETERS:
        assert accepted in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("driver", DRIVERS)
def test_url_application_name_and_target_session_attrs_reach_both_drivers(db_url, driver):
    """Pins: ``application_name`` (moved into the field) and ``target_session_attrs``
    from the URL are honoured by both drivers."""
    settings = Settings(url=with_query(db_url, "application_name=from-the-url"
                                              "&target_session_attrs=read-write"),
                        pool=TEST_POOL)
    assert settings.application_name == "from-the-url"
    assert scalars(settings, driver, "SHOW application_name") == ["from-the-url"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_url_connect_timeout_bounds_a_connect_to_a_hung_server_for_both_drivers(
        hung_port, driver):
    """Pins: ``?connect_timeout=`` (moved into the field) bounds both drivers' connect:
    a server that accepts TCP and never answers is ``DatabaseUnavailableError`` within
    about that many seconds (libpq rounds up to 2 s at least)."""
    settings = Settings(url=f"postgresql://u:hunter2@127.0.0.1:{hung_port}/d"
                            "?connect_timeout=2", pool=TEST_POOL)
    assert settings.connect_timeout == 2.0
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        scalars(settings, driver, "SELECT 1")
    assert time.monotonic() - start < 2 + 2.0
    error = translate_error(info.value)
    assert isinstance(error, DatabaseUnavailableError), repr(error)
    assert "hunter2" not in str(error)


@pytest.mark.parametrize("driver", DRIVERS)
def test_several_hosts_in_the_url_are_tried_in_order_by_both_drivers(db_url, closed_port,
                                                                      driver):
    """Pins: ``?host=a:1&host=b:2`` (no host before the path) is accepted and both
    drivers go on to the next host when the first refuses."""
    url = URL.create("postgresql", username=db_url.username, password=db_url.password,
                     database=db_url.database,
                     query={"host": [f"127.0.0.1:{closed_port}", f"{db_url.host}:{db_url.port}"]})
    settings = Settings(url=url, pool=TEST_POOL)
    assert scalars(settings, driver, "SELECT inet_server_port()") == [db_url.port]


# --- options ------------------------------------------------------------------------

@pytest.mark.parametrize("driver", DRIVERS)
def test_url_options_and_the_statement_timeout_both_reach_the_server(db_url, driver):
    """Pins: ``DB_STATEMENT_TIMEOUT`` is added to ``options=-csearch_path=...`` from the
    URL instead of replacing it (psycopg2), and asyncpg, which has no ``options``, gets
    them as ``server_settings``."""
    settings = Settings(url=with_query(db_url, "options=-csearch_path%3Dmyschema"),
                        pool=TEST_POOL, statement_timeout_ms=4321)
    assert scalars(settings, driver, "SHOW search_path", "SHOW statement_timeout") == [
        "myschema", "4321ms"]


def test_every_options_spelling_gives_both_drivers_the_same_settings(db_url):
    """Pins: labkit reads ``options`` as PostgreSQL does (``-c a=b``, ``-ca=b``,
    ``--a-b=c``, backslash-escaped spaces): asyncpg's ``server_settings`` give the same
    values as the server's own parsing of psycopg2's ``options``."""
    options = (r'-c search_path="my\ schema",public -clock_timeout=1500 '
               r'--idle-session-timeout=7s')
    settings = Settings(url=with_query(db_url, "options=" + quote(options, safe="")),
                        pool=TEST_POOL, statement_timeout_ms=2500)
    queries = ("SHOW search_path", "SHOW lock_timeout", "SHOW idle_session_timeout",
               "SHOW statement_timeout")
    expected = ['"my schema",public', "1500ms", "7s", "2500ms"]
    assert scalars(settings, "psycopg2", *queries) == expected
    assert scalars(settings, "asyncpg", *queries) == expected
    server_settings = engine_kwargs(settings, is_async=True)["connect_args"]["server_settings"]
    assert server_settings == {"search_path": '"my schema",public', "lock_timeout": "1500",
                               "idle_session_timeout": "7s", "application_name": "labkit",
                               "statement_timeout": "2500"}


@pytest.mark.parametrize("driver, connect_args", [
    ("psycopg2", {"options": "-c lock_timeout=1234"}),
    ("asyncpg", {"server_settings": {"lock_timeout": "1234"}}),
])
def test_connect_args_overrides_add_to_the_url_options_and_timeouts(db_url, driver,
                                                                     connect_args):
    """Pins: ``create_engine(settings, connect_args=...)`` merges ``options`` /
    ``server_settings`` instead of dropping the search path and statement timeout."""
    settings = Settings(url=with_query(db_url, "options=-csearch_path%3Dmyschema"),
                        pool=TEST_POOL, statement_timeout_ms=4321)
    shown = scalars(settings, driver, "SHOW search_path", "SHOW statement_timeout",
                    "SHOW lock_timeout", connect_args=connect_args)
    assert shown == ["myschema", "4321ms", "1234ms"]


def test_options_asyncpg_cannot_express_are_refused():
    """Pins: an ``options`` flag other than ``-c name=value`` is a ``ConfigurationError``
    for asyncpg (it has no ``server_settings`` form), not silently dropped."""
    with pytest.raises(ConfigurationError, match="only '-c name=value'"):
        to_async_url("postgresql://u:p@h/d?options=-B%20100")
    with pytest.raises(ConfigurationError, match="only '-c name=value'"):
        to_async_url("postgresql://u:p@h/d?options=-c")
    with pytest.raises(ConfigurationError, match="without name=value"):
        to_async_url("postgresql://u:p@h/d?options=-c%20search_path")
    with pytest.raises(ConfigurationError, match="only '-c name=value'"):
        Settings(url="postgresql://u:p@h/d?options=-B%20100")


# --- passwords --------------------------------------------------------------------------

UNENCODED = ["postgresql://app:S3cr@tPass@127.0.0.1/x",
             "postgresql://app:S3cr@tPass@db:5432/x",
             "postgresql://app:a@b@cPass@db/x"]


@pytest.mark.parametrize("raw", UNENCODED)
def test_unencoded_at_in_the_password_is_refused_without_showing_it(raw):
    """Pins: a password with a raw ``@`` is a ``ConfigurationError`` that says to
    percent-encode, shows no part of the password, and is raised for text and for a
    ``URL`` object alike (before, the rest of the password became the host name)."""
    for given in (raw, make_url(raw)):
        with pytest.raises(ConfigurationError, match="in the password as %40") as info:
            Settings(url=given)
        assert "S3cr" not in str(info.value) and "Pass" not in str(info.value)
    assert "Pass" not in mask_url(raw) and "Pass" not in mask_url(make_url(raw))


def test_percent_encoded_at_is_fine_and_a_user_with_an_at_still_parses():
    """Pins: the ``@`` check refuses only a password split at its ``@``."""
    assert parse_url("postgresql://app:S3cr%40tPass@db/x").password == "S3cr@tPass"
    azure = parse_url("postgresql://app@server:pw@db/x")
    assert (azure.username, azure.host) == ("app@server", "db")


QUERY_PASSWORD = "postgresql://app@db.example:5432/app?password=hunter2-Zq&sslmode=require"


def test_a_query_string_password_is_masked_wherever_the_url_is_shown():
    """Pins: ``?password=`` is hidden by ``repr(Settings)``, ``str(settings.url)``, the
    engines' repr and ``mask_url`` (before, all of them showed it in full)."""
    settings = Settings(url=QUERY_PASSWORD)
    assert settings.url.password == "hunter2-Zq" and "password" not in settings.url.query
    engine = create_engine(settings)
    async_engine = create_async_engine(settings)
    shown = [repr(settings), str(settings), str(settings.url), repr(settings.url),
             repr(engine), str(engine.url), repr(async_engine.sync_engine),
             mask_url(QUERY_PASSWORD), mask_url(make_url(QUERY_PASSWORD))]
    for text_ in shown:
        assert "hunter2" not in text_, text_
    assert "app:***@db.example" in repr(engine)
    engine.dispose()


def test_a_refused_url_does_not_show_a_query_string_password():
    """Pins: the ``ConfigurationError`` for a URL Settings refuses masks a ``?password=``."""
    for url in ("postgresql://app@h:99999/d?password=hunter2-Zq",
                "postgresql://app@h/d?password=hunter2-Zq&sslmod=require",
                "postgresql://app@h/d?password=hunter2-Zq&ssl=maybe"):
        with pytest.raises(ConfigurationError) as info:
            Settings(url=url)
        assert "hunter2" not in str(info.value), str(info.value)


def test_a_password_given_twice_is_refused_without_showing_either():
    """Pins: ``USER:PASSWORD@`` and ``?password=`` together are ambiguous: refused."""
    with pytest.raises(ConfigurationError, match="password twice") as info:
        parse_url("postgresql://app:first-Xy@h/d?password=second-Zq")
    assert "first-Xy" not in str(info.value) and "second-Zq" not in str(info.value)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_query_string_password_still_logs_in_through_both_drivers(db_url, driver):
    """Pins: moving ``?password=`` into the URL's password field keeps it working."""
    if not db_url.password:
        pytest.skip("the server under test uses no password")
    # URL.set(password=None) keeps the password: build the URL without one.
    bare = URL.create(db_url.drivername, username=db_url.username, host=db_url.host,
                      port=db_url.port, database=db_url.database, query=db_url.query)
    raw = with_query(bare, "password=" + quote(str(db_url.password), safe=""))
    assert scalars(Settings(url=raw, pool=TEST_POOL), driver, "SELECT 7") == [7]


@pytest.mark.parametrize("factory", ["create_engine", "create_async_engine"])
def test_options_behind_a_transaction_pooler_are_refused(factory):
    """Pins: a transaction-mode pooler refuses ``options`` at connect time, so
    ``labkit.network.pooler``'s engines refuse a URL with ``?options=``, naming the fix."""
    from labkit.network import pooler

    make = getattr(pooler, factory)
    with pytest.raises(ConfigurationError, match="ALTER ROLE"):
        make(Settings(url="postgresql://u:p@h/d?options=-csearch_path%3Dapp"))
    make(Settings(url="postgresql://u:p@h/d"))   # no options: an engine (nothing connects)
