"""labkit's exceptions, and the translation of driver errors into them.

The tree::

    LabkitError
    ├── ConfigurationError          settings or URL are wrong; fix the configuration
    └── DatabaseError               the database failed an operation
        ├── TransientError          worth retrying the whole unit of work
        │   ├── DatabaseUnavailableError   cannot connect: refused, unreachable, starting
        │   ├── ConnectionLostError        an open connection died (restart, kill, network)
        │   ├── PoolTimeoutError           no pooled connection free within pool_timeout
        │   ├── QueryTimeoutError          statement or command timeout
        │   ├── TooManyConnectionsError    the server's max_connections is reached
        │   ├── SerializationError         serialization failure or deadlock; retry
        │   └── HealthCheckTimeoutError    the health probe did not answer in time
        │   └── LockNotAvailableError      lock_timeout or NOWAIT: another transaction holds it
        ├── CommitOutcomeUnknownError  the connection died while COMMIT was in flight
        ├── AuthenticationError     wrong user or password (retrying cannot help)
        ├── IntegrityError          a constraint rejected the data
        ├── DataError               a value is invalid for its type
        ├── ProgrammingError        the SQL is wrong: syntax, missing table, bad column
        ├── ServerError             the server failed on its side: disk full, out of memory, I/O
        └── RetryExhaustedError     retries used up their budget; ``last_error`` says why

:func:`translate_error` maps SQLAlchemy, psycopg2 and asyncpg exceptions onto this tree
by SQLSTATE first and exception type second, and writes a message a learner can act
on. Every message passes through :func:`redact`, so a password never leaks into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Iterable, Iterator

__all__ = [
    "AuthenticationError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConnectionLostError",
    "DataError",
    "DatabaseError",
    "DatabaseUnavailableError",
    "HealthCheckTimeoutError",
    "IntegrityError",
    "LabkitError",
    "LockNotAvailableError",
    "PoolTimeoutError",
    "ProgrammingError",
    "QueryTimeoutError",
    "RetryExhaustedError",
    "SerializationError",
    "ServerError",
    "TooManyConnectionsError",
    "TransientError",
    "is_database_error",
    "is_transient",
    "redact",
    "translate_error",
    "translating_errors",
    "async_translating_errors",
]


class LabkitError(Exception):
    """Base class of every error labkit raises."""


class ConfigurationError(LabkitError, ValueError):
    """The settings or the database URL are invalid."""


class DatabaseError(LabkitError):
    """The database failed an operation."""


class TransientError(DatabaseError):
    """A failure that may pass: retry the whole unit of work."""


class DatabaseUnavailableError(TransientError):
    """No connection could be opened: server down, unreachable or starting up."""


class ConnectionLostError(TransientError):
    """An open connection broke: the server restarted or the backend was killed."""


class PoolTimeoutError(TransientError):
    """Every pooled connection stayed checked out for longer than ``pool_timeout``."""


class QueryTimeoutError(TransientError):
    """A statement ran longer than its statement or command timeout."""


class TooManyConnectionsError(TransientError):
    """The server refused a connection because ``max_connections`` is reached."""


class SerializationError(TransientError):
    """A serialization failure or deadlock: the transaction must be run again."""


class HealthCheckTimeoutError(TransientError):
    """The health probe did not answer within its timeout."""


class LockNotAvailableError(TransientError):
    """A lock could not be taken in time (``lock_timeout``, ``NOWAIT``): another transaction holds it."""


class CommitOutcomeUnknownError(DatabaseError):
    """The connection was lost while ``COMMIT`` was in flight: the outcome is unknown.

    The server may have committed the transaction and lost only its answer, or not. It
    is not a :class:`TransientError`: running the work again could store it twice.
    Retry only work that is idempotent (an idempotency key, ``ON CONFLICT DO NOTHING``),
    and say so: ``run_in_transaction(..., idempotent=True)``.
    """


class ServerError(DatabaseError):
    """The server failed on its side: disk full, out of memory, an I/O or internal error."""


class AuthenticationError(DatabaseError):
    """The server rejected the user name or password."""


class IntegrityError(DatabaseError):
    """A constraint (unique, foreign key, not null, check) rejected the data."""


class DataError(DatabaseError):
    """A value is invalid for its column type or operation."""


class ProgrammingError(DatabaseError):
    """The SQL is wrong: syntax error, missing table or column, wrong argument."""


class RetryExhaustedError(DatabaseError):
    """Retrying a transient failure used up the attempts or the time budget."""

    def __init__(self, message: str, *, attempts: int, elapsed: float,
                 last_error: BaseException | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error


# --- secrets -----------------------------------------------------------------------

# Greedy up to the last '@' of the URL, so an unencoded '@' in a password is masked too.
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<pw>[^\s'\"]*)(?=@[^@\s'\"]*(?:[\s'\"]|$))",
    re.I)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|\"[^\"]*\"|\S+)", re.I)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Return ``text`` with passwords masked as ``***``.

    Masks the password part of any URL (``scheme://user:secret@host``), any
    ``password=...`` pair, and every occurrence of the given ``secrets``.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    # "PASSWORD" is the placeholder in labkit's own hints, not a secret.
    text = _URL_PASSWORD.sub(
        lambda m: m.group(0) if m.group("pw") == "PASSWORD" else m.group("head") + "***", text)
    return _KV_PASSWORD.sub(lambda m: m.group("head") + "***", text)


# --- classification ---------------------------------------------------------------

# SQLSTATE classes and codes, from PostgreSQL's errcodes appendix.
_SQLSTATE_EXACT: dict[str, type[DatabaseError]] = {
    "53300": TooManyConnectionsError,   # too_many_connections
    "57014": QueryTimeoutError,         # query_canceled (statement_timeout)
    "25P03": ConnectionLostError,       # idle_in_transaction_session_timeout
    "57P01": ConnectionLostError,       # admin_shutdown
    "57P02": ConnectionLostError,       # crash_shutdown
    "57P03": DatabaseUnavailableError,  # cannot_connect_now (starting up)
    "57P05": ConnectionLostError,       # idle_session_timeout
    "40001": SerializationError,        # serialization_failure
    "40P01": SerializationError,        # deadlock_detected
    "28P01": AuthenticationError,       # invalid_password
    "28000": AuthenticationError,       # invalid_authorization_specification
    "3D000": ProgrammingError,          # invalid_catalog_name (no such database)
}
_SQLSTATE_CLASS: dict[str, type[DatabaseError]] = {
    "08": DatabaseUnavailableError,     # connection exception
    "23": IntegrityError,
    "22": DataError,
    "42": ProgrammingError,
    "28": AuthenticationError,
    "40": SerializationError,
    "53": TooManyConnectionsError,      # insufficient resources
    "57": ConnectionLostError,          # operator intervention
}

_HINTS: dict[type[DatabaseError], str] = {
    DatabaseUnavailableError: "Could not connect to PostgreSQL. Is the server running and "
    "reachable at this host and port?",
    ConnectionLostError: "The connection to PostgreSQL was lost (server restart, killed "
    "backend or network failure). Retry the whole transaction; pool_pre_ping catches "
    "connections that died while idle in the pool.",
    PoolTimeoutError: "No pooled connection became free within pool_timeout: every "
    "connection is checked out. Release sessions sooner, or raise pool_size/max_overflow.",
    QueryTimeoutError: "The statement ran longer than its timeout and was cancelled.",
    TooManyConnectionsError: "The server has no connection slots left (max_connections). "
    "Lower pool_size + max_overflow across your processes, or put a pooler in front.",
    SerializationError: "The transaction conflicted with a concurrent one (serialization "
    "failure or deadlock). Run the whole transaction again.",
    AuthenticationError: "PostgreSQL rejected the user name or password. Check the "
    "credentials in DATABASE_URL.",
    IntegrityError: "A constraint rejected the data (unique, foreign key, not null or check).",
    DataError: "A value is invalid for its column type or operation.",
    ProgrammingError: "The SQL is wrong: syntax, a missing table or column, or wrong "
    "parameters.",
    DatabaseError: "The database reported an error.",
}


def _sqlstate(exc: BaseException) -> str | None:
    for candidate in (exc, getattr(exc, "orig", None), getattr(exc, "__cause__", None)):
        if candidate is None:
            continue
        code = getattr(candidate, "pgcode", None) or getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def _classify(exc: BaseException) -> type[DatabaseError]:
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.TimeoutError):
        return PoolTimeoutError
    code = _sqlstate(exc)
    if code is not None:
        if code in _SQLSTATE_EXACT:
            return _SQLSTATE_EXACT[code]
        if code[:2] in _SQLSTATE_CLASS:
            return _SQLSTATE_CLASS[code[:2]]
    orig = getattr(exc, "orig", None) or exc
    text = str(exc).lower()
    if _raised_while_connecting(exc) and isinstance(
            orig, (asyncio.TimeoutError, TimeoutError, socket.timeout, OSError)):
        return DatabaseUnavailableError
    if "password authentication failed" in text or "no password supplied" in text:
        return AuthenticationError
    if "too many clients" in text:
        return TooManyConnectionsError
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return ConnectionLostError
    if isinstance(orig, (asyncio.TimeoutError, TimeoutError, socket.timeout)):
        return QueryTimeoutError if "connect" not in text else DatabaseUnavailableError
    if isinstance(orig, (ConnectionRefusedError, socket.gaierror)):
        return DatabaseUnavailableError
    if isinstance(orig, (ConnectionError, EOFError)):
        return ConnectionLostError
    if any(s in text for s in ("server closed the connection", "connection was closed",
                               "connection is closed", "terminating connection",
                               "connection already closed", "ssl syscall error")):
        return ConnectionLostError
    if any(s in text for s in ("connection refused", "could not connect", "timeout expired",
                               "could not translate host", "name or service not known",
                               "no route to host", "network is unreachable",
                               "the database system is starting up")):
        return DatabaseUnavailableError
    if isinstance(exc, (sa_exc.OperationalError, OSError)):
        return DatabaseUnavailableError
    if isinstance(exc, sa_exc.IntegrityError):
        return IntegrityError
    if isinstance(exc, sa_exc.DataError):
        return DataError
    if isinstance(exc, (sa_exc.ProgrammingError, sa_exc.ArgumentError,
                        sa_exc.InvalidRequestError)):
        return ProgrammingError
    return DatabaseError


def _raised_while_connecting(exc: BaseException) -> bool:
    """True when the traceback passes through the opening of a new connection."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "__connect" and "pool" in code.co_filename:
            return True  # SQLAlchemy's _ConnectionRecord.__connect
        if code.co_filename.endswith(("connect_utils.py",)) and "asyncpg" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _driver_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    raw = str(orig) if orig is not None and str(orig) else str(exc)
    # SQLAlchemy appends the SQL and a link; the first lines carry the driver's words.
    raw = raw.split("\n(Background on this error")[0]
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:500]


