"""Settings, URLs, pool profiles and the engine factory; the last tests use the server."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from labkit import (
    DEVELOPMENT_POOL,
    PRODUCTION_POOL,
    TEST_POOL,
    ConfigurationError,
    ConnectionLostError,
    PoolProfile,
    Settings,
    build_url,
    create_async_engine,
    create_engine,
    mask_url,
)
from labkit.config import to_async_url, to_sync_url
from tests.conftest import translated
from labkit.lab import database_url, local_settings
from labkit.network.tcp import PRODUCTION_TCP, TcpSettings

SECRET = "s3cr3t-P@ss:w/rd?#"


def url_as_text(url: URL) -> str:
    """The URL with its password, as DATABASE_URL takes it."""
    return url.render_as_string(hide_password=False)


def test_plain_postgresql_url_gets_psycopg2_for_sync_and_asyncpg_for_async():
    assert to_sync_url("postgresql://u:p@h:5432/d").drivername == "postgresql+psycopg2"
    assert to_async_url("postgresql://u:p@h:5432/d").drivername == "postgresql+asyncpg"


def test_driver_is_swapped_between_sync_and_async():
    assert to_sync_url("postgresql+asyncpg://u:p@h/d").drivername == "postgresql+psycopg2"
    assert to_async_url("postgresql+psycopg2://u:p@h/d").drivername == "postgresql+asyncpg"


def test_heroku_style_postgres_scheme_is_accepted():
    assert to_sync_url("postgres://u:p@h/d").drivername == "postgresql+psycopg2"
    assert Settings(url="postgres://u:p@h/d").url.drivername == "postgresql"


def test_build_url_percent_encodes_the_password_and_round_trips():
    url = build_url(user="app", password=SECRET, host="db", port=5432, database="app")
    text = url_as_text(url)
    assert SECRET not in text
    assert "%40" in text and "%2F" in text
    assert to_sync_url(text).password == SECRET


def test_build_url_refuses_a_port_out_of_range():
    with pytest.raises(ConfigurationError, match="port must be an integer from 1 to 65535"):
        build_url(user="app", password=SECRET, host="db", port=70000, database="app")


def test_password_never_in_str_or_repr_of_url_and_settings():
    url = build_url(user="app", password=SECRET, host="db", database="app")
    settings = Settings(url=url)
    for shown in (str(url), repr(url), str(settings), repr(settings), mask_url(url)):
        assert SECRET not in shown
        assert "***" in shown


def test_mask_url_masks_a_plain_string_url():
    assert mask_url("postgresql://u:hunter2@h/d") == "postgresql://u:***@h/d"


def test_from_env_reads_every_setting():
    settings = Settings.from_env({
        "DATABASE_URL": "postgresql://u:p@h:5432/d",
        "ENVIRONMENT": "production",
        "DB_POOL_SIZE": "7",
        "DB_MAX_OVERFLOW": "3",
        "DB_POOL_TIMEOUT": "2.5",
        "DB_POOL_RECYCLE": "600",
        "DB_POOL_PRE_PING": "false",
        "DB_ECHO": "yes",
        "DB_CONNECT_TIMEOUT": "4",
        "DB_STATEMENT_TIMEOUT": "1500",
        "DB_PROCESSES": "4",
    })
    assert settings.environment == "production"
    assert settings.pool == PoolProfile(pool_size=7, max_overflow=3, pool_timeout=2.5,
                                        pool_recycle=600, pool_pre_ping=False)
    assert settings.echo is True
    assert settings.connect_timeout == 4.0
    assert settings.statement_timeout_ms == 1500
    assert settings.processes == 4


def test_defaults_when_nothing_is_set():
    settings = Settings(url="postgresql://u:p@h/d")
    assert settings.environment == "development"
    assert settings.pool == DEVELOPMENT_POOL
    assert settings.connect_timeout == 5.0 and settings.application_name == "labkit"
    assert settings.statement_timeout_ms is None and settings.processes == 1


def test_production_gets_the_production_pool():
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u:p@h/d",
                                  "ENVIRONMENT": "Production "})
    assert settings.environment == "production" and settings.pool == PRODUCTION_POOL


# --- labkit.network.tcp: TcpSettings -------------------------------------------------------------

def test_tcp_settings_from_env_read_every_variable_and_production_fills_the_rest():
    env = {"DB_TCP_KEEPALIVE_IDLE": "30", "DB_TCP_KEEPALIVE_INTERVAL": " 5 ",
           "DB_TCP_KEEPALIVE_COUNT": "4", "DB_TCP_USER_TIMEOUT": "12.5"}
    assert TcpSettings.from_env(env) == TcpSettings(30, 5, 4, 12.5)
    assert TcpSettings.from_env({}) == TcpSettings()        # the kernel's defaults
    assert TcpSettings.from_env({"ENVIRONMENT": "Production "}) == PRODUCTION_TCP
    assert PRODUCTION_TCP == TcpSettings(60, 10, 3, 30.0)
    tuned = TcpSettings.from_env({"ENVIRONMENT": "production", "DB_TCP_USER_TIMEOUT": "9"})
    assert tuned == PRODUCTION_TCP.replace(user_timeout=9.0)
    assert TcpSettings.from_env({"ENVIRONMENT": "production", "DB_TCP_USER_TIMEOUT": " "}) \
        == PRODUCTION_TCP                                     # blank: unset


def test_tcp_settings_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ENVIRONMENT", raising=False)
    monkeypatch.setenv("DB_TCP_KEEPALIVE_IDLE", "45")
    assert TcpSettings.from_env().keepalive_idle == 45


@pytest.mark.parametrize("env, words", [
    ({"DB_TCP_KEEPALIVE_COUNT": "500"}, "keepalive_count must be an integer from 1 to 127"),
    ({"DB_TCP_KEEPALIVE_IDLE": "0"}, "keepalive_idle must be an integer from 1 to 32767"),
    ({"DB_TCP_KEEPALIVE_IDLE": "1.5"}, "DB_TCP_KEEPALIVE_IDLE must be an integer"),
    ({"DB_TCP_KEEPALIVE_INTERVAL": "soon"}, "DB_TCP_KEEPALIVE_INTERVAL must be an integer"),
    ({"DB_TCP_USER_TIMEOUT": "five"}, "DB_TCP_USER_TIMEOUT must be a number"),
    ({"DB_TCP_USER_TIMEOUT": "nan"}, "DB_TCP_USER_TIMEOUT must be a number"),
    ({"DB_TCP_USER_TIMEOUT": "inf"}, "DB_TCP_USER_TIMEOUT must be a number"),
    ({"DB_TCP_USER_TIMEOUT": "-1"}, "user_timeout must be a number of seconds > 0"),
])
def test_invalid_tcp_environment_values_are_explained(env, words):
    with pytest.raises(ConfigurationError, match=words):
        TcpSettings.from_env(env)


@pytest.mark.parametrize("changes, words", [
    ({"keepalive_idle": 0}, "keepalive_idle must be an integer from 1 to 32767"),
    ({"keepalive_idle": 32_768}, "keepalive_idle must be an integer"),
    ({"keepalive_interval": 2.5}, "keepalive_interval must be an integer"),
    ({"keepalive_interval": "5"}, "keepalive_interval must be an integer"),
    ({"keepalive_count": True}, "keepalive_count must be an integer from 1 to 127"),
    ({"keepalive_count": 128}, "keepalive_count must be an integer from 1 to 127"),
    ({"user_timeout": 0}, "user_timeout must be a number of seconds > 0"),
    ({"user_timeout": -1}, "user_timeout must be a number of seconds > 0"),
    ({"user_timeout": "5"}, "user_timeout must be a number of seconds > 0"),
    ({"user_timeout": True}, "user_timeout must be a number of seconds > 0"),
    ({"user_timeout": float("nan")}, "user_timeout must be a number of seconds > 0"),
    ({"user_timeout": float("inf")}, "user_timeout must be a number of seconds > 0"),
    ({"user_timeout": 1e10}, "user_timeout must be a number of seconds > 0"),
])
def test_invalid_tcp_settings_name_the_field(changes, words):
    with pytest.raises(ConfigurationError, match=words):
        TcpSettings(**changes)
    with pytest.raises(ConfigurationError, match=words):   # replace validates again
        PRODUCTION_TCP.replace(**changes)


def test_tcp_settings_translate_for_libpq_in_whole_milliseconds():
    assert TcpSettings(keepalive_idle=5).libpq_args() == {"keepalives": 1, "keepalives_idle": 5}
    assert TcpSettings(user_timeout=0.0001).libpq_args() == {"tcp_user_timeout": 1}
    assert PRODUCTION_TCP.libpq_args()["tcp_user_timeout"] == 30_000
    assert [value for _, _, value in PRODUCTION_TCP.socket_options()] == [1, 60, 10, 3, 30_000]


def test_test_environment_gets_the_null_pool_and_a_pool_size_makes_it_a_queue():
    env = {"DATABASE_URL": "postgresql://u:p@h/d", "ENVIRONMENT": "test"}
    assert Settings.from_env(env).pool == TEST_POOL
    sized = Settings.from_env({**env, "DB_POOL_SIZE": "2"}).pool
    assert (sized.poolclass, sized.pool_size, sized.max_overflow) == ("queue", 2, 0)


def test_production_without_database_url_is_refused():
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set.*production"):
        Settings.from_env({"ENVIRONMENT": "production"},
                          default_url="postgresql://u:p@localhost/d")


def test_development_without_database_url_uses_the_default():
    settings = Settings.from_env({}, default_url="postgresql://u:p@localhost/d")
    assert settings.url.host == "localhost"
    assert settings.pool == DEVELOPMENT_POOL


def test_no_database_url_and_no_default_is_refused():
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set"):
        Settings.from_env({"DATABASE_URL": "  "})


def test_pool_profiles_per_environment_match_the_design():
    assert (DEVELOPMENT_POOL.pool_size, DEVELOPMENT_POOL.max_overflow) == (5, 10)
    assert DEVELOPMENT_POOL.pool_pre_ping
    assert (PRODUCTION_POOL.pool_size, PRODUCTION_POOL.max_overflow) == (5, 5)
    assert PRODUCTION_POOL.pool_timeout == 5.0 and PRODUCTION_POOL.pool_recycle == 1800
    assert PRODUCTION_POOL.pool_pre_ping
    assert TEST_POOL.poolclass == "null"


def test_engine_applies_the_profile_and_overrides():
    settings = Settings(url="postgresql://u:p@h/d", pool=PRODUCTION_POOL)
    engine = create_engine(settings)
    assert engine.pool.size() == 5
    assert engine.pool._max_overflow == 5
    assert engine.pool._recycle == 1800
    assert engine.pool.timeout() == 5.0
    # Pre-ping is labkit's own (bounded, in the checkout event), not SQLAlchemy's.
    assert engine.pool._pre_ping is False
    small = create_engine(settings, pool=PRODUCTION_POOL.replace(pool_size=2, max_overflow=0))
    assert small.pool.size() == 2


def test_engine_pool_classes_read_as_sqlalchemys():
    """labkit's timed pool classes keep SQLAlchemy's class names (reports read the same)."""
    from sqlalchemy import pool as sa_pool

    settings = Settings(url="postgresql://u:p@h/d")
    for profile, base in ((DEVELOPMENT_POOL, sa_pool.QueuePool), (TEST_POOL, sa_pool.NullPool),
                          (PoolProfile(poolclass="static"), sa_pool.StaticPool)):
        pool = create_engine(settings, pool=profile).pool
        assert isinstance(pool, base) and type(pool).__name__ == base.__name__


def test_async_engine_uses_asyncpg_and_the_profile():
    settings = Settings(url="postgresql://u:p@h/d", pool=DEVELOPMENT_POOL)
    engine = create_async_engine(settings)
    assert engine.sync_engine.dialect.driver == "asyncpg"
    assert engine.sync_engine.pool.size() == 5


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///app.db",
                                 "mysql://u:hunter2@h/d"])
def test_databases_other_than_postgresql_are_refused(url):
    """There is no SQLite support (nor any other database): refused when Settings is made."""
    with pytest.raises(ConfigurationError, match="labkit speaks PostgreSQL") as info:
        Settings(url=url)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("bad_url, words", [
    ("not a url", "malformed database URL"),
    ("", "malformed database URL"),
    ("postgresql://u:hunter2@h:99999/d", "port 99999 .* is not 1-65535"),
    ("mysql://u:hunter2@h/d", "labkit speaks PostgreSQL, not 'mysql'"),
])
def test_bad_urls_raise_configuration_error_without_the_password(bad_url, words):
    with pytest.raises(ConfigurationError, match=words) as info:
        to_sync_url(bad_url)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("changes, words", [
    ({"pool_size": -1}, "pool_size must be an integer from 0"),
    ({"max_overflow": -5}, "max_overflow must be an integer from -1"),
    ({"pool_timeout": 0}, "pool_timeout must be a number of seconds > 0"),
    ({"pool_recycle": 0}, "pool_recycle must be > 0"),
    ({"poolclass": "magic"}, "poolclass must be"),
    ({"pool_size": 0, "max_overflow": 0}, "cannot both be 0"),
])
def test_invalid_pool_values_name_the_argument(changes, words):
    with pytest.raises(ConfigurationError, match=words):
        DEVELOPMENT_POOL.replace(**changes)


@pytest.mark.parametrize("env, words", [
    ({"DB_POOL_SIZE": "-3"}, "pool_size must be an integer from 0"),
    ({"DB_POOL_SIZE": "five"}, "DB_POOL_SIZE must be an integer"),
    ({"DB_POOL_PRE_PING": "maybe"}, "DB_POOL_PRE_PING must be true or false"),
    ({"ENVIRONMENT": "staging"}, "ENVIRONMENT must be"),
    ({"DB_PROCESSES": "0"}, "processes must be an integer from 1"),
])
def test_invalid_environment_values_are_explained(env, words):
    with pytest.raises(ConfigurationError, match=words):
        Settings.from_env({"DATABASE_URL": "postgresql://u:p@h/d", **env})


def test_unencoded_special_characters_in_password_are_explained_and_masked():
    with pytest.raises(ConfigurationError, match="percent-encoded") as info:
        to_sync_url("postgresql://u:s3cr3t-P@ss:w/rd?@h/d")
    for part in ("s3cr3t", "ss:w", "rd?"):
        assert part not in str(info.value)


def test_settings_in_logs_do_not_show_the_password(caplog):
    settings = Settings(url=build_url(user="u", password=SECRET, host="h", database="d"))
    with caplog.at_level(logging.INFO, logger="labkit"):
        logging.getLogger("labkit").info("using %s", settings)
    assert "s3cr3t" not in caplog.text


def test_an_env_file_is_merged_by_the_caller_and_the_environment_wins(tmp_path):
    """``from_env`` reads a mapping only; a .env is merged under the environment by the
    caller (``labkit.lab.envfile.read_env_file`` reads one)."""
    from labkit.lab.envfile import read_env_file

    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nDATABASE_URL='postgresql://u:fromfile@h/d'\n"
                        "export DB_POOL_SIZE=3  # inline comment\n")
    env_file.chmod(0o600)
    settings = Settings.from_env({**read_env_file(env_file)})
    assert settings.url.password == "fromfile" and settings.pool.pool_size == 3
    settings = Settings.from_env({**read_env_file(env_file), "DB_POOL_SIZE": "9"})
    assert settings.pool.pool_size == 9


def test_replace_validates_again():
    settings = Settings(url="postgresql://u:p@h/d")
    assert settings.replace(processes=3).processes == 3
    with pytest.raises(ConfigurationError, match="processes"):
        settings.replace(processes=0)
    with pytest.raises(ConfigurationError, match="ENVIRONMENT must be"):
        settings.replace(environment="staging")


# --- connect_timeout and application_name: a field or a URL parameter -----------------

def test_connect_timeout_and_application_name_may_come_from_the_url():
    settings = Settings(url="postgresql://u:p@h/d?connect_timeout=3&application_name=shop")
    assert settings.connect_timeout == 3.0 and settings.application_name == "shop"
    assert dict(settings.url.query) == {}  # moved into the fields, not sent twice
    same = Settings(url="postgresql://u:p@h/d?connect_timeout=3", connect_timeout=3.0)
    assert same.connect_timeout == 3.0
    from_env = Settings.from_env({"DATABASE_URL": "postgresql://u:p@h/d?connect_timeout=7"})
    assert from_env.connect_timeout == 7.0


@pytest.mark.parametrize("url, field, value", [
    ("postgresql://u:p@h/d?connect_timeout=3", "connect_timeout", 4.0),
    ("postgresql://u:p@h/d?application_name=a", "application_name", "b"),
])
def test_a_value_given_both_ways_differently_is_refused(url, field, value):
    with pytest.raises(ConfigurationError, match=f"{field} is given twice.*keep one"):
        Settings(url=url, **{field: value})


def test_a_malformed_connect_timeout_in_the_url_is_refused():
    with pytest.raises(ConfigurationError, match="connect_timeout must be a number"):
        Settings(url="postgresql://u:p@h/d?connect_timeout=soon")
    with pytest.raises(ConfigurationError, match="connect_timeout must be a number of seconds"):
        Settings(url="postgresql://u:p@h/d?connect_timeout=0")


# --- nan, inf and other numbers no timeout can be ------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "Infinity", "1e400"])
@pytest.mark.parametrize("var", ["DB_CONNECT_TIMEOUT", "DB_POOL_TIMEOUT"])
def test_non_finite_timeouts_in_the_environment_name_the_variable(var, value):
    """Pins: ``nan`` / ``inf`` read by ``float()`` are refused by ``from_env``, naming the
    variable (before, they passed and failed later as a raw ValueError/OverflowError)."""
    with pytest.raises(ConfigurationError, match=f"{var} must be a number"):
        Settings.from_env({"DATABASE_URL": "postgresql://u:p@h/d", var: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e10])
@pytest.mark.parametrize("field, build", [
    ("connect_timeout", lambda v: Settings(url="postgresql://u:p@h/d", connect_timeout=v)),
    ("pool_timeout", lambda v: PoolProfile(pool_timeout=v)),
    ("pool_timeout", lambda v: DEVELOPMENT_POOL.replace(pool_timeout=v)),
])
def test_timeouts_no_layer_can_wait_are_refused_at_construction(
        field: str, build: Callable[[float], object], value: float):
    """Pins: ``Settings`` / ``PoolProfile`` refuse ``nan``, ``inf`` and waits beyond what
    libpq or Python's threads accept, naming the field, before any engine exists."""
    with pytest.raises(ConfigurationError, match=f"{field} must be a number of seconds > 0"):
        build(value)


