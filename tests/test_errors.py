"""Real server errors map onto labkit's exception tree with readable messages."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from labkit import (
    ConnectionLostError,
    DataError,
    IntegrityError,
    ProgrammingError,
    QueryTimeoutError,
    Settings,
    TransientError,
    create_engine,
    is_transient,
    redact,
)
from labkit.errors import translating_errors


def test_statement_timeout_is_a_query_timeout(db_url):
    engine = create_engine(Settings(url=db_url, statement_timeout_ms=100))
    with pytest.raises(QueryTimeoutError, match="longer than its timeout") as info:
        with translating_errors(), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
    assert isinstance(info.value, TransientError)
    engine.dispose()


def test_duplicate_key_is_an_integrity_error_not_transient(engine, table):
    with pytest.raises(IntegrityError) as info:
        with translating_errors(), engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} VALUES (1, 'a'), (1, 'b')"))
    assert not is_transient(info.value.__cause__)


def test_bad_value_is_a_data_error(engine):
    with pytest.raises(DataError):
        with translating_errors(), engine.connect() as conn:
            conn.execute(text("SELECT 'abc'::int"))


def test_syntax_error_is_a_programming_error(engine):
    with pytest.raises(ProgrammingError, match="SQL is wrong"):
        with translating_errors(), engine.connect() as conn:
            conn.execute(text("SELEC 1"))


def test_killed_backend_is_a_lost_connection(engine, observer):
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with observer.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(ConnectionLostError, match="Retry the whole transaction"):
            with translating_errors():
                conn.execute(text("SELECT 1"))


def test_redact_masks_urls_pairs_and_known_secrets():
    text_ = "postgresql://u:p@ss@h/d password='x y' token=abc123"
    masked = redact(text_, ["abc123"])
    assert "p@ss" not in masked and "x y" not in masked and "abc123" not in masked
