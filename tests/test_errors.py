"""Real server errors map onto labkit's exception tree with readable messages."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL

from labkit import (
    TEST_POOL,
    ConnectionLostError,
    DatabaseError,
    IntegrityError,
    LabkitError,
    QueryTimeoutError,
    Settings,
    TransientError,
    create_engine,
)
from labkit.errors import ProgrammingError, redact, translate_error
from tests.conftest import translated


def test_statement_timeout_is_a_query_timeout(db_url):
    engine = create_engine(Settings(url=db_url, statement_timeout_ms=100))
    with pytest.raises(QueryTimeoutError, match="longer than statement_timeout") as info:
        with translated(), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
    assert isinstance(info.value, TransientError)
    assert info.value.sqlstate == "57014"
    engine.dispose()


def test_duplicate_key_is_an_integrity_error_not_transient(labkit_connection):
    """Runs inside ``labkit.testing``'s rolled-back transaction: the table never outlives it."""
    labkit_connection.execute(text("CREATE TABLE dup_keys (id int PRIMARY KEY)"))
    with pytest.raises(IntegrityError) as info:
        with translated(), labkit_connection.begin_nested():
            labkit_connection.execute(text("INSERT INTO dup_keys VALUES (1), (1)"))
    assert info.value.sqlstate == "23505"
    assert not isinstance(info.value, TransientError)
    assert not isinstance(translate_error(info.value.__cause__), TransientError)


def test_bad_value_is_a_programming_error_with_its_sqlstate(engine):
    """The old ``DataError`` is gone: a value invalid for its type is ``ProgrammingError``
    (SQLSTATE class 22 kept in ``sqlstate``)."""
    with pytest.raises(ProgrammingError) as info:
        with translated(), engine.connect() as conn:
            conn.execute(text("SELECT 'abc'::int"))
    assert info.value.sqlstate == "22P02"
    assert not isinstance(info.value, TransientError)


def test_syntax_error_is_a_programming_error(engine):
    with pytest.raises(ProgrammingError, match="The SQL or its data is wrong"):
        with translated(), engine.connect() as conn:
            conn.execute(text("SELEC 1"))


def test_killed_backend_is_a_lost_connection(engine, observer):
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with observer.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(ConnectionLostError, match="Run the whole transaction again"):
            with translated():
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
        with translated(), engine.connect() as conn:
            conn.execute(text("SELEC 1"))
    message = str(info.value)
    assert info.value.sqlstate == "42601"
    assert message.startswith("The SQL or its data is wrong")
    assert "(SQLSTATE 42601) [ProgrammingError: syntax error at or near" in message


# --- the tree, the table and sqlstate ---------------------------------------------------

def test_every_labkit_error_class_is_in_the_tree_and_database_errors_carry_sqlstate():
    """The 14 classes: two roots under ``LabkitError``; every ``DatabaseError`` has
    ``sqlstate`` (``None`` unless the server sent one)."""
    from labkit import errors

    classes = {name: getattr(errors, name) for name in errors.__all__
               if isinstance(getattr(errors, name), type)}
    assert len(classes) == 14
    for name, cls in classes.items():
        assert issubclass(cls, LabkitError), name
    assert issubclass(errors.ConfigurationError, ValueError)
    for name in ("DataError", "ServerError", "TooManyConnectionsError",
                 "LockNotAvailableError", "HealthCheckTimeoutError"):
        assert not hasattr(errors, name), name
    assert DatabaseError("x").sqlstate is None
    assert QueryTimeoutError("x", sqlstate="55P03").sqlstate == "55P03"


def test_the_sqlstate_table_maps_codes_and_classes_to_database_errors():
    """One table: keys are 5-character codes or 2-character classes; an exact code wins
    over its class."""
    from labkit.errors import SQLSTATES, DatabaseUnavailableError

    for code, cls in SQLSTATES.items():
        assert len(code) in (2, 5) and code.isalnum(), code
        assert issubclass(cls, DatabaseError), code
    assert SQLSTATES["53300"] is DatabaseUnavailableError and SQLSTATES["53"] is DatabaseError
    assert SQLSTATES["55P03"] is QueryTimeoutError and SQLSTATES["55"] is ProgrammingError


