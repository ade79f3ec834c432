"""Real server errors map onto labkit's exception tree with readable messages."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL

from labkit import (
    TEST_POOL,
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
    translate_error,
)
from labkit.errors import translating_errors


def test_statement_timeout_is_a_query_timeout(db_url):
    engine = create_engine(Settings(url=db_url, statement_timeout_ms=100))
    with pytest.raises(QueryTimeoutError, match="longer than its timeout") as info:
        with translating_errors(), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
    assert isinstance(info.value, TransientError)
    engine.dispose()


def test_duplicate_key_is_an_integrity_error_not_transient(labkit_connection):
    """Runs inside ``labkit.testing``'s rolled-back transaction: the table never outlives it."""
    labkit_connection.execute(text("CREATE TABLE dup_keys (id int PRIMARY KEY)"))
    with pytest.raises(IntegrityError) as info:
        with translating_errors(), labkit_connection.begin_nested():
            labkit_connection.execute(text("INSERT INTO dup_keys VALUES (1), (1)"))
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
    text_ = "postgresql://u:p@ss@h/d password='x y' token=abc123-long-secret"
    masked = redact(text_, ["abc123-long-secret"])
    assert "p@ss" not in masked and "x y" not in masked and "abc123" not in masked


def test_short_password_does_not_mangle_a_real_driver_message(closed_port):
    """Pins: a one-letter password is not blindly replaced inside words.

    The old ``redact`` replaced every ``p`` of the message: ``O***erationalError``,
    ``***ort``, which mangled the message and revealed the password by its gaps.
    """
    url = URL.create("postgresql+psycopg2", username="app", password="p",
                     host="127.0.0.1", port=closed_port, database="x")
    engine = create_engine(Settings(url=url, pool=TEST_POOL, connect_timeout=1.0))
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            engine.connect()
    finally:
        engine.dispose()
    message = str(translate_error(info.value, secrets=[url.password]))
    assert "[OperationalError: connection to server at" in message
    assert "port" in message and "***" not in message
    assert redact("(psycopg2.OperationalError) could not connect", ["p"]) == (
        "(psycopg2.OperationalError) could not connect")


def test_redact_masks_a_password_holding_an_unencoded_at():
    """Guards: the whole password of ``user:S3cr@tPass@host`` is masked (also before the fix)."""
    masked = redact("could not parse postgresql://app:S3cr@tPass@127.0.0.1/x today")
    assert masked == "could not parse postgresql://app:***@127.0.0.1/x today"


def test_redact_masks_a_query_string_password_and_keeps_the_rest_of_the_url():
    """Pins: ``?password=`` / ``&password=`` are masked up to the next parameter only.

    The old pattern swallowed everything after ``password=`` up to a space, so the
    other parameters of the URL were lost.
    """
    assert redact("postgresql://app@db/x?password=hunter2&sslmode=require") == (
        "postgresql://app@db/x?password=***&sslmode=require")
    assert redact("postgresql://app@db/x?sslmode=require&password=hunter2 failed") == (
        "postgresql://app@db/x?sslmode=require&password=*** failed")


@pytest.mark.parametrize("pair", [
    "password='it''s a secret'",     # SQL: a doubled quote
    "password='it\\'s a secret'",    # libpq conninfo: a backslash escape
    'password: "it\'s a secret"',
    "'password': 'it''s a secret'",
    "PGPASSWORD=it's-a-secret",
])
def test_redact_masks_quoted_password_pairs_with_escaped_quotes(pair):
    """Pins: a quoted password with an escaped quote is masked whole.

    The old pattern stopped at the first quote of ``'it''s a secret'`` and left
    ``s a secret'`` in the message.
    """
    masked = redact(f"host=db {pair} user=app")
    assert "it" not in masked.replace("***", "") and "secret" not in masked
    assert masked.startswith("host=db ") and masked.endswith(" user=app")


def test_redact_masks_a_long_known_secret_only_as_a_whole_token():
    """Pins: a known secret outside any structure is masked when it is a whole token."""
    secret = "Zq8-hunter2-Zq8"
    assert redact(f"echoed {secret} here", [secret]) == "echoed *** here"
    assert redact("pgpass", ["pass"]) == "pgpass"
    assert redact("message", [None, ""]) == "message"


def test_translated_message_reads_hint_sqlstate_then_driver_words(engine):
    """Pins the message shape: the hint, the SQLSTATE, then ``[ExcType: driver words]``."""
    with pytest.raises(ProgrammingError) as info:
        with translating_errors(), engine.connect() as conn:
            conn.execute(text("SELEC 1"))
    message = str(info.value)
    assert info.value.sqlstate == "42601"
    assert message.startswith("The SQL is wrong")
    assert "(SQLSTATE 42601) [ProgrammingError: syntax error at or near" in message