@pytest.mark.parametrize("build, words", [
    (lambda: PoolProfile(pool_size=2.5), "pool_size must be an integer"),
    (lambda: PoolProfile(pool_size=True), "pool_size must be an integer"),
    (lambda: PoolProfile(pool_recycle=float("nan")), "pool_recycle must be an integer"),
    (lambda: Settings(url="postgresql://u:p@h/d", statement_timeout_ms=float("nan")),
     "statement_timeout_ms must be an integer"),
    (lambda: Settings(url="postgresql://u:p@h/d", statement_timeout_ms=2**31),
     "statement_timeout_ms must be an integer from 0 to 2147483647"),
])
def test_integer_settings_refuse_what_is_not_an_integer(build, words):
    """Pins: a float (``nan`` included) where an integer belongs is refused at once."""
    with pytest.raises(ConfigurationError, match=words):
        build()


def test_finite_timeouts_still_reach_the_engine():
    """The bounds refuse only the impossible: a large but real timeout is kept."""
    settings = Settings(url="postgresql://u:p@h/d", connect_timeout=3600.0,
                        pool=DEVELOPMENT_POOL.replace(pool_timeout=86400.0))
    assert create_engine(settings).pool.timeout() == 86400.0


# --- the production guard -----------------------------------------------------------

def test_default_url_may_be_a_function_called_only_when_needed():
    """Pins: ``default_url`` may be a function (e.g. starting a local server); it is
    called only in development/test without ``DATABASE_URL``, never in production."""
    calls: list[str] = []

    def local() -> str:
        calls.append("called")
        return "postgresql://u:p@localhost/d"

    assert Settings.from_env({}, default_url=local).url.host == "localhost"
    assert Settings.from_env({"DATABASE_URL": "postgresql://u:p@h/d"},
                             default_url=local).url.host == "h"
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set.*production"):
        Settings.from_env({"ENVIRONMENT": "production"}, default_url=local)
    assert calls == ["called"]


