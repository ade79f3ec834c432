"""labkit's exceptions, and the translation of driver errors into them.

The tree:

```text
LabkitError
├── ConfigurationError          settings or URL are wrong; fix the configuration
└── DatabaseError               the database failed an operation
    ├── TransientError          worth retrying the whole unit of work
    │   ├── DatabaseUnavailableError   cannot connect: refused, unreachable, starting
    │   ├── ConnectionLostError        an open connection died (restart, kill, network)
    │   ├── PoolTimeoutError           no pooled connection free within pool_timeout
    │   ├── QueryTimeoutError          statement or command timeout
    │   ├── TooManyConnectionsError    no connection slot left on the server
    │   ├── SerializationError         serialization failure or deadlock; retry
    │   ├── LockNotAvailableError      lock_timeout or NOWAIT: another transaction holds it
    │   └── HealthCheckTimeoutError    the health probe did not answer in time
    ├── CommitOutcomeUnknownError  the connection died while COMMIT was in flight
    ├── AuthenticationError     wrong user or password (retrying cannot help)
    ├── IntegrityError          a constraint rejected the data
    ├── DataError               a value is invalid for its type
    ├── ProgrammingError        the SQL is wrong: syntax, missing table, bad column
    ├── ServerError             the server failed on its side: disk full, out of memory, I/O
    └── RetryExhaustedError     retries used up their budget; last_error says why
```

Only database errors are translated (``is_database_error``): labkit's, SQLAlchemy's,
psycopg2's and asyncpg's own exceptions, and a bare ``OSError``, ``TimeoutError`` or
``EOFError`` only when it was raised by SQLAlchemy or a driver (asyncpg lets a refused
or timed-out connect escape as the builtin exception, and SQLAlchemy does not wrap it).
Anything else, such as a ``FileNotFoundError`` from the caller's own code, is not ours
to classify: it propagates unchanged and is never retried.

``translate_error`` classifies by SQLSTATE first, through one table for both drivers
(PostgreSQL's errcodes appendix); an exact code wins over its class (first two
characters):

| SQLSTATE | condition | labkit error |
|---|---|---|
| 08000 08003 08006, rest of class 08 | connection lost | `ConnectionLostError` (1) |
| 08001 08004 | could not connect | `DatabaseUnavailableError` |
| 08007 | resolution unknown | `CommitOutcomeUnknownError` |
| 08P01 | protocol violation | `DatabaseError` |
| 22, 10 | data exception | `DataError` |
| 23, 40002 | constraint violation | `IntegrityError` |
| 25P03 25P04 | idle/transaction timeout | `ConnectionLostError` |
| rest of 25 (25006: read-only) | transaction state | `ProgrammingError` (2) |
| 28 | role, password, hba | `AuthenticationError` |
| 3D000 | no such database | `ProgrammingError` (3) |
| 0A 0B 0F 0L 0P 0Z 20 21 24 26 27 | wrong SQL, schema or privileges | `ProgrammingError` |
| 2B 2D 2F 34 38 39 3B 3F 42 44 54 | wrong SQL, schema or privileges | `ProgrammingError` |
| 55P03 | lock not available | `LockNotAvailableError` |
| 55006 | object in use | `DatabaseError` |
| rest of 55 | prerequisite state | `ProgrammingError` |
| 40001 40P01, rest of 40, 72 | serialization, deadlock | `SerializationError` |
| 40003 | completion unknown | `CommitOutcomeUnknownError` |
| 53300 | too many connections | `TooManyConnectionsError` |
| 53100 53200 53400, rest of 53 | disk full, out of memory | `ServerError` |
| 57014 | query canceled | `QueryTimeoutError` |
| 57P01 57P02 57P05 | shutdown, idle session | `ConnectionLostError` (1) |
| 57P03 | cannot connect now | `DatabaseUnavailableError` |
| 57P04, rest of 57 | database dropped | `DatabaseError` |
| 58, XX, F0 | system, internal error | `ServerError` |
| 09, HV, P0, anything else | trigger, FDW, RAISE | `DatabaseError` |

(1) ``DatabaseUnavailableError`` when raised while opening a connection: there was no
open connection to lose. (2) 25006 happens on a read replica, e.g. after a failover;
the hint says so. (3) The hint names the database from the URL.

psycopg2 has no SQLSTATE for an error raised while connecting (libpq reports the
server's FATAL message as text), so the SQLSTATE is read from that message
(``database "x" does not exist`` is 3D000, ``too many clients already``, ``remaining
connection slots are reserved`` and ``too many connections for role`` are 53300,
``password authentication failed`` is 28P01, ``role "x" does not exist`` is 28000,
``the database system is starting up`` is 57P03) and goes through the same table.
This needs the server's messages in English (``lc_messages``). Without any SQLSTATE,
an error raised while opening a connection is ``DatabaseUnavailableError``, a
disconnect of an open connection (SQLAlchemy's ``connection_invalidated``, EOF, reset)
is ``ConnectionLostError`` and a driver-side timeout on an open connection (asyncpg's
``command_timeout``) is ``QueryTimeoutError``.

Every message starts with what the error means and what to do, then the SQLSTATE,
then the driver's own words in brackets, and passes through ``redact``, so a password
never leaks into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from types import FrameType

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
    """The database failed an operation.

    ``sqlstate`` is the server's five-character error code when there was one (for
    example ``"55P03"``), set by ``translate_error``; ``None`` otherwise.
    """

    sqlstate: str | None = None


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
    """The server refused a connection: ``max_connections`` or a connection limit is reached."""


class SerializationError(TransientError):
    """A serialization failure or deadlock: the transaction must be run again."""


class HealthCheckTimeoutError(TransientError):
    """The health probe did not answer within its timeout."""


class LockNotAvailableError(TransientError):
    """Another transaction holds a lock this one needs (past ``lock_timeout``, or ``NOWAIT``)."""


class CommitOutcomeUnknownError(DatabaseError):
    """The connection was lost while ``COMMIT`` was in flight: the outcome is unknown.

    The server may have committed the transaction and lost only its answer, or not. It
    is not a ``TransientError``: running the work again could store it twice.
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

