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
    Environment,
    PoolProfile,
    Settings,
    async_dispose_engine,
    build_url,
    create_async_engine,
    create_engine,
    dispose_engine,
    mask_url,
    to_async_url,
    to_sync_url,
)
from labkit.config import url_as_text
from labkit.lab import database_url, local_settings

SECRET = "s3cr3t-P@ss:w/rd?#"


def test_plain_postgresql_url_gets_psycopg2_for_sync_and_asyncpg_for_async():
    assert to_sync_url("postgresql://u:p@h:5432/d").drivername == "postgresql+psycopg2"
    assert to_async_url("postgresql://u:p@h:5432/d").drivername == "postgresql+asyncpg"


def test_driver_is_swapped_between_sync_and_async():
    assert to_sync_url("postgresql+asyncpg://u:p@h/d").drivername == "postgresql+psycopg2"
    assert to_async_url("postgresql+psycopg2://u:p@h/d").drivername == "postgresql+asyncpg"


def test_heroku_style_postgres_scheme_is_accepted():
    assert to_sync_url("postgres://u:p@h/d").drivername == "postgresql+psycopg2"


def test_build_url_percent_encodes_the_password_and_round_trips():
    url = build_url(user="app", password=SECRET, host="db", port=5432, database="app")
    text = url_as_text(url)
    assert SECRET not in text
    assert "%40" in text and "%2F" in text
    assert to_sync_url(text).password == SECRET


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
    })
    assert settings.environment is Environment.PRODUCTION
    assert settings.pool == PoolProfile(pool_size=7, max_overflow=3, pool_timeout=2.5,
                                        pool_recycle=600, pool_pre_ping=False)
    assert settings.echo is True
    assert settings.connect_timeout == 4.0
    assert settings.statement_timeout_ms == 1500


def test_production_without_database_url_is_refused():
    with pytest.raises(ConfigurationError, match="DATABASE_URL is not set.*production"):
        Settings.from_env({"ENVIRONMENT": "production"},
                          default_url="postgresql://u:p@localhost/d")


def test_development_without_database_url_uses_the_default():
    settings = Settings.from_env({}, default_url="postgresql://u:p@localhost/d")
    assert settings.url.host == "localhost"
    assert settings.pool == DEVELOPMENT_POOL


def test_pool_profiles_per_environment_match_the_design():
    assert (DEVELOPMENT_POOL.pool_size, DEVELOPMENT_POOL.max_overflow) == (5, 10)
    assert DEVELOPMENT_POOL.pool_pre_ping
    assert (PRODUCTION_POOL.pool_size, PRODUCTION_POOL.max_overflow) == (20, 40)
    assert PRODUCTION_POOL.pool_timeout == 30 and PRODUCTION_POOL.pool_recycle == 3600
    assert PRODUCTION_POOL.pool_pre_ping
    assert TEST_POOL.poolclass == "null"


def test_engine_applies_the_profile_and_overrides():
    settings = Settings(url="postgresql://u:p@h/d", pool=PRODUCTION_POOL)
    engine = create_engine(settings)
    assert engine.pool.size() == 20
    assert engine.pool._max_overflow == 40
    assert engine.pool._recycle == 3600
    assert engine.pool._pre_ping is True
    small = create_engine(settings, pool=PRODUCTION_POOL.replace(pool_size=2, max_overflow=0))
    assert small.pool.size() == 2


def test_async_engine_uses_asyncpg_and_the_profile():
    settings = Settings(url="postgresql://u:p@h/d", pool=DEVELOPMENT_POOL)
    engine = create_async_engine(settings)
    assert engine.sync_engine.dialect.driver == "asyncpg"
    assert engine.sync_engine.pool.size() == 5


def test_sqlite_memory_gets_a_static_pool_shared_across_threads():
    from sqlalchemy import text
    from sqlalchemy.pool import StaticPool

    engine = create_engine(Settings(url="sqlite://", pool=DEVELOPMENT_POOL))
    assert isinstance(engine.pool, StaticPool)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE x (a int)"))
    with engine.connect() as conn:  # same in-memory database, not an empty one
        assert conn.execute(text("SELECT count(*) FROM x")).scalar_one() == 0


