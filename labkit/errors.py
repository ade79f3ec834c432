"""labkit's exceptions (the tree: docs/concepts/failures.md) and the translation of driver
errors into them: the class says what to do, ``sqlstate`` exactly what happened."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import traceback
from collections.abc import Iterable

from sqlalchemy import exc as sa_exc

__all__ = ["AuthenticationError", "CommitOutcomeUnknownError", "ConfigurationError",
           "ConnectionLostError", "DatabaseError", "DatabaseUnavailableError", "IntegrityError",
           "LabkitError", "PoolTimeoutError", "ProgrammingError", "QueryTimeoutError",
           "RetryExhaustedError", "SQLSTATES", "SerializationError", "TransientError",
           "is_database_error", "redact", "sqlstate_of", "translate_error"]


class LabkitError(Exception):
    """Base class of every error labkit raises."""


class ConfigurationError(LabkitError, ValueError):
    """The settings or the database URL are invalid."""


class DatabaseError(LabkitError):
    """The database failed an operation; ``sqlstate`` is the server's code, if it sent one."""

    def __init__(self, message: str = "", *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class TransientError(DatabaseError):
    """A failure that may pass: retry the whole unit of work, never one statement."""


class DatabaseUnavailableError(TransientError):
    """No connection could be opened (down, unreachable, starting up, no slot left)."""


class ConnectionLostError(TransientError):
    """An open connection broke: the server restarted, the backend was killed, the network."""


class PoolTimeoutError(TransientError):
    """Every pooled connection stayed checked out for longer than ``pool_timeout``."""


class QueryTimeoutError(TransientError):
    """A statement was stopped by a timeout: statement_timeout, lock_timeout or a deadline."""


class SerializationError(TransientError):
    """A serialization failure or a deadlock: the whole transaction must run again."""


class CommitOutcomeUnknownError(DatabaseError):
    """The answer to ``COMMIT`` was lost. Not transient: retry only ``idempotent=True`` work."""


class AuthenticationError(DatabaseError):
    """The server rejected the role, the password or this host (``pg_hba.conf``)."""


class IntegrityError(DatabaseError):
    """A constraint (unique, foreign key, not null, check) rejected the data."""


class ProgrammingError(DatabaseError):
    """The SQL, its data or the transaction's state is wrong; running it again cannot help."""


class RetryExhaustedError(DatabaseError):
    """A retry policy used up its attempts or its time budget; ``last_error`` says why."""

    def __init__(self, message: str, *, attempts: int, elapsed: float,
                 last_error: BaseException | None) -> None:
        super().__init__(message, sqlstate=getattr(last_error, "sqlstate", None))
        self.attempts, self.elapsed, self.last_error = attempts, elapsed, last_error


SQLSTATES: dict[str, type[DatabaseError]] = {code: kind for kind, codes in (  # exact, else class
    (DatabaseUnavailableError, "08001 08004 53300 57P03"),  # cannot connect, no slot, starting
    (ConnectionLostError, "08 25P03 25P04 57P01 57P02 57P05"),  # FATAL timeouts, shutdown, crash
    (CommitOutcomeUnknownError, "08007 40003"), (AuthenticationError, "28"),
    (DatabaseError, "08P01 53 55006 57"), (IntegrityError, "23 40002"),
    (SerializationError, "40 72"), (QueryTimeoutError, "55P03 57014"),  # lock, statement timeout
    (ProgrammingError, "0A 0B 0F 0L 0P 0Z 10 20 21 22 24 25 26 27 2B 2D 2F 34 38 39 3B 3D 3F 42"
                       " 44 54 55")) for code in codes.split()}

_HINTS: dict[type[DatabaseError] | str, str] = {
    DatabaseUnavailableError: "Could not connect to PostgreSQL: is it up at this host and port?",
    ConnectionLostError: "Connection lost (restart, network). Run the whole transaction again.",
    PoolTimeoutError: "No pooled connection came free in pool_timeout: release sessions sooner.",
    QueryTimeoutError: "The statement was stopped by a timeout.",
    SerializationError: "A concurrent transaction conflicted: run the whole transaction again.",
    CommitOutcomeUnknownError: "The answer to COMMIT was lost: stored or not, unknown.",
    AuthenticationError: "PostgreSQL rejected the user name or password in DATABASE_URL.",
    IntegrityError: "A constraint rejected the data (unique, foreign key, not null or check).",
    ProgrammingError: "The SQL or its data is wrong: syntax, no such table or column, a bad value.",
    DatabaseError: "The database reported an error.",
    "25006": "Read-only: this server is a replica (after a failover?). Connect to the primary.",
    "25P02": "An earlier statement failed: ROLLBACK, or put a savepoint (begin_nested) around it.",
    "28000": "No such role, or pg_hba.conf has no entry for this host, user and database.",
    "3D000": "The database named in DATABASE_URL does not exist on this server.",
    "40P01": "Deadlock: run the whole transaction again; take row locks in one consistent order.",
    "53300": "Server has no connection slot left: lower pool_size + max_overflow across processes.",
    "55P03": "A lock wait hit lock_timeout or NOWAIT: keep the transactions that hold locks short.",
    "57014": "The statement ran longer than statement_timeout (or was cancelled): make it faster.",
    "57P03": "PostgreSQL is starting up or shutting down; wait_for_database waits for it.",
}

_FATAL = tuple((re.compile(p, re.I), code) for p, code in (  # libpq's connect FATALs: text only
    (r'database ".*" does not exist', "3D000"),
    (r"too many clients already|remaining connection slots are reserved"
     r"|too many connections for (?:role|database)", "53300"),
    (r"password authentication failed|no password supplied", "28P01"),
    (r'role ".*" does not exist|pg_hba\.conf|(?:peer|ident) authentication failed', "28000"),
    (r"the database system is (?:starting up|shutting down|in recovery|not (?:yet )?accept)",
     "57P03"),
    (r"terminating connection due to administrator command", "57P01"),
    (r"terminating connection due to idle-in-transaction timeout", "25P03"),
    (r"terminating connection due to idle-session timeout", "57P05")))
_DISCONNECT = re.compile(
    r"server closed the connection|connection (?:was |is |already )?closed|terminating "
    r"connection|ssl syscall error|could not (?:receive|send) data|no connection to the "
    r"server|connection reset|broken pipe|lost synchronization", re.I)
_UNREACHABLE = re.compile(
    r"connection refused|could not connect|timeout expired|could not translate host|name "
    r"or service not known|no route to host|network is unreachable|name resolution", re.I)
_SECRETS = (  # user:secret@host (an unencoded '@' too), ?password=, password: ..., PASSWORD '..'
    re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<pw>[^\s'\"]*)"
               r"(?=@[^@\s'\"]*(?:[\s'\"]|$))", re.I),
    re.compile(r"(?P<head>[?&][\w.\-]*password=)(?P<pw>[^&#\s'\"]*)", re.I),
    re.compile(r"(?P<head>\bpassword\s+)(?P<pw>'(?:[^'\\]|\\.|'')*')", re.I),
    re.compile(r"(?P<head>(?<![\w?&])\w*password[\"']?\s*[:=]\s*)(?P<pw>'(?:[^'\\]|\\.|'')*'"
               r"|\"(?:[^\"\\]|\\.|\"\")*\"|\S+)", re.I))


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Return ``text`` with passwords masked as ``***``: in URLs, ``password=`` pairs and
    SQL's ``PASSWORD '...'``, and any known secret of 8+ characters standing alone."""
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: m.group(0) if m.group("pw") in (
            "PASSWORD", "***", "'***'", '"***"') else m.group("head") + "***", text)
    for secret in (s for s in secrets if s and len(s) >= 8):  # shorter ones would mangle words
        text = re.sub(r"(?<!\w)" + re.escape(secret) + r"(?!\w)", "***", text)
    return text


