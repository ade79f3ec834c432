"""labkit's exceptions, and the translation of driver errors into them.

```text
LabkitError
├── ConfigurationError            the settings or the URL are wrong: fix the configuration
└── DatabaseError                 the database failed an operation (sqlstate when sent)
    ├── TransientError            running the whole unit of work again may succeed
    │   ├── DatabaseUnavailableError   cannot connect: down, unreachable, starting up, full
    │   ├── ConnectionLostError        an open connection died: restart, kill, network
    │   ├── PoolTimeoutError           no pooled connection became free in pool_timeout
    │   ├── QueryTimeoutError          statement_timeout, lock_timeout or a client deadline
    │   └── SerializationError         serialization failure or deadlock: run it again
    ├── CommitOutcomeUnknownError      the answer to COMMIT was lost: stored or not, unknown
    ├── AuthenticationError            wrong user or password, or pg_hba.conf refused
    ├── IntegrityError                 a constraint rejected the data
    ├── ProgrammingError               the SQL, its data or the transaction state is wrong
    └── RetryExhaustedError            a retry policy ran out; last_error says why
```

One table (``SQLSTATES``) maps the server's SQLSTATE to a class for every driver; an
exact code wins over its two-character class. Without a SQLSTATE the class follows what
happened: a failure while opening a connection is ``DatabaseUnavailableError``, a
disconnect ``ConnectionLostError``, a driver-side timeout ``QueryTimeoutError``. Only
database errors are translated (``is_database_error``); the caller's own exceptions pass
through unchanged. Messages pass through ``redact``: no password ever leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Iterator

__all__ = [
    "AuthenticationError", "CommitOutcomeUnknownError", "ConfigurationError",
    "ConnectionLostError", "DatabaseError", "DatabaseUnavailableError", "IntegrityError",
    "LabkitError", "PoolTimeoutError", "ProgrammingError", "QueryTimeoutError",
    "RetryExhaustedError", "SQLSTATES", "SerializationError", "TransientError",
    "async_translating_errors", "is_database_error", "redact", "translate_error",
    "translating_errors",
]


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
    """The connection was lost while ``COMMIT`` was in flight: committed or not, unknown.

    Not transient: running the work again could store it twice. Retry only idempotent
    work, and say so: ``run_in_transaction(..., idempotent=True)``.
    """


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
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error


# --- the SQLSTATE table (PostgreSQL's errcodes appendix) -------------------------------

SQLSTATES: dict[str, type[DatabaseError]] = {
    "08": ConnectionLostError,           # connection exception
    "08001": DatabaseUnavailableError,   # could not establish the connection
    "08004": DatabaseUnavailableError,   # server rejected the connection
    "08007": CommitOutcomeUnknownError,  # transaction resolution unknown
    "08P01": DatabaseError,              # protocol violation
    "10": ProgrammingError, "22": ProgrammingError,  # data exceptions
    "23": IntegrityError, "40002": IntegrityError,   # constraint violations
    "25P03": ConnectionLostError,        # idle_in_transaction_session_timeout (FATAL)
    "25P04": ConnectionLostError,        # transaction_timeout (FATAL)
    "28": AuthenticationError,           # invalid authorization
    "40": SerializationError,            # 40001 serialization failure, 40P01 deadlock
    "40003": CommitOutcomeUnknownError,  # statement completion unknown
    "53": DatabaseError,                 # disk full, out of memory
    "53300": DatabaseUnavailableError,   # too many connections
    "55": ProgrammingError, "55006": DatabaseError,
    "55P03": QueryTimeoutError,          # lock not available (lock_timeout, NOWAIT)
    "57": DatabaseError,                 # operator intervention
    "57014": QueryTimeoutError,          # query canceled (statement_timeout)
    "57P01": ConnectionLostError, "57P02": ConnectionLostError,  # shutdown, crash
    "57P03": DatabaseUnavailableError,   # cannot connect now (starting up)
    "57P05": ConnectionLostError,        # idle_session_timeout
    "72": SerializationError,            # snapshot too old
    **{cls: ProgrammingError for cls in (
        "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "24", "25", "26", "27", "2B",
        "2D", "2F", "34", "38", "39", "3B", "3D", "3F", "42", "44", "54")},
}

_HINTS: dict[type[DatabaseError] | str, str] = {
    DatabaseUnavailableError: "Could not connect to PostgreSQL: is the server running and "
    "reachable at this host and port?",
    ConnectionLostError: "The connection to PostgreSQL was lost (restart, killed backend or "
    "network). Run the whole transaction again; pre-ping catches connections that died idle.",
    PoolTimeoutError: "No pooled connection became free within pool_timeout: every one is "
    "checked out. Release sessions sooner, or size the pool (docs: engine and pool).",
    QueryTimeoutError: "The statement was stopped by a timeout.",
    SerializationError: "The transaction conflicted with a concurrent one. Run the whole "
    "transaction again.",
    CommitOutcomeUnknownError: "The connection was lost while COMMIT was in flight: the "
    "transaction may or may not be stored. Check before running it again.",
    AuthenticationError: "PostgreSQL rejected the user name or password in DATABASE_URL.",
    IntegrityError: "A constraint rejected the data (unique, foreign key, not null or check).",
    ProgrammingError: "The SQL or its data is wrong: syntax, a missing table or column, a "
    "value invalid for its type.",
    DatabaseError: "The database reported an error.",
    "08P01": "The client and the server disagreed on the wire protocol (a proxy or pooler in "
    "between?). Retrying will not help.",
    "25006": "The transaction is read-only: this server is a replica (after a failover?) or "
    "default_transaction_read_only is on. Connect to the primary.",
    "25P02": "An earlier statement of this transaction failed, so PostgreSQL ignores the rest "
    "until ROLLBACK. Roll back, or put a savepoint (begin_nested) around the statement "
    "that may fail.",
    "28000": "PostgreSQL rejected the role or this host: the user does not exist, or "
    "pg_hba.conf has no entry for this host, user and database.",
    "3D000": "The database named in DATABASE_URL does not exist on this server.",
    "40P01": "Deadlock: two transactions waited for each other's locks. Run the whole "
    "transaction again; take row locks in one consistent order to avoid it.",
    "42501": "Permission denied: the role lacks a privilege on this object. GRANT it.",
    "53100": "The server's disk is full. Retrying will not help; read the server's log.",
    "53200": "The server ran out of memory. Lower work_mem or the connection count.",
    "53300": "The server has no connection slot left (max_connections or a connection "
    "limit): lower pool_size + max_overflow across processes, or put a pooler in front.",
    "55P03": "Another transaction holds a lock this statement needed, and lock_timeout or "
    "NOWAIT stopped the wait. Keep the transactions that hold locks short.",
    "57014": "The statement ran longer than statement_timeout (or was cancelled). Make it "
    "faster, or raise the timeout for it alone: SET LOCAL statement_timeout.",
    "57P03": "PostgreSQL is starting up or shutting down; wait_for_database waits for it.",
}

# libpq reports a FATAL at connect as text only (psycopg2 has no pgcode then).
_FATAL_SQLSTATES = tuple((re.compile(pattern, re.I), code) for pattern, code in (
    (r'database ".*" does not exist', "3D000"),
    (r"too many clients already|remaining connection slots are reserved"
     r"|too many connections for (?:role|database)", "53300"),
    (r"password authentication failed|no password supplied", "28P01"),
    (r'role ".*" does not exist|pg_hba\.conf|(?:peer|ident) authentication failed', "28000"),
    (r"the database system is (?:starting up|shutting down|in recovery|not (?:yet )?accept)",
     "57P03"),
    (r"terminating connection due to administrator command", "57P01"),
    (r"terminating connection due to idle-in-transaction timeout", "25P03"),
    (r"terminating connection due to idle-session timeout", "57P05"),
))
_DISCONNECT = re.compile(
    r"server closed the connection|connection (?:was |is |already )?closed|terminating "
    r"connection|ssl syscall error|could not (?:receive|send) data|no connection to the "
    r"server|connection reset|broken pipe|lost synchronization", re.I)
_UNREACHABLE = re.compile(
    r"connection refused|could not connect|timeout expired|could not translate host|name "
    r"or service not known|no route to host|network is unreachable|name resolution", re.I)


# --- secrets -----------------------------------------------------------------------------

_URL_PASSWORD = re.compile(  # scheme://user:secret@host, also with an unencoded '@'
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<pw>[^\s'\"]*)(?=@[^@\s'\"]*(?:[\s'\"]|$))",
    re.I)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&][\w.\-]*password=)(?P<pw>[^&#\s'\"]*)", re.I)
_QUOTED = r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\""
_KV_PASSWORD = re.compile(  # password=..., PGPASSWORD: '...'
    r"(?P<head>(?<![\w?&])\w*password[\"']?\s*[:=]\s*)(?P<pw>" + _QUOTED + r"|\S+)", re.I)
_SQL_PASSWORD = re.compile(r"(?P<head>\bpassword\s+)(?P<pw>'(?:[^'\\]|\\.|'')*')", re.I)


def _mask(match: re.Match[str]) -> str:
    if match.group("pw") in ("PASSWORD", "***", "'***'", '"***"'):
        return match.group(0)
    return match.group("head") + "***"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Return ``text`` with passwords masked as ``***``.

    Masks by structure: a URL's ``user:secret@``, ``?password=``, ``password=...`` and
    ``password: ...`` pairs, SQL's ``PASSWORD '...'``. A known secret of 8 or more
    characters is also masked where it stands alone (shorter ones would mangle words).
    """
    for pattern in (_URL_PASSWORD, _QUERY_PASSWORD, _SQL_PASSWORD, _KV_PASSWORD):
        text = pattern.sub(_mask, text)
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = re.sub(r"(?<!\w)" + re.escape(secret) + r"(?!\w)", "***", text)
    return text