@pytest.mark.parametrize("bad_url, words", [
    ("not a url", "malformed database URL"),
    ("", "empty"),
    ("postgresql://u:hunter2@h:99999/d", "out of range"),
    ("postgresql+nosuchdriver://u:hunter2@h/d", "unknown PostgreSQL driver"),
    ("mysql://u:hunter2@h/d", "unsupported database"),
])
def test_bad_urls_raise_configuration_error_without_the_password(bad_url, words):
    with pytest.raises(ConfigurationError, match=words) as info:
        to_sync_url(bad_url)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("changes, words", [
    ({"pool_size": -1}, "pool_size must be >= 0"),
    ({"max_overflow": -5}, "max_overflow must be >= -1"),
    ({"pool_timeout": 0}, "pool_timeout must be > 0"),
    ({"pool_recycle": 0}, "pool_recycle must be > 0"),
    ({"poolclass": "magic"}, "poolclass must be"),
])
def test_invalid_pool_values_name_the_argument(changes, words):
    with pytest.raises(ConfigurationError, match=words):
        DEVELOPMENT_POOL.replace(**changes)


@pytest.mark.parametrize("env, words", [
    ({"DB_POOL_SIZE": "-3"}, "pool_size must be >= 0"),
    ({"DB_POOL_SIZE": "five"}, "DB_POOL_SIZE must be an integer"),
    ({"DB_POOL_PRE_PING": "maybe"}, "DB_POOL_PRE_PING must be true or false"),
    ({"ENVIRONMENT": "staging"}, "ENVIRONMENT must be"),
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


def test_env_file_supplies_database_url_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nDATABASE_URL='postgresql://u:fromfile@h/d'\n"
                        "export DB_POOL_SIZE=3  # inline comment\n")
    env_file.chmod(0o600)
    settings = Settings.from_env({}, env_file=env_file)
    assert settings.url.password == "fromfile" and settings.pool.pool_size == 3
    settings = Settings.from_env({"DB_POOL_SIZE": "9"}, env_file=env_file)
    assert settings.pool.pool_size == 9


def test_env_file_readable_by_others_is_warned_about(tmp_path, caplog):
    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_URL=postgresql://u:hunter2@h/d\n")
    env_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="labkit"):
        Settings.from_env({}, env_file=env_file)
    assert "chmod 600" in caplog.text and "hunter2" not in caplog.text
    caplog.clear()
    env_file.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="labkit"):
        Settings.from_env({}, env_file=env_file)
    assert "chmod 600" not in caplog.text


def test_malformed_env_file_line_is_reported(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("this is not a setting\n")
    with pytest.raises(ConfigurationError, match=r"\.env:1: expected KEY=VALUE"):
        Settings.from_env({}, env_file=env_file)


# --- nan, inf and other numbers no timeout can be ------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "Infinity", "1e400"])
@pytest.mark.parametrize("var", ["DB_CONNECT_TIMEOUT", "DB_POOL_TIMEOUT"])
def test_non_finite_timeouts_in_the_environment_name_the_variable(var, value):
    """Pins: ``nan`` / ``inf`` read by ``float()`` are refused by ``from_env``, naming the
    variable (before, they passed and failed later as a raw ValueError/OverflowError)."""
    with pytest.raises(ConfigurationError, match=f"{var} must be a finite number"):
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
    with pytest.raises(ConfigurationError, match=f"{field} must be > 0"):
        build(value)


@pytest.mark.parametrize("build, words", [
    (lambda: PoolProfile(pool_size=2.5), "pool_size must be an integer"),
    (lambda: PoolProfile(pool_recycle=float("nan")), "pool_recycle must be an integer"),
    (lambda: Settings(url="postgresql://u:p@h/d", statement_timeout_ms=float("nan")),
     "statement_timeout_ms must be an integer"),
    (lambda: Settings(url="postgresql://u:p@h/d", statement_timeout_ms=2**31),
     "statement_timeout_ms must be >= 0 and <="),
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
    """Pins what ``dispose_engine`` really does (SQLAlchemy 2.1), as its docstring now
    says: idle connections close at once; one checked out during ``dispose`` is not
    closed when returned, does not enter the new pool, and stays open on the server
    until the garbage collector frees the discarded pool."""
    assert dispose_engine.__doc__ and "*not* closed" in dispose_engine.__doc__
    engine = create_engine(Settings(url=db_url), pool=DEVELOPMENT_POOL)
    held = engine.connect()
    held_pid = held.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with engine.connect() as idle:
        idle_pid = idle.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    gc.disable()  # the cycle collector would otherwise free the old pool at any moment
    try:
        dispose_engine(engine)
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
    ``async_dispose_engine`` stays open after it is returned, outside the new pool."""
    assert async_dispose_engine.__doc__ and "stays" in async_dispose_engine.__doc__
    engine = create_async_engine(Settings(url=db_url), pool=DEVELOPMENT_POOL)
    held = await engine.connect()
    held_pid = (await held.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
    gc.disable()
    try:
        await async_dispose_engine(engine)
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