@pytest.mark.parametrize("helper", [database_url, local_settings])
def test_lab_helpers_refuse_production_without_database_url(helper):
    """Pins: ``labkit.lab.database_url()`` / ``local_settings()`` (what ``make lab`` and
    the notebooks call) raise in production instead of using the local server."""
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set.*production"):
        helper({"ENVIRONMENT": "production"})


def test_lab_helpers_use_database_url_in_production():
    env = {"ENVIRONMENT": "production", "DATABASE_URL": "postgresql://u:p@db.example/d"}
    assert database_url(env).host == "db.example"
    assert local_settings(env).pool == PRODUCTION_POOL


# --- settings reach the server ------------------------------------------------------

def test_settings_reach_the_server_through_the_sync_engine(db_url: URL):
    settings = Settings(url=db_url, pool=TEST_POOL, statement_timeout_ms=1234,
                        application_name="labkit-config-test")
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            shown = [conn.execute(text(q)).scalar_one() for q in
                     ("SHOW statement_timeout", "SHOW application_name")]
    finally:
        engine.dispose()
    assert shown == ["1234ms", "labkit-config-test"]


async def test_settings_reach_the_server_through_the_async_engine(db_url: URL):
    settings = Settings(url=db_url, pool=TEST_POOL, statement_timeout_ms=1234,
                        application_name="labkit-config-test")
    engine = create_async_engine(settings)
    try:
        async with engine.connect() as conn:
            shown = [(await conn.execute(text(q))).scalar_one() for q in
                     ("SHOW statement_timeout", "SHOW application_name")]
    finally:
        await engine.dispose()
    assert shown == ["1234ms", "labkit-config-test"]