def test_sqlstate_of_reads_the_servers_code_through_the_wrappers(engine):
    from labkit.errors import sqlstate_of

    with pytest.raises(sa_exc.DBAPIError) as info:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1 / 0"))
    assert sqlstate_of(info.value) == "22012"  # SQLAlchemy's wrapper
    assert sqlstate_of(info.value.orig) == "22012"  # psycopg2's own
    assert sqlstate_of(translate_error(info.value)) == "22012"  # labkit's
    assert sqlstate_of(ValueError("nothing to do with the database")) is None


def test_sqlstate_of_reads_a_fatal_at_connect_from_its_message(db_url):
    """psycopg2 has no ``pgcode`` for a FATAL at connect: the code is read from the text."""
    from labkit.errors import sqlstate_of

    engine = create_engine(Settings(url=db_url.set(database="labkit_no_such_db_x"),
                                    pool=TEST_POOL))
    try:
        with pytest.raises(sa_exc.OperationalError) as info:
            engine.connect()
    finally:
        engine.dispose()
    assert getattr(info.value.orig, "pgcode", None) is None
    assert sqlstate_of(info.value) == "3D000"


def test_a_labkit_error_is_translated_to_itself(engine):
    error = QueryTimeoutError("already ours", sqlstate="57014")
    assert translate_error(error) is error


def test_a_translated_error_chains_the_original_and_masks_secrets(engine, password):
    with pytest.raises(ProgrammingError) as info:
        with translated(secrets=["Zq8-known-secret"]), engine.connect() as conn:
            conn.execute(text("SELECT 'Zq8-known-secret'::int"))
    assert isinstance(info.value.__cause__, sa_exc.DBAPIError)
    assert "Zq8-known-secret" not in str(info.value)
    assert not password or password not in str(info.value)


def test_a_statement_in_an_aborted_transaction_names_the_savepoint_fix_25P02(engine):
    with engine.connect() as conn:
        with pytest.raises(sa_exc.DBAPIError):
            conn.execute(text("SELECT 1 / 0"))
        with pytest.raises(ProgrammingError) as info:
            with translated():
                conn.execute(text("SELECT 1"))
        conn.rollback()
    assert info.value.sqlstate == "25P02"
    assert "savepoint (begin_nested)" in str(info.value)


def test_an_exhausted_pool_is_a_pool_timeout_without_sqlstate(db_url):
    """SQLAlchemy's pool ``TimeoutError`` becomes ``PoolTimeoutError`` (transient, no
    SQLSTATE: the server was never asked), with the hint about releasing sessions."""
    from labkit import DEVELOPMENT_POOL, PoolTimeoutError

    engine = create_engine(Settings(url=db_url), pool=DEVELOPMENT_POOL.replace(
        pool_size=1, max_overflow=0, pool_timeout=0.2))
    try:
        with engine.connect() as held:
            held.execute(text("SELECT 1"))
            with pytest.raises(PoolTimeoutError, match="pool_timeout") as info:
                with translated(), engine.connect():
                    pass
    finally:
        engine.dispose()
    assert isinstance(info.value, TransientError) and info.value.sqlstate is None
    assert isinstance(info.value.__cause__, sa_exc.TimeoutError)


def test_psycopg_pool_timeout_is_a_pool_timeout_alone_or_behind_sqlalchemy(db_url):
    """Pins: psycopg_pool's ``PoolTimeout`` (a psycopg ``OperationalError``) is labkit's
    ``PoolTimeoutError``, raised by the pool itself or through an engine whose ``creator``
    takes from it; before, it was a plain ``DatabaseError``."""
    import sqlalchemy
    from psycopg_pool import ConnectionPool, PoolTimeout
    from sqlalchemy.pool import NullPool

    from labkit import PoolTimeoutError

    conninfo = db_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with ConnectionPool(conninfo, min_size=1, max_size=1, timeout=0.2) as pool:
        engine = sqlalchemy.create_engine("postgresql+psycopg://", poolclass=NullPool,
                                          creator=pool.getconn)
        with pool.connection():                       # the pool's only connection, held
            with pytest.raises(PoolTimeout) as alone:
                pool.getconn()
            with pytest.raises(sqlalchemy.exc.DBAPIError) as behind:
                engine.connect()
        engine.dispose()
    for raised in (alone.value, behind.value):
        error = translate_error(raised)
        assert type(error) is PoolTimeoutError, (type(error), error)
        assert "couldn't get a connection after 0.20 sec" in str(error)