def translate_error(exc: BaseException, *, secrets: Iterable[str | None] = ()) -> LabkitError:
    """Return the labkit error for a driver or SQLAlchemy exception (not raised).

    ``LabkitError`` instances are returned as they are. The message starts with what it
    means and what to do, followed by the driver's own words, with passwords masked.
    """
    if isinstance(exc, LabkitError):
        return exc
    kind = _classify(exc)
    hint = _HINTS.get(kind, _HINTS[DatabaseError])
    detail = redact(_driver_message(exc), secrets)
    message = f"{hint} [{type(exc).__name__}: {detail}]" if detail else hint
    error = kind(message)
    error.__cause__ = exc
    return error


def is_database_error(exc: BaseException) -> bool:
    """Return True for labkit, SQLAlchemy, driver and network errors."""
    return isinstance(exc, (LabkitError, *_database_exceptions()))


def is_transient(exc: BaseException) -> bool:
    """Return True when retrying the unit of work may succeed."""
    return isinstance(translate_error(exc), TransientError)


@contextlib.contextmanager
def translating_errors(*, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Re-raise database errors inside the block as labkit errors (cause chained)."""
    try:
        yield
    except LabkitError:
        raise
    except _database_exceptions() as exc:
        raise translate_error(exc, secrets=secrets) from exc


@contextlib.asynccontextmanager
async def async_translating_errors(*, secrets: Iterable[str | None] = ()) -> AsyncIterator[None]:
    """Async twin of :func:`translating_errors`."""
    try:
        yield
    except LabkitError:
        raise
    except _database_exceptions() as exc:
        raise translate_error(exc, secrets=secrets) from exc


def _database_exceptions() -> tuple[type[BaseException], ...]:
    from sqlalchemy import exc as sa_exc

    types: list[type[BaseException]] = [sa_exc.SQLAlchemyError, OSError,
                                        asyncio.TimeoutError, EOFError]
    with contextlib.suppress(ImportError):
        import psycopg2

        types.append(psycopg2.Error)
    with contextlib.suppress(ImportError):
        import asyncpg

        types.append(asyncpg.PostgresError)
        types.append(asyncpg.InterfaceError)
    return tuple(types)
