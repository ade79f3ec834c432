"""Settings, URLs and pool profiles: no database needed."""

from __future__ import annotations

import logging

import pytest

from labkit import (
    DEVELOPMENT_POOL,
    PRODUCTION_POOL,
    TEST_POOL,
    ConfigurationError,
    Environment,
    PoolProfile,
    Settings,
    build_url,
    create_async_engine,
    create_engine,
    mask_url,
    to_async_url,
    to_sync_url,
)
from labkit.config import url_as_text

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