def is_database_error(exc: BaseException) -> bool:
    """True for SQLAlchemy's, the drivers' and labkit's errors, and for a bare
    ``OSError``/``TimeoutError``/``EOFError`` raised inside SQLAlchemy or a driver."""
    drivers = (getattr(sys.modules.get(module), name, None) for module, name in (
        ("psycopg2", "Error"), ("psycopg", "Error"), ("asyncpg", "PostgresError"),
        ("asyncpg", "InterfaceError"), ("asyncpg", "InternalClientError")))  # None: not imported
    known = isinstance(exc, (LabkitError, sa_exc.SQLAlchemyError, *filter(None, drivers)))
    if known or not isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, EOFError)):
        return known
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):  # nearest the raise
        top = (frame.f_globals.get("__name__") or "").partition(".")[0]
        if not (frame.f_code.co_filename.startswith("<frozen") or top in sys.stdlib_module_names):
            return top in ("sqlalchemy", "asyncpg", "psycopg2", "psycopg")  # past the stdlib
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, then what it wraps (``orig``, ``__cause__``), nearest first; 8 at most."""
    found = [exc]
    for current in found:  # grows while it is read: breadth first
        for e in (getattr(current, "orig", None), current.__cause__):
            if isinstance(e, BaseException) and len(found) < 8 and all(e is not f for f in found):
                found.append(e)
    return found


def _texts(exc: BaseException) -> list[str]:  # without StatementError copies: they quote SQL
    return [str(e) for e in _chain(exc) if not isinstance(e, sa_exc.StatementError)]


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE the server sent (``pgcode``/``sqlstate``), the innermost winning (asyncpg
    wraps a killed backend's 57P01 in 08003); else read from a FATAL that libpq gave as text."""
    codes = [getattr(e, "sqlstate", None) if isinstance(e, LabkitError) else
             getattr(e, "pgcode", None) or getattr(e, "sqlstate", None) for e in _chain(exc)]
    sent = [c.upper() for c in codes if isinstance(c, str) and len(c) == 5 and c.isalnum()]
    return sent[-1] if sent else next((code for text in _texts(exc) for pattern, code in _FATAL
                                       if pattern.search(text)), None)