# The password of a URL's userinfo. Greedy up to the last '@' before the host, so an
# unencoded '@' in a password is masked whole.
_URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<pw>[^\s'\"]*)(?=@[^@\s'\"]*(?:[\s'\"]|$))",
    re.I)
# A password given as a URL query parameter (libpq and SQLAlchemy accept ?password=).
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&][\w.\-]*password=)(?P<pw>[^&#\s'\"]*)", re.I)
# A quoted value: backslash escapes (libpq conninfo) or doubled quotes (SQL).
_QUOTED = r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\""
# password=..., password: ..., 'password': '...', PGPASSWORD=..., DB_PASSWORD: ...;
# not right after '?' or '&' (a query parameter, above).
_KV_PASSWORD = re.compile(
    r"(?P<head>(?<![\w?&])\w*password[\"']?\s*[:=]\s*)(?P<pw>" + _QUOTED + r"|\S+)", re.I)
# SQL: CREATE/ALTER ROLE ... PASSWORD 'secret'.
_SQL_PASSWORD = re.compile(r"(?P<head>\bpassword\s+)(?P<pw>'(?:[^'\\]|\\.|'')*')", re.I)
# Below this length a secret is masked only where it sits in a recognised structure.
_MIN_BARE_SECRET = 8


def _mask(match: re.Match[str]) -> str:
    pw = match.group("pw")
    if pw in ("PASSWORD", "***", "'***'", '"***"'):  # labkit's own placeholders
        return match.group(0)
    return match.group("head") + "***"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Return ``text`` with passwords masked as ``***``, by structure.

    Masks the password of a URL's userinfo (``scheme://user:secret@host``, also with an
    unencoded ``@`` in the secret), a ``?password=`` or ``&password=`` query parameter,
    ``password=...`` and ``password: ...`` pairs (quoted or not, with ``'it''s'`` or
    ``'it\\'s'`` escapes, and keys that end in ``password`` such as ``PGPASSWORD``), and
    the quoted literal of SQL's ``PASSWORD '...'``. ``PASSWORD`` itself, the placeholder
    in labkit's hints, is left alone.

    A given secret is masked elsewhere in the text only when it is at least 8
    characters long and stands as a whole token (not inside a word). Neither libpq nor
    asyncpg nor SQLAlchemy ever puts the password into an error message outside those
    structures, so the secrets are only a second line of defence (a password echoed in
    someone's SQL, say). Blind replacement of a short secret would do harm: the
    password ``p`` would turn ``OperationalError`` into ``O***erationalError``, which
    mangles the message and, by the gaps it leaves, reveals the password.

    Args:
        text: The message to clean.
        secrets: Known passwords; ``None`` and short entries are ignored outside the
            recognised structures.

    Returns:
        The text with every recognised password replaced by ``***``.

    Example:
        ```python
        >>> redact("postgresql://app:S3cr@t@db/x?password=hunter2")
        'postgresql://app:***@db/x?password=***'
        ```
    """
    text = _URL_PASSWORD.sub(_mask, text)
    text = _QUERY_PASSWORD.sub(_mask, text)
    text = _SQL_PASSWORD.sub(_mask, text)
    text = _KV_PASSWORD.sub(_mask, text)
    for secret in secrets:
        if secret and len(secret) >= _MIN_BARE_SECRET:
            text = re.sub(r"(?<!\w)" + re.escape(secret) + r"(?!\w)", "***", text)
    return text


# --- which exceptions are database errors --------------------------------------------

# Packages whose code talks to PostgreSQL. A bare OSError/TimeoutError/EOFError raised
# there is a database failure; raised anywhere else, it is the caller's own.
_DATABASE_PACKAGES = frozenset({"sqlalchemy", "asyncpg", "psycopg2"})
# labkit's own database plumbing (bounded checkouts, probes), never a caller's code.
_LABKIT_DATABASE_MODULES = frozenset({"labkit.engine", "labkit.session", "labkit.health",
                                      "labkit.deadline"})
_BARE_TYPES: tuple[type[BaseException], ...] = (OSError, TimeoutError, asyncio.TimeoutError,
                                               EOFError)


def _frames(exc: BaseException) -> list[FrameType]:
    """The frames of ``exc``'s traceback, from where it was caught to where it was raised."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _module(frame: FrameType) -> str:
    name = frame.f_globals.get("__name__")
    return name if isinstance(name, str) else ""


def _is_stdlib(frame: FrameType) -> bool:
    if frame.f_code.co_filename.startswith("<frozen"):
        return True
    return _module(frame).partition(".")[0] in sys.stdlib_module_names


def _raised_by_database_code(exc: BaseException) -> bool:
    """True when the code that raised ``exc`` belongs to SQLAlchemy or a driver.

    Looks at the frame nearest to the raise that is not the standard library's (asyncio
    and socket raise on a driver's behalf). Deciding by that one frame, rather than by
    any frame on the way, keeps the caller's own exception its own even when SQLAlchemy
    called the caller's code (an event listener, ``AsyncSession.run_sync``).
    """
    for frame in reversed(_frames(exc)):
        if _is_stdlib(frame):
            continue
        module = _module(frame)
        return (module.partition(".")[0] in _DATABASE_PACKAGES
                or module in _LABKIT_DATABASE_MODULES)
    return False


def _driver_exceptions() -> tuple[type[BaseException], ...]:
    from sqlalchemy import exc as sa_exc

    types: list[type[BaseException]] = [LabkitError, sa_exc.SQLAlchemyError]
    with contextlib.suppress(ImportError):
        import psycopg2  # type: ignore[import-untyped]

        types.append(psycopg2.Error)
    with contextlib.suppress(ImportError):
        import asyncpg  # type: ignore[import-untyped]
        from asyncpg import exceptions as asyncpg_exc  # type: ignore[import-untyped]

        types += [asyncpg.PostgresError, asyncpg_exc.InterfaceError,
                  asyncpg_exc.InternalClientError]
    return tuple(types)


def is_database_error(exc: BaseException) -> bool:
    """Return True when ``exc`` is a database failure that labkit may classify.

    True for labkit's, SQLAlchemy's, psycopg2's and asyncpg's exceptions, and for a
    bare ``OSError``, ``TimeoutError`` or ``EOFError`` raised by SQLAlchemy or a driver
    (asyncpg's refused or timed-out connect arrives that way, unwrapped). The same
    exception types raised by the caller's own code (a missing file, the caller's own
    timeout) are not database errors: they propagate unchanged and are never retried.
    """
    if isinstance(exc, _driver_exceptions()):
        return True
    return isinstance(exc, _BARE_TYPES) and _raised_by_database_code(exc)


# --- classification ---------------------------------------------------------------

# PostgreSQL's errcodes appendix: an exact SQLSTATE first, then its class.
_SQLSTATE_EXACT: dict[str, type[DatabaseError]] = {
    "08000": ConnectionLostError,         # connection_exception
    "08003": ConnectionLostError,         # connection_does_not_exist
    "08006": ConnectionLostError,         # connection_failure
    "08001": DatabaseUnavailableError,    # sqlclient_unable_to_establish_sqlconnection
    "08004": DatabaseUnavailableError,    # sqlserver_rejected_establishment_of_sqlconnection
    "08007": CommitOutcomeUnknownError,   # transaction_resolution_unknown
    "08P01": DatabaseError,               # protocol_violation
    "25P03": ConnectionLostError,         # idle_in_transaction_session_timeout (FATAL)
    "25P04": ConnectionLostError,         # transaction_timeout (FATAL, PostgreSQL 17+)
    "3D000": ProgrammingError,            # invalid_catalog_name: no such database
    "40001": SerializationError,          # serialization_failure
    "40P01": SerializationError,          # deadlock_detected
    "40002": IntegrityError,              # transaction_integrity_constraint_violation
    "40003": CommitOutcomeUnknownError,   # statement_completion_unknown
    "53300": TooManyConnectionsError,     # too_many_connections
    "55P03": LockNotAvailableError,       # lock_not_available
    "55006": DatabaseError,               # object_in_use
    "57014": QueryTimeoutError,           # query_canceled (statement_timeout)
    "57P01": ConnectionLostError,         # admin_shutdown
    "57P02": ConnectionLostError,         # crash_shutdown
    "57P03": DatabaseUnavailableError,    # cannot_connect_now
    "57P04": DatabaseError,               # database_dropped
    "57P05": ConnectionLostError,         # idle_session_timeout
}
_SQLSTATE_CLASS: dict[str, type[DatabaseError]] = {
    "08": ConnectionLostError,            # connection exception
    "10": DataError,                      # XQuery error
    "22": DataError,                      # data exception
    "23": IntegrityError,                 # integrity constraint violation
    "28": AuthenticationError,            # invalid authorization specification
    "40": SerializationError,             # transaction rollback
    "53": ServerError,                    # insufficient resources
    "55": ProgrammingError,               # object not in prerequisite state
    "57": DatabaseError,                  # operator intervention
    "58": ServerError,                    # system error (outside PostgreSQL)
    "72": SerializationError,             # snapshot too old (PostgreSQL 16 and older)
    "F0": ServerError,                    # configuration file error
    "XX": ServerError,                    # internal error, data or index corrupted
    **{cls: ProgrammingError for cls in (
        "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "24", "25", "26", "27", "2B",
        "2D", "2F", "34", "38", "39", "3B", "3D", "3F", "42", "44", "54")},
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
    TooManyConnectionsError: "The server has no connection slot left for this connection "
    "(max_connections, or a role's or database's CONNECTION LIMIT). Lower pool_size + "
    "max_overflow across your processes, or put a pooler in front.",
    SerializationError: "The transaction conflicted with a concurrent one (serialization "
    "failure or deadlock). Run the whole transaction again.",
    LockNotAvailableError: "Another transaction holds a lock this statement needed, and "
    "NOWAIT or lock_timeout stopped the wait. Retry later, and keep the transactions that "
    "hold locks short.",
    CommitOutcomeUnknownError: "The connection was lost while COMMIT was in flight: the "
    "transaction may or may not be stored. Check before running it again; retry "
    "automatically only work made idempotent (an idempotency key, ON CONFLICT DO NOTHING).",
    ServerError: "The server failed on its side (disk full, out of memory, an I/O or "
    "internal error). Retrying will not help until that is fixed: read the server's log.",
    AuthenticationError: "PostgreSQL rejected the user name or password. Check the "
    "credentials in DATABASE_URL.",
    IntegrityError: "A constraint rejected the data (unique, foreign key, not null or check).",
    DataError: "A value is invalid for its column type or operation.",
    ProgrammingError: "The SQL is wrong: syntax, a missing table or column, or wrong "
    "parameters.",
    DatabaseError: "The database reported an error.",
}

# Where the SQLSTATE says more than its labkit class.
_SQLSTATE_HINTS: dict[str, str] = {
    "08P01": "The client and the server disagreed on the wire protocol (a proxy or pooler "
    "in between, or a driver bug). Retrying will not help.",
    "25006": "The transaction is read-only: this server is a read replica (a hot standby, "
    "for example after a failover), or default_transaction_read_only is on. Connect to "
    "the primary (target_session_attrs=read-write).",
    "25P02": "An earlier statement of this transaction failed, so PostgreSQL ignores the "
    "rest until ROLLBACK. Roll back (session_scope does) and look for the first error.",
    "28000": "PostgreSQL rejected the role or the connection: the user in DATABASE_URL does "
    "not exist, or pg_hba.conf has no entry for this host, user and database.",
    "40P01": "Deadlock: two transactions waited for each other's locks and PostgreSQL "
    "aborted this one. Run the whole transaction again; take row locks in one consistent "
    "order to avoid it.",
    "42501": "Permission denied: the role in DATABASE_URL lacks a privilege on this object "
    "or database. GRANT it, or connect as a role that has it.",
    "42P01": "The SQL is wrong: a table or view it names does not exist (a typo, another "
    "schema than search_path, or a migration not applied).",
    "53100": "The server's disk is full: writes fail until space is freed or the volume "
    "grows. Retrying will not help; read the server's log.",
    "53200": "The server ran out of memory (or of shared memory for locks: "
    "max_locks_per_transaction). Lower work_mem or the number of connections, or give "
    "the server more memory.",
    "57014": "The statement ran longer than its timeout (statement_timeout) or was "
    "cancelled on request, and was stopped. Make it faster, or raise the timeout for "
    "that statement only (SET LOCAL statement_timeout).",
    "57P03": "PostgreSQL is starting up, shutting down or in recovery and accepts no "
    "connections yet. wait_for_database retries until it does.",
    "57P04": "The database was dropped while this connection used it. Check that "
    "DATABASE_URL names the database you mean.",
    "58P01": "The server could not find a file the statement asked for (undefined_file): "
    "a path in the SQL or in the server's configuration is wrong.",
    "P0001": "A function or trigger raised an exception (RAISE EXCEPTION); its message "
    "says why.",
}

# libpq's FATAL messages at connect carry no SQLSTATE through psycopg2: read it from
# the text (English server messages), then go through the same table.
_FATAL_SQLSTATES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(r"\bFATAL:\s+(?:" + pattern + ")", re.I), code) for pattern, code in (
        (r'database ".*" does not exist', "3D000"),
        (r"sorry, too many clients already|remaining connection slots are reserved"
         r"|too many connections for (?:role|database)", "53300"),
        (r"password authentication failed", "28P01"),
        (r'role ".*" does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects'
         r"|(?:peer|ident) authentication failed", "28000"),
        (r"the database system is (?:starting up|shutting down|in recovery mode"
         r"|not yet accepting connections|not accepting connections)", "57P03"),
        (r"permission denied for database", "42501"),
        (r"terminating connection due to administrator command", "57P01"),
        (r"terminating connection due to idle-in-transaction timeout", "25P03"),
        (r"terminating connection due to idle-session timeout", "57P05"),
        (r"terminating connection due to transaction timeout", "25P04"),
    ))
# libpq's own words when the server asked for a password and none was given.
_NO_PASSWORD = re.compile(r"no password supplied", re.I)
_DATABASE_NAME = re.compile(r'database "(?P<name>[^"]*)" does not exist')

_DISCONNECT_WORDS = (
    "server closed the connection", "connection was closed", "connection is closed",
    "connection already closed", "terminating connection", "ssl syscall error",
    "ssl connection has been closed", "could not receive data from server",
    "could not send data to server", "no connection to the server", "connection reset",
    "broken pipe", "lost synchronization with server",
)
_UNREACHABLE_WORDS = (
    "connection refused", "could not connect", "timeout expired",
    "could not translate host", "name or service not known", "no route to host",
    "network is unreachable", "temporary failure in name resolution",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps (``orig``, ``__cause__``), nearest first."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 8:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (getattr(current, "orig", None), current.__cause__):
            if isinstance(inner, BaseException):
                todo.append(inner)


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE the server sent: psycopg2's ``pgcode``, asyncpg's ``sqlstate``.

    The innermost one wins: asyncpg reports a backend killed mid-query as
    ``ConnectionDoesNotExistError`` (08003) caused by the server's ``AdminShutdownError``
    (57P01), and the server's code says why.
    """
    found = None
    for candidate in _chain(exc):
        code = getattr(candidate, "pgcode", None) or getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and len(code) == 5 and code.isalnum():
            found = code.upper()
    return found


def _driver_texts(exc: BaseException) -> list[str]:
    """The messages along the chain, without SQLAlchemy's copies (they quote the SQL)."""
    from sqlalchemy import exc as sa_exc

    return [str(e) for e in _chain(exc) if not isinstance(e, sa_exc.StatementError)]


def _sqlstate_from_message(exc: BaseException) -> str | None:
    """The SQLSTATE of a FATAL message that libpq reported as text only."""
    for text in _driver_texts(exc):
        for pattern, code in _FATAL_SQLSTATES:
            if pattern.search(text):
                return code
        if _NO_PASSWORD.search(text):
            return "28P01"
    return None


def _kind_for_sqlstate(code: str) -> type[DatabaseError]:
    return _SQLSTATE_EXACT.get(code) or _SQLSTATE_CLASS.get(code[:2], DatabaseError)


def _raised_while_connecting(exc: BaseException) -> bool:
    """True when the traceback passes through the opening of a new connection."""
    for candidate in _chain(exc):
        for frame in _frames(candidate):
            module, name = _module(frame), frame.f_code.co_name
            if module.startswith("sqlalchemy.pool") and name == "__connect":
                return True  # SQLAlchemy's _ConnectionRecord.__connect
            if module == "asyncpg.connect_utils":
                return True
            if module in ("asyncpg.connection", "psycopg2") and name == "connect":
                return True
    return False


def _classify(exc: BaseException) -> tuple[type[DatabaseError], str | None]:
    """Return the labkit class for ``exc`` and the SQLSTATE it was decided by."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.TimeoutError):
        return PoolTimeoutError, None
    connecting = _raised_while_connecting(exc)
    code = _sqlstate(exc) or _sqlstate_from_message(exc)
    if code is not None:
        kind = _kind_for_sqlstate(code)
        if kind is ConnectionLostError and connecting:
            kind = DatabaseUnavailableError  # there was no open connection to lose
        return kind, code
    return _classify_without_sqlstate(exc, connecting), None


def _classify_without_sqlstate(exc: BaseException, connecting: bool) -> type[DatabaseError]:
    from sqlalchemy import exc as sa_exc

    chain = list(_chain(exc))
    text = " ".join(_driver_texts(exc)).lower()
    with contextlib.suppress(ImportError):
        from asyncpg import exceptions as asyncpg_exc

        if any(isinstance(e, asyncpg_exc.DataError) for e in chain):
            return DataError  # asyncpg refused a parameter before sending it
    if connecting:
        return DatabaseUnavailableError
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return ConnectionLostError
    if any(isinstance(e, (ConnectionRefusedError, socket.gaierror)) for e in chain):
        return DatabaseUnavailableError
    if any(isinstance(e, (asyncio.TimeoutError, TimeoutError, socket.timeout)) for e in chain):
        return QueryTimeoutError  # a driver-side timeout (asyncpg's command_timeout)
    if any(isinstance(e, (ConnectionError, EOFError)) for e in chain):
        return ConnectionLostError
    if any(words in text for words in _DISCONNECT_WORDS):
        return ConnectionLostError
    if any(words in text for words in _UNREACHABLE_WORDS):
        return DatabaseUnavailableError
    if isinstance(exc, OSError):
        return ConnectionLostError  # the socket of an open connection failed
    if isinstance(exc, sa_exc.IntegrityError):
        return IntegrityError
    if isinstance(exc, sa_exc.DataError):
        return DataError
    if isinstance(exc, (sa_exc.ProgrammingError, sa_exc.ArgumentError,
                        sa_exc.InvalidRequestError, sa_exc.CompileError)):
        return ProgrammingError
    return DatabaseError


def _hint(kind: type[DatabaseError], code: str | None, detail: str) -> str:
    if code == "3D000":
        found = _DATABASE_NAME.search(detail)
        name = f'"{found.group("name")}"' if found else "it names"
        create = f"CREATE DATABASE {name}" if found else "CREATE DATABASE"
        return (f"The database named in DATABASE_URL ({name}) does not exist on this "
                f"server. Fix the database name in the URL, or create it ({create}).")
    if code is not None and code in _SQLSTATE_HINTS:
        return _SQLSTATE_HINTS[code]
    if code is not None and code[:2] == "28" and code != "28P01":
        return _SQLSTATE_HINTS["28000"]
    return _HINTS.get(kind, _HINTS[DatabaseError])


def _driver_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    raw = str(orig) if orig is not None and str(orig) else str(exc)
    # SQLAlchemy appends the SQL and a link; the first lines carry the driver's words.
    raw = raw.split("\n(Background on this error")[0]
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:500]


def translate_error(exc: BaseException, *, secrets: Iterable[str | None] = ()) -> LabkitError:
    """Return the labkit error for a driver or SQLAlchemy exception (not raised).

    ``LabkitError`` instances are returned as they are. The class comes from the
    SQLSTATE table (see the module docstring), else from what the exception is (a
    refused connect, a disconnect, a timeout). The message starts with what it means
    and what to do, then the SQLSTATE, then the driver's own words in brackets, with
    passwords masked (``redact``). The original is chained as ``__cause__`` and the
    SQLSTATE kept in ``sqlstate``.

    Args:
        exc: The exception to translate; call ``is_database_error`` first to leave the
            caller's own exceptions alone.
        secrets: Known passwords, passed to ``redact``.

    Returns:
        The labkit error, ready to ``raise ... from exc``.
    """
    if isinstance(exc, LabkitError):
        return exc
    kind, code = _classify(exc)
    secrets = list(secrets)
    detail = redact(_driver_message(exc), secrets)
    hint = redact(_hint(kind, code, detail), secrets)
    if code is not None:
        hint = f"{hint} (SQLSTATE {code})"
    message = f"{hint} [{type(exc).__name__}: {detail}]" if detail else hint
    error = kind(message)
    error.sqlstate = code
    error.__cause__ = exc
    return error


def is_transient(exc: BaseException) -> bool:
    """Return True when ``exc`` is a database error and retrying the unit of work may succeed."""
    return is_database_error(exc) and isinstance(translate_error(exc), TransientError)


@contextlib.contextmanager
def translating_errors(*, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Re-raise database errors inside the block as labkit errors (cause chained).

    Any other exception, including the caller's own ``OSError`` or ``TimeoutError``,
    passes through unchanged (see ``is_database_error``).
    """
    try:
        yield
    except LabkitError:
        raise
    except Exception as exc:
        if not is_database_error(exc):
            raise
        raise translate_error(exc, secrets=secrets) from exc


@contextlib.asynccontextmanager
async def async_translating_errors(*, secrets: Iterable[str | None] = ()) -> AsyncIterator[None]:
    """Async twin of ``translating_errors``."""
    try:
        yield
    except LabkitError:
        raise
    except Exception as exc:
        if not is_database_error(exc):
            raise
        raise translate_error(exc, secrets=secrets) from exc