# --- which exceptions are ours to classify --------------------------------------------------

# A bare OSError/TimeoutError/EOFError is a database failure only when these packages
# raised it (asyncpg lets a refused connect escape unwrapped); else it is the caller's.
_DATABASE_PACKAGES = frozenset({"sqlalchemy", "asyncpg", "psycopg2", "psycopg"})
_BARE = (OSError, TimeoutError, asyncio.TimeoutError, EOFError)


def _driver_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy import exc as sa_exc

    types: list[type[BaseException]] = [LabkitError, sa_exc.SQLAlchemyError]
    for module, names in (("psycopg2", ("Error",)), ("psycopg", ("Error",)),
                          ("asyncpg", ("PostgresError", "InterfaceError",
                                       "InternalClientError"))):
        package = sys.modules.get(module)  # not imported: cannot have raised
        types += [getattr(package, name) for name in names if hasattr(package, name)]
    return tuple(types)


def _raiser_module(exc: BaseException) -> str:
    """The module of the frame nearest the raise that is not the standard library's."""
    tb, modules = exc.__traceback__, []
    while tb is not None:
        modules.append((tb.tb_frame.f_globals.get("__name__") or "",
                        tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    for module, filename in reversed(modules):
        if not (filename.startswith("<frozen")
                or module.partition(".")[0] in sys.stdlib_module_names):
            return module
    return ""


def is_database_error(exc: BaseException) -> bool:
    """Return True for SQLAlchemy's, the drivers' and labkit's errors, and for a bare
    ``OSError``/``TimeoutError``/``EOFError`` raised inside SQLAlchemy or a driver."""
    if isinstance(exc, _driver_errors()):
        return True
    return (isinstance(exc, _BARE)
            and _raiser_module(exc).partition(".")[0] in _DATABASE_PACKAGES)


# --- classification ------------------------------------------------------------------------

def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps (``orig``, ``__cause__``), nearest first."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 8:
        current = todo.pop(0)
        if id(current) not in seen:
            seen.add(id(current))
            yield current
            todo += [e for e in (getattr(current, "orig", None), current.__cause__)
                     if isinstance(e, BaseException)]


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE the server sent (psycopg2 ``pgcode``, asyncpg and psycopg ``sqlstate``).

    The innermost wins: asyncpg reports a backend killed mid-query as 08003 caused by the
    server's 57P01, and the server's code says why. A FATAL at connect that libpq gave as
    text only is read from its (English) message.
    """
    found = None
    for candidate in _chain(exc):
        if isinstance(candidate, LabkitError):
            found = getattr(candidate, "sqlstate", None) or found
            continue
        code = getattr(candidate, "pgcode", None) or getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and len(code) == 5 and code.isalnum():
            found = code.upper()
    if found is None:
        for text in _driver_texts(exc):
            for pattern, code in _FATAL_SQLSTATES:
                if pattern.search(text):
                    return code
    return found


def _driver_texts(exc: BaseException) -> list[str]:
    from sqlalchemy import exc as sa_exc  # its StatementError copies quote the SQL

    return [str(e) for e in _chain(exc) if not isinstance(e, sa_exc.StatementError)]


def _while_connecting(exc: BaseException) -> bool:
    """True when the traceback passes through the opening of a new connection."""
    for candidate in _chain(exc):
        tb = candidate.__traceback__
        while tb is not None:
            module = tb.tb_frame.f_globals.get("__name__") or ""
            name = tb.tb_frame.f_code.co_name
            if ((module.startswith("sqlalchemy.pool") and name == "__connect")
                    or module == "asyncpg.connect_utils"
                    or (module in ("asyncpg.connection", "psycopg2") and name == "connect")):
                return True
            tb = tb.tb_next
    return False


def _classify(exc: BaseException) -> tuple[type[DatabaseError], str | None]:
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.TimeoutError):
        return PoolTimeoutError, None
    connecting = _while_connecting(exc)
    code = sqlstate_of(exc)
    if code is not None:
        kind = SQLSTATES.get(code) or SQLSTATES.get(code[:2], DatabaseError)
        if kind is ConnectionLostError and connecting:
            kind = DatabaseUnavailableError  # there was no open connection to lose
        return kind, code
    chain = list(_chain(exc))
    text = " ".join(_driver_texts(exc))
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and any(isinstance(e, asyncpg.exceptions.DataError) for e in chain):
        return ProgrammingError, None  # asyncpg refused a parameter before sending it
    if connecting or any(isinstance(e, (ConnectionRefusedError, socket.gaierror))
                         for e in chain):
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
    for sa_type, kind in ((sa_exc.IntegrityError, IntegrityError),
                          (sa_exc.DataError, ProgrammingError),
                          (sa_exc.ProgrammingError, ProgrammingError),
                          (sa_exc.InvalidRequestError, ProgrammingError)):
        if isinstance(exc, sa_type):
            return kind, None
    return DatabaseError, None


def translate_error(exc: BaseException, *, secrets: Iterable[str | None] = ()) -> LabkitError:
    """Return the labkit error for a driver or SQLAlchemy exception (not raised).

    A ``LabkitError`` is returned as it is. The message says what the error means and
    what to do, then the SQLSTATE, then the driver's words in brackets, passwords masked.
    The original is chained as ``__cause__``; the SQLSTATE is kept in ``sqlstate``.
    """
    if isinstance(exc, LabkitError):
        return exc
    kind, code = _classify(exc)
    hint = _HINTS.get(code or "") or _HINTS.get(kind) or _HINTS[DatabaseError]
    if code and code[:2] == "28" and code != "28P01":
        hint = _HINTS["28000"]
    orig = getattr(exc, "orig", None)
    raw = (str(orig) if orig is not None and str(orig) else str(exc))
    raw = raw.split("\n(Background on this error")[0]
    detail = " ".join(line.strip() for line in raw.splitlines()[:3] if line.strip())[:500]
    message = hint + (f" (SQLSTATE {code})" if code else "")
    if detail:
        message += f" [{type(exc).__name__}: {detail}]"
    error = kind(redact(message, list(secrets)), sqlstate=code)
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def translating_errors(*, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Re-raise database errors inside the block as labkit errors; others pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LabkitError) or not is_database_error(exc):
            raise
        raise translate_error(exc, secrets=secrets) from exc


@contextlib.asynccontextmanager
async def async_translating_errors(*, secrets: Iterable[str | None] = ()
                                   ) -> AsyncIterator[None]:
    """Async twin of ``translating_errors``."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LabkitError) or not is_database_error(exc):
            raise
        raise translate_error(exc, secrets=secrets) from exc