# --- pre-ping -----------------------------------------------------------------------

def pid_of(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def terminate(observer: Engine, pid: int) -> None:
    with observer.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    assert wait_until_gone(observer, pid)


def test_pre_ping_replaces_a_pooled_connection_whose_backend_died(db_url: URL,
                                                                   observer: Engine):
    """labkit's pre-ping (the pool's checkout event) finds the dead connection and the
    pool reconnects, as SQLAlchemy's pre-ping does: the caller never sees the failure."""
    engine = create_engine(Settings(url=db_url), pool=DEVELOPMENT_POOL.replace(pool_size=1))
    try:
        first = pid_of(engine)
        terminate(observer, first)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != first
    finally:
        engine.dispose()


def test_without_pre_ping_a_dead_pooled_connection_fails_the_next_statement(
        db_url: URL, observer: Engine):
    """The profile's ``pool_pre_ping=False`` really turns it off: the dead connection is
    lent out and its first statement fails as a lost connection."""
    engine = create_engine(Settings(url=db_url),
                           pool=DEVELOPMENT_POOL.replace(pool_size=1, pool_pre_ping=False))
    try:
        terminate(observer, pid_of(engine))
        with pytest.raises(ConnectionLostError):
            with translated(), engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


async def test_async_pre_ping_replaces_a_pooled_connection_whose_backend_died(
        db_url: URL, observer: Engine):
    engine = create_async_engine(Settings(url=db_url),
                                 pool=DEVELOPMENT_POOL.replace(pool_size=1))
    try:
        async with engine.connect() as conn:
            first = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        await asyncio.to_thread(terminate, observer, first)
        async with engine.connect() as conn:
            again = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        assert again != first
    finally:
        await engine.dispose()


# --- dispose ------------------------------------------------------------------------

def backend_alive(observer: Engine, pid: int) -> bool:
    with observer.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"),
                                 {"p": pid}).scalar_one())