def _classify(exc: BaseException) -> tuple[type[DatabaseError], str | None]:
    if isinstance(exc, sa_exc.TimeoutError) or any(  # SQLAlchemy's pool or psycopg_pool
            type(e).__name__ == "PoolTimeout" for e in _chain(exc)):
        return PoolTimeoutError, None
    chain, code = _chain(exc), sqlstate_of(exc)
    connecting = any(  # the traceback passes through the opening of a new connection
        (module.startswith("sqlalchemy.pool") and name == "__connect")
        or module == "asyncpg.connect_utils"
        or (module in ("asyncpg.connection", "psycopg2", "psycopg.connection",
                       "psycopg.connection_async") and name == "connect")
        for module, name in ((frame.f_globals.get("__name__") or "", frame.f_code.co_name)
                             for e in chain for frame, _ in traceback.walk_tb(e.__traceback__)))
    if code is not None:
        kind = SQLSTATES.get(code) or SQLSTATES.get(code[:2], DatabaseError)
        lost = kind is ConnectionLostError and connecting  # none was open to lose
        return (DatabaseUnavailableError if lost else kind), code
    asyncpg, text = sys.modules.get("asyncpg"), " ".join(_texts(exc))
    if asyncpg is not None and any(isinstance(e, asyncpg.exceptions.DataError) for e in chain):
        return ProgrammingError, None  # asyncpg refused a parameter before sending it
    if connecting or any(isinstance(e, (ConnectionRefusedError, socket.gaierror)) for e in chain):
        return DatabaseUnavailableError, None
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return ConnectionLostError, None
    if any(isinstance(e, (asyncio.TimeoutError, TimeoutError)) for e in chain):
        return QueryTimeoutError, None  # a driver-side timeout
    if any(isinstance(e, (ConnectionError, EOFError)) for e in chain) or _DISCONNECT.search(text):
        return ConnectionLostError, None
    if _UNREACHABLE.search(text):
        return DatabaseUnavailableError, None
    if isinstance(exc, OSError):
        return ConnectionLostError, None
    if isinstance(exc, sa_exc.IntegrityError):
        return IntegrityError, None
    if isinstance(exc, (sa_exc.DataError, sa_exc.ProgrammingError, sa_exc.InvalidRequestError)):
        return ProgrammingError, None
    return DatabaseError, None


def translate_error(exc: BaseException, *, secrets: Iterable[str | None] = ()) -> LabkitError:
    """The labkit error (returned, not raised) for ``exc``: meaning, advice, SQLSTATE and the
    driver's words, passwords masked; ``exc`` is its ``__cause__``. Labkit errors pass as is."""
    if isinstance(exc, LabkitError):
        return exc
    kind, code = _classify(exc)
    key = "28000" if code and code[:2] == "28" and code != "28P01" else code or ""
    hint = _HINTS.get(key) or _HINTS.get(kind) or _HINTS[DatabaseError]
    raw = str(getattr(exc, "orig", None) or "") or str(exc)
    raw = raw.split("\n(Background on this error")[0]
    detail = " ".join(line.strip() for line in raw.splitlines()[:3] if line.strip())[:500]
    message = hint + (f" (SQLSTATE {code})" if code else "") + (
        f" [{type(exc).__name__}: {detail}]" if detail else "")
    error = kind(redact(message, list(secrets)), sqlstate=code)
    error.__cause__ = exc
    return error