def wait_until_gone(observer: Engine, pid: int, timeout: float = 5.0) -> bool:
    """True once the backend has left ``pg_stat_activity`` (its exit is asynchronous)."""
    deadline = time.monotonic() + timeout
    while backend_alive(observer, pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_dispose_leaves_a_checked_out_connection_open_after_its_return(db_url: URL,
                                                                         observer: Engine):
    """Pins what ``engine.dispose()`` does (SQLAlchemy 2.1) on labkit's pool classes:
    idle connections close at once; one checked out during ``dispose`` is not closed
    when returned, does not enter the new pool, and stays open on the server until the
    garbage collector frees the discarded pool."""
    engine = create_engine(Settings(url=db_url), pool=DEVELOPMENT_POOL)
    held = engine.connect()
    held_pid = held.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with engine.connect() as idle:
        idle_pid = idle.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    gc.disable()  # the cycle collector would otherwise free the old pool at any moment
    try:
        engine.dispose()
        assert wait_until_gone(observer, idle_pid)
        held.close()  # returned after dispose
        time.sleep(0.5)
        assert backend_alive(observer, held_pid)
        assert engine.pool.checkedin() == 0 and engine.pool.checkedout() == 0
        with engine.connect() as fresh:  # the new pool opens its own connection
            assert fresh.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != held_pid
    finally:
        gc.enable()
    del held
    gc.collect()
    assert wait_until_gone(observer, held_pid)
    engine.dispose()


async def test_async_dispose_leaves_a_checked_out_connection_open_after_its_return(
        db_url: URL, observer: Engine):
    """Pins the async twin: an asyncpg connection checked out during
    ``await engine.dispose()`` stays open after it is returned, outside the new pool."""
    engine = create_async_engine(Settings(url=db_url), pool=DEVELOPMENT_POOL)
    held = await engine.connect()
    held_pid = (await held.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
    gc.disable()
    try:
        await engine.dispose()
        await held.close()
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(backend_alive, observer, held_pid)
        assert engine.sync_engine.pool.checkedin() == 0
    finally:
        gc.enable()
    del held
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # asyncpg: "unclosed connection"
        gc.collect()
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(wait_until_gone, observer, held_pid)
    await engine.dispose()


def test_replace_takes_a_url_that_carries_connect_timeout_and_application_name():
    settings = Settings(url="postgresql://u:p@h/d")
    moved = settings.replace(url="postgresql://u:p@h2/d?connect_timeout=3"
                                 "&application_name=shop")
    assert (moved.url.host, moved.connect_timeout, moved.application_name) == (
        "h2", 3.0, "shop")


# --- psycopg 3: chosen by the setting, DB_DRIVER or the URL ---------------------------

@pytest.mark.parametrize("how", ["setting", "env", "url", "url-async"])
def test_psycopg_is_chosen_by_setting_env_or_url_for_both_engines(how):
    url = "postgresql://u:p@h/d?sslmode=require&options=-csearch_path%3Dapp"
    if how == "setting":
        settings = Settings(url=url, driver="psycopg")
    elif how == "env":
        settings = Settings.from_env({"DATABASE_URL": url, "DB_DRIVER": " Psycopg "})
    else:
        name = "psycopg" if how == "url" else "psycopg_async"
        settings = Settings(url=url.replace("postgresql:", f"postgresql+{name}:"))
    assert settings.driver == "psycopg"
    for engine in (create_engine(settings), create_async_engine(settings).sync_engine):
        assert engine.dialect.driver == "psycopg"
    # libpq's parameters for both: the TLS mode stays sslmode, options stay options.
    assert settings.async_url.query == {"sslmode": "require", "options": "-csearch_path=app"}
    assert settings.sync_url.drivername == settings.async_url.drivername == "postgresql+psycopg"


def test_default_driver_is_psycopg2_and_asyncpg_even_with_psycopg_installed():
    """Pins: SQLAlchemy 2.1's own default for ``postgresql://`` is psycopg 3; labkit's is not."""
    settings = Settings(url="postgresql://u:p@h/d")
    assert settings.driver is None
    assert create_engine(settings).dialect.driver == "psycopg2"
    assert create_async_engine(settings).sync_engine.dialect.driver == "asyncpg"


@pytest.mark.parametrize(("url", "driver"), [
    ("postgresql+asyncpg://u:p@h/d", "psycopg"),    # the URL names another driver
    ("postgresql+psycopg2://u:p@h/d", "psycopg"),
    ("postgresql://u:p@h/d", "asyncpg"),             # only "psycopg" or None
    ("postgresql://u:p@h/d", "pg8000"),
])
def test_a_driver_the_url_contradicts_or_labkit_does_not_speak_is_refused(url, driver):
    with pytest.raises(ConfigurationError, match="driver must be 'psycopg'"):
        Settings(url=url, driver=driver)
    with pytest.raises(ConfigurationError, match="unknown driver"):
        Settings(url="postgresql+pg8000://u:p@h/d")
