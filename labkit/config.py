"""Settings: where the database is and how the pool behaves, read in one place.

Nothing here reads the environment at import. ``Settings.from_env`` reads a mapping
(``os.environ`` by default) once; tests pass a plain dict. It reads a ``.env`` file only
when given one (``env_file=".env"``); the command line (``python -m labkit health``)
passes the ``.env`` of the current directory.

One ``DATABASE_URL`` serves both drivers: ``to_sync_url`` and ``to_async_url`` translate
``sslmode`` / ``ssl`` between libpq's and asyncpg's spelling, and the engine factories
turn ``options=-c name=value`` into asyncpg ``server_settings``.

Environment variables (all optional except ``DATABASE_URL`` in production):

| variable | meaning | unit |
|---|---|---|
| ``DATABASE_URL`` | ``postgresql://user:password@host:port/db`` | |
| ``ENVIRONMENT`` | ``development``, ``production`` or ``test`` | |
| ``DB_POOL_SIZE`` | connections kept open in the pool | |
| ``DB_MAX_OVERFLOW`` | extra connections allowed under burst | |
| ``DB_POOL_TIMEOUT`` | wait for a free connection before failing | seconds |
| ``DB_POOL_RECYCLE`` | replace connections older than this (-1: never) | seconds |
| ``DB_POOL_PRE_PING`` | test each connection at checkout | true/false |
| ``DB_ECHO`` | log every SQL statement | true/false |
| ``DB_CONNECT_TIMEOUT`` | give up opening a connection after | seconds |
| ``DB_STATEMENT_TIMEOUT`` | server cancels statements running longer | milliseconds |
| ``DB_COMMAND_TIMEOUT`` | client gives up on an unanswered statement | seconds |
| ``DB_TCP_KEEPALIVE_IDLE`` | silence before the first TCP keepalive probe | seconds |
| ``DB_TCP_KEEPALIVE_INTERVAL`` | between two unanswered probes | seconds |
| ``DB_TCP_KEEPALIVE_COUNT`` | unanswered probes before the connection is dropped | |
| ``DB_TCP_USER_TIMEOUT`` | drop the connection when sent data stays unacknowledged | seconds |
| ``DB_BEHIND_POOLER`` | the URL is a transaction-mode pooler (PgBouncer) | true/false |

In production the four TCP settings default to ``PRODUCTION_TCP`` (keepalive after 60 s
of silence, every 10 s, 3 probes; ``tcp_user_timeout`` 30 s): idle pooled connections
then keep a load balancer's or NAT's flow alive, and a connection whose network died is
found within about 70 s instead of the kernel's two hours and more (notebook 07).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import numbers
import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from labkit.errors import ConfigurationError, redact

__all__ = [
    "DEVELOPMENT_POOL",
    "PRODUCTION_POOL",
    "PRODUCTION_TCP",
    "TEST_POOL",
    "Environment",
    "PoolProfile",
    "Settings",
    "build_url",
    "mask_url",
    "parse_url",
    "pool_profile_for",
    "read_env_file",
    "to_async_url",
    "to_sync_url",
    "url_as_text",
]

logger = logging.getLogger("labkit")

SYNC_DRIVER = "psycopg2"
ASYNC_DRIVER = "asyncpg"
_KNOWN_DRIVERS = {"psycopg2", "asyncpg", "psycopg", "psycopg_async", "pg8000"}
_POSTGRES_NAMES = {"postgresql", "postgres"}

# The largest waits the layers below accept: a lock wait in Python's threading (the pool
# waits on one), libpq's integer connect_timeout, PostgreSQL's integer statement_timeout.
MAX_POOL_TIMEOUT_S = threading.TIMEOUT_MAX
MAX_CONNECT_TIMEOUT_S = 2_147_483_647
MAX_STATEMENT_TIMEOUT_MS = 2_147_483_647
# The kernel's limits for TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
MAX_KEEPALIVE_S = 32_767
MAX_KEEPALIVE_COUNT = 127

PRODUCTION_TCP: dict[str, float] = {
    "tcp_keepalive_idle": 60,
    "tcp_keepalive_interval": 10,
    "tcp_keepalive_count": 3,
    "tcp_user_timeout": 30.0,
}
"""The TCP settings ``Settings.from_env`` uses in production unless the environment sets them.

A probe after 60 s of silence is sent well within the idle timeouts of cloud load
balancers and NAT gateways (minutes), so the flow of an idle pooled connection is never
forgotten; a dead one is found after about 70 s (``tcp_user_timeout`` ends the probing
at the first unanswered probe past 30 s).
"""


def _check_int(name: str, value: Any) -> None:
    # numbers.Integral, not int: numpy's integers (notebooks sweep sizes) are fine too.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}")


def _check_seconds(name: str, value: Any, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 < seconds <= maximum:
        raise ConfigurationError(
            f"{name} must be > 0 and <= {maximum:.0f} seconds, got {value}")


class Environment(str, enum.Enum):
    """Where the code runs; picks the pool profile and the production guard."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"
    TEST = "test"


@dataclass(frozen=True)
class PoolProfile:
    """Pool settings handed to SQLAlchemy's ``create_engine``.

    ``poolclass`` is ``"queue"`` (QueuePool / AsyncAdaptedQueuePool), ``"null"``
    (a new connection per checkout) or ``"static"`` (one shared connection).
    Times are in seconds; ``pool_recycle=-1`` never recycles. Every value is checked
    here: ``nan``, ``inf`` or a wait longer than Python's threads can wait
    (``MAX_POOL_TIMEOUT_S``) is a ``ConfigurationError`` naming the field.
    """

    poolclass: Literal["queue", "null", "static"] = "queue"
    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout: float = 30.0
    pool_recycle: int = -1
    pool_pre_ping: bool = True
    pool_use_lifo: bool = False

    def __post_init__(self) -> None:
        if self.poolclass not in ("queue", "null", "static"):
            raise ConfigurationError(
                f"poolclass must be 'queue', 'null' or 'static', not {self.poolclass!r}")
        for name in ("pool_size", "max_overflow", "pool_recycle"):
            _check_int(name, getattr(self, name))
        if self.pool_size < 0:
            raise ConfigurationError(f"pool_size must be >= 0, got {self.pool_size}")
        if self.poolclass == "queue" and self.pool_size == 0 and self.max_overflow == 0:
            raise ConfigurationError("pool_size and max_overflow cannot both be 0")
        if self.max_overflow < -1:
            raise ConfigurationError(
                f"max_overflow must be >= -1 (-1: unlimited), got {self.max_overflow}")
        _check_seconds("pool_timeout", self.pool_timeout, MAX_POOL_TIMEOUT_S)
        if self.pool_recycle < -1 or self.pool_recycle == 0:
            raise ConfigurationError(
                f"pool_recycle must be > 0 seconds or -1 (never), got {self.pool_recycle}")

    @property
    def max_connections(self) -> int | None:
        """Most connections this pool opens at once (``None``: unbounded)."""
        if self.poolclass == "static":
            return 1
        if self.poolclass == "null" or self.max_overflow == -1:
            return None
        return self.pool_size + self.max_overflow

    def replace(self, **changes: Any) -> PoolProfile:
        """Return a copy with some values changed (validated again)."""
        return dataclasses.replace(self, **changes)


DEVELOPMENT_POOL = PoolProfile(pool_size=5, max_overflow=10, pool_timeout=30.0,
                               pool_pre_ping=True)
PRODUCTION_POOL = PoolProfile(pool_size=20, max_overflow=40, pool_timeout=30.0,
                              pool_recycle=3600, pool_pre_ping=True)
# Tests open and close engines often and run against a server that restarts: no
# connection outlives its checkout, so nothing stale is ever reused.
TEST_POOL = PoolProfile(poolclass="null", pool_size=0, max_overflow=0, pool_pre_ping=False)

_PROFILES = {
    Environment.DEVELOPMENT: DEVELOPMENT_POOL,
    Environment.PRODUCTION: PRODUCTION_POOL,
    Environment.TEST: TEST_POOL,
}


def pool_profile_for(environment: Environment | str) -> PoolProfile:
    """Return the named preset for an environment."""
    return _PROFILES[Environment(environment)]


# --- URLs -------------------------------------------------------------------------

# libpq's sslmode values; asyncpg takes the same names as its ``ssl`` argument.
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# libpq URL parameters that asyncpg has no argument for, and what to do instead. Left in
# the URL they would reach ``asyncpg.connect()`` as unexpected keyword arguments.
_ENV_INSTEAD = ("set {var} in the environment instead: libpq (psycopg2) and asyncpg both "
                "read it")
_NOT_FOR_ASYNCPG: dict[str, str] = {
    "sslrootcert": _ENV_INSTEAD.format(var="PGSSLROOTCERT"),
    "sslcert": _ENV_INSTEAD.format(var="PGSSLCERT"),
    "sslkey": _ENV_INSTEAD.format(var="PGSSLKEY"),
    "sslcrl": _ENV_INSTEAD.format(var="PGSSLCRL"),
    "sslpassword": "pass an ssl.SSLContext to create_async_engine(connect_args={'ssl': ...})",
    "connect_timeout": "set DB_CONNECT_TIMEOUT (Settings.connect_timeout): labkit hands it "
                       "to both drivers",
    "application_name": "set Settings.application_name: labkit hands it to both drivers",
}
_LIBPQ_ONLY = ("sslcrldir", "sslsni", "sslcompression", "sslcertmode", "sslnegotiation",
               "ssl_min_protocol_version", "ssl_max_protocol_version", "channel_binding",
               "gssencmode", "require_auth", "requirepeer", "keepalives", "keepalives_idle",
               "keepalives_interval", "keepalives_count", "tcp_user_timeout", "hostaddr",
               "client_encoding", "fallback_application_name", "load_balance_hosts",
               "replication")


def parse_url(url: str | URL) -> URL:
    """Parse a database URL, raising ``ConfigurationError`` when it is malformed.

    Besides the syntax, it refuses and repairs what would later leak a password:

    - An unencoded ``@`` in the password (``postgresql://app:S3cr@t@db/app``) would make
      the rest of the password part of the host name, shown in "could not translate
      host name" errors. It is refused with a hint to percent-encode it (``%40``);
      ``build_url`` does that.
    - A password in the query string (``postgresql://app@db/app?password=...``, which
      libpq accepts) is moved into the URL's password field, where every rendering of
      the URL masks it. Giving a password in both places is refused.

    Heroku-style ``postgres://`` becomes ``postgresql://``. No error message shows the
    password.

    Args:
        url: The URL as text, or a SQLAlchemy ``URL``.

    Returns:
        The parsed ``URL``.

    Raises:
        ConfigurationError: The URL is empty, malformed, or holds its password in a way
            that cannot be used safely.
    """
    if isinstance(url, URL):
        parsed = url
    elif not isinstance(url, str) or not url.strip():
        raise ConfigurationError("the database URL is empty; expected "
                                 "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    else:
        try:
            parsed = make_url(url.strip())
        except (ArgumentError, ValueError):
            raise ConfigurationError(
                "malformed database URL (not shown: it may hold a password): expected "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE; a password holding any of "
                "@ : / ? # must be percent-encoded (labkit.build_url does it)") from None
    if parsed.host is not None and "@" in parsed.host:
        # make_url ends the password at the first '@': the rest of it is now in the host.
        raise ConfigurationError(
            "malformed database URL (not shown: it holds a password): it has more than "
            "one '@'; an '@' in the password must be percent-encoded as %40, as in "
            "postgresql://USER:x%40y@HOST:5432/DATABASE (labkit.build_url does it)")
    if "password" in parsed.query:
        in_query = parsed.query["password"]
        if not isinstance(in_query, str):
            raise ConfigurationError(
                f"the database URL {mask_url(parsed)} gives ?password= more than once")
        if parsed.password is not None:
            raise ConfigurationError(
                f"the database URL {mask_url(parsed)} gives a password twice, as "
                "USER:PASSWORD@ and as ?password=; keep one")
        parsed = parsed.difference_update_query(["password"]).set(password=in_query)
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigurationError(
            f"port {parsed.port} in URL {mask_url(parsed)} is out of range (1-65535)")
    backend = parsed.get_backend_name()
    if backend == "postgres":
        # Heroku-style 'postgres://' is not a SQLAlchemy dialect name.
        parsed = parsed.set(drivername="postgresql" + parsed.drivername[len("postgres"):])
    return parsed


def _with_driver(url: URL, driver: str) -> URL:
    backend = url.get_backend_name()
    if backend not in _POSTGRES_NAMES:
        raise ConfigurationError(
            f"unsupported database {backend!r} in URL {mask_url(url)}: labkit speaks "
            "PostgreSQL (postgresql://...) and SQLite for tests")
    if "+" in url.drivername and url.get_driver_name() not in _KNOWN_DRIVERS:
        raise ConfigurationError(
            f"unknown PostgreSQL driver {url.get_driver_name()!r} in URL {mask_url(url)}; "
            "use postgresql://, postgresql+psycopg2:// or postgresql+asyncpg://")
    return url.set(drivername=f"postgresql+{driver}")


def _query_value(url: URL, name: str) -> str | None:
    value = url.query.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ConfigurationError(f"URL parameter {name!r} is given more than once in {mask_url(url)}")


def _ssl_mode(url: URL) -> str | None:
    """The TLS mode the URL asks for, whichever driver's spelling it uses."""
    modes = {name: _query_value(url, name) for name in ("sslmode", "ssl")}
    for name, mode in modes.items():
        if mode is not None and mode not in _SSL_MODES:
            raise ConfigurationError(
                f"URL parameter {name}={mode!r} is not an SSL mode; use one of "
                f"{', '.join(_SSL_MODES)}")
    if None not in modes.values() and modes["sslmode"] != modes["ssl"]:
        raise ConfigurationError(
            f"the URL asks for sslmode={modes['sslmode']} and ssl={modes['ssl']}; keep one")
    return modes["sslmode"] or modes["ssl"]


def _split_options(options: str) -> list[str]:
    # PostgreSQL splits 'options' at whitespace; a backslash keeps the next character
    # (pg_split_opts), so '\ ' is a space inside a value.
    words: list[str] = []
    current: list[str] = []
    in_word = escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            in_word = escaped = True
        elif char.isspace():
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
    if in_word:
        words.append("".join(current))
    return words


def _server_settings_from_options(options: str) -> dict[str, str]:
    """Turn libpq ``options`` (``-c name=value`` ...) into asyncpg ``server_settings``.

    PostgreSQL reads ``-c name=value``, ``-cname=value`` and ``--name=value``, with
    dashes in the name standing for underscores. Other command-line flags have no
    ``server_settings`` form and are refused.
    """
    words = _split_options(options)
    settings: dict[str, str] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c":
            index += 1
            pair = words[index] if index < len(words) else ""
        elif word.startswith(("--", "-c")):
            pair = word[2:]
        else:
            raise ConfigurationError(
                f"URL parameter 'options' holds {word[:2]!r}: only '-c name=value' "
                "settings can be given to asyncpg (as server_settings)")
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigurationError(
                "URL parameter 'options' holds a '-c' without name=value")
        settings[name.strip().replace("-", "_")] = value
        index += 1
    return settings


def to_sync_url(url: str | URL) -> URL:
    """Return the URL for the sync engine: ``postgresql+psycopg2://``.

    libpq, under psycopg2, spells the TLS mode ``sslmode``: an asyncpg-style
    ``?ssl=require`` is renamed to ``?sslmode=require``. Every other parameter
    (``options``, ``sslrootcert``, ...) is libpq's own and stays as it is. SQLite URLs
    pass through (``sqlite://``).

    Raises:
        ConfigurationError: The URL is malformed, not PostgreSQL, names an unknown driver,
            or its ``sslmode`` / ``ssl`` is not one of libpq's six modes.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite")
    parsed = _with_driver(parsed, SYNC_DRIVER)
    mode = _ssl_mode(parsed)
    if mode is not None:
        parsed = parsed.difference_update_query(["ssl"]).update_query_dict({"sslmode": mode})
    return parsed


def to_async_url(url: str | URL) -> URL:
    """Return the URL for the async engine: ``postgresql+asyncpg://``.

    SQLAlchemy hands every URL parameter to ``asyncpg.connect()`` as a keyword argument,
    and asyncpg does not speak libpq's names, so one ``DATABASE_URL`` serves both
    drivers only once translated:

    - ``sslmode=MODE`` becomes ``ssl=MODE`` (asyncpg takes libpq's six mode names).
    - ``options`` stays in the URL: asyncpg has no such argument, and labkit's
      ``create_async_engine`` turns its ``-c name=value`` settings into asyncpg's
      ``server_settings`` (other flags are refused here).
    - libpq-only parameters, such as ``sslrootcert``, ``sslcert`` and ``sslkey``
      (asyncpg reads those only from ``PGSSLROOTCERT``, ``PGSSLCERT``, ``PGSSLKEY``),
      ``connect_timeout`` or ``application_name``, are refused with what to use instead.

    SQLite URLs become ``sqlite+aiosqlite://``.

    Raises:
        ConfigurationError: The URL is malformed, not PostgreSQL, names an unknown driver,
            holds an SSL mode that is not one of the six, or a parameter asyncpg cannot
            take.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    parsed = _with_driver(parsed, ASYNC_DRIVER)
    for name in parsed.query:
        if name in _NOT_FOR_ASYNCPG or name in _LIBPQ_ONLY:
            hint = _NOT_FOR_ASYNCPG.get(name, "remove it from the URL")
            raise ConfigurationError(
                f"URL parameter {name!r} is libpq's (psycopg2) and asyncpg has no such "
                f"argument: {hint}")
    options = _query_value(parsed, "options")
    if options is not None:
        _server_settings_from_options(options)
    mode = _ssl_mode(parsed)
    if mode is not None:
        parsed = parsed.difference_update_query(["sslmode"]).update_query_dict({"ssl": mode})
    return parsed


def build_url(*, user: str, password: str | None, host: str, port: int = 5432,
              database: str, driver: str = SYNC_DRIVER) -> URL:
    """Build a PostgreSQL URL from parts; the password may hold any character.

    Examples:
        >>> build_url(user="app", password="p@ss:w/rd", host="db", database="app")
        postgresql+psycopg2://app:***@db:5432/app
    """
    if not 0 < int(port) < 65536:
        raise ConfigurationError(f"port must be between 1 and 65535, got {port}")
    return URL.create(f"postgresql+{driver}", username=user, password=password,
                      host=host, port=int(port), database=database)


def mask_url(url: str | URL) -> str:
    """Return the URL as text with its password replaced by ``***``.

    Masks the password wherever the URL holds one: ``USER:PASSWORD@`` and a
    ``?password=`` parameter (shown as ``USER:***@``). When an unencoded ``@`` has put
    the end of the password into the host, that part is left out too. Text that does not
    parse as a URL is masked by pattern (``redact``).
    """
    if not isinstance(url, URL):
        try:
            url = make_url(url.strip())
        except (ArgumentError, ValueError, AttributeError):
            return redact(str(url))
    if "password" in url.query:
        url = url.difference_update_query(["password"]).set(password=url.password or "***")
    if url.host is not None and "@" in url.host:
        url = url.set(password=url.password or "***", host=url.host.rsplit("@", 1)[1])
    return url.render_as_string(hide_password=True)


def url_as_text(url: URL) -> str:
    """Return the URL as text *with* its password, percent-encoded (for DATABASE_URL)."""
    return url.render_as_string(hide_password=False)


# --- .env files -------------------------------------------------------------------------

def read_env_file(path: str | Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines from a ``.env`` file (``#`` comments, optional quotes).

    Logs a warning when the file is readable or writable by group or others: it usually
    holds the database password, so it should be ``chmod 600``. A missing file reads as
    empty.

    Raises:
        ConfigurationError: The file cannot be read, or a line is not ``KEY=VALUE``.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is accessible to other users (mode %o); it may hold a password: "
                       "chmod 600 %s", path, stat.S_IMODE(mode), path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigurationError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


# --- settings -------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be true or false, got {raw!r}")


def _parse_number(name: str, raw: str, kind: type[int] | type[float]) -> Any:
    try:
        value = kind(raw.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        # float() reads 'nan' and 'inf'; no setting means either.
        raise ConfigurationError(
            f"{name} must be {'an integer' if kind is int else 'a finite number'}, "
            f"got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything labkit needs to open a database: URL, environment and pool profile.

    ``url`` is a SQLAlchemy ``URL`` (parsed by ``parse_url``, so a ``?password=`` has
    moved into its password field); its ``str`` and this object's ``repr`` mask the
    password. ``connect_timeout`` is in seconds, ``statement_timeout_ms`` in
    milliseconds (``None``: the server's default; it is added to any ``options`` in the
    URL and wins over a ``statement_timeout`` there). ``application_name`` is what the
    server shows in ``pg_stat_activity``. Values are checked at construction: ``nan``,
    ``inf`` or a negative timeout is a ``ConfigurationError`` naming the field.

    ``command_timeout`` (seconds) is the *client's* deadline for one statement, the only
    one that holds when the server or the network stops answering (``statement_timeout``
    is enforced by the server, which then enforces nothing). ``None`` derives it:
    ``statement_timeout`` plus ``connect_timeout``, so the server gets to cancel first;
    no statement timeout, no client deadline. ``0`` turns it off. See
    ``effective_command_timeout``.

    TCP settings, for both drivers (``None``: the operating system's default, which on
    Linux means no keepalive probe before two hours of silence, and up to about 15
    minutes of retransmissions before unacknowledged data gives up):

    - ``tcp_keepalive_idle`` (whole seconds): silence before the first keepalive probe.
      Below a load balancer's or NAT's idle timeout, the probes keep the flow alive;
      after a partition, unanswered probes drop the connection, which ends a statement
      waiting for an answer that will never come.
    - ``tcp_keepalive_interval`` (whole seconds) and ``tcp_keepalive_count``: the probes
      after the first, and how many go unanswered before the connection is dropped.
    - ``tcp_user_timeout`` (seconds): drop the connection when data it sent stays
      unacknowledged that long (a statement sent into a partition, a pre-ping on a flow a
      firewall forgot). It does not end a wait for an answer to a statement already
      acknowledged: only keepalives or a ``command_timeout`` do.

    psycopg2 gets them as libpq's ``keepalives*`` and ``tcp_user_timeout`` parameters;
    asyncpg, which has none, gets them as socket options right after it connects.

    ``behind_pooler``: the URL points at a pooler in *transaction* mode (PgBouncer's
    ``pool_mode = transaction``), where consecutive transactions of one client
    connection may run on different server connections. labkit then sends no session
    state at connect time: no ``options`` / ``statement_timeout`` startup parameter
    (PgBouncer refuses unknown startup parameters: "unsupported startup parameter"),
    so ``statement_timeout_ms`` is applied per transaction with ``SET LOCAL`` at the
    start of each one; asyncpg's statement caches are off and every prepared statement
    gets a unique name (no ``prepared statement "__asyncpg_stmt_N__" already
    exists``). ``application_name`` is still sent (PgBouncer accepts it). A URL with
    ``options`` is then a ``ConfigurationError``: put such settings on the role
    (``ALTER ROLE ... SET``) instead. psycopg2 needs nothing else.
    """

    url: URL
    environment: Environment = Environment.DEVELOPMENT
    pool: PoolProfile = DEVELOPMENT_POOL
    echo: bool = False
    connect_timeout: float = 5.0
    statement_timeout_ms: int | None = None
    application_name: str = "labkit"
    command_timeout: float | None = None
    tcp_keepalive_idle: int | None = None
    tcp_keepalive_interval: int | None = None
    tcp_keepalive_count: int | None = None
    tcp_user_timeout: float | None = None
    behind_pooler: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", parse_url(self.url))
        if not isinstance(self.behind_pooler, bool):
            raise ConfigurationError(
                f"behind_pooler must be True or False, got {self.behind_pooler!r}")
        if self.behind_pooler and _query_value(self.url, "options") is not None:
            raise ConfigurationError(
                "behind_pooler: the URL's 'options' would be sent at connect time, which "
                "a transaction-mode pooler refuses or applies to a server connection "
                "other clients share; set them on the role (ALTER ROLE ... SET) instead")
        object.__setattr__(self, "environment", Environment(self.environment))
        _check_seconds("connect_timeout", self.connect_timeout, MAX_CONNECT_TIMEOUT_S)
        if self.statement_timeout_ms is not None:
            _check_int("statement_timeout_ms", self.statement_timeout_ms)
            if not 0 <= self.statement_timeout_ms <= MAX_STATEMENT_TIMEOUT_MS:
                raise ConfigurationError(
                    f"statement_timeout_ms must be >= 0 and <= {MAX_STATEMENT_TIMEOUT_MS}, "
                    f"got {self.statement_timeout_ms}")
        if self.command_timeout is not None and self.command_timeout != 0:
            _check_seconds("command_timeout", self.command_timeout, MAX_POOL_TIMEOUT_S)
        for name, maximum in (("tcp_keepalive_idle", MAX_KEEPALIVE_S),
                              ("tcp_keepalive_interval", MAX_KEEPALIVE_S),
                              ("tcp_keepalive_count", MAX_KEEPALIVE_COUNT)):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if not 1 <= value <= maximum:
                    raise ConfigurationError(
                        f"{name} must be >= 1 and <= {maximum}, got {value}")
        if self.tcp_user_timeout is not None:
            _check_seconds("tcp_user_timeout", self.tcp_user_timeout,
                           MAX_STATEMENT_TIMEOUT_MS / 1000)

    @property
    def tcp_keepalive(self) -> bool:
        """True when any keepalive setting is given (the probes are then tuned)."""
        return any(value is not None for value in (
            self.tcp_keepalive_idle, self.tcp_keepalive_interval, self.tcp_keepalive_count))

    @property
    def effective_command_timeout(self) -> float | None:
        """The client-side statement deadline in seconds, or ``None`` for none."""
        if self.command_timeout is not None:
            return float(self.command_timeout) or None
        if self.statement_timeout_ms:
            return self.statement_timeout_ms / 1000.0 + self.connect_timeout
        return None

    def __repr__(self) -> str:
        return (f"Settings(url={mask_url(self.url)!r}, environment={self.environment.value!r}, "
                f"pool={self.pool!r}, echo={self.echo}, connect_timeout={self.connect_timeout}, "
                f"statement_timeout_ms={self.statement_timeout_ms}, "
                f"application_name={self.application_name!r}, "
                f"command_timeout={self.command_timeout}, "
                f"tcp_keepalive_idle={self.tcp_keepalive_idle}, "
                f"tcp_keepalive_interval={self.tcp_keepalive_interval}, "
                f"tcp_keepalive_count={self.tcp_keepalive_count}, "
                f"tcp_user_timeout={self.tcp_user_timeout}, "
                f"behind_pooler={self.behind_pooler})")

    __str__ = __repr__

    @property
    def password(self) -> str | None:
        """The password in the URL (for redacting it from messages)."""
        return self.url.password  # type: ignore[return-value]

    @property
    def sync_url(self) -> URL:
        """The URL for psycopg2 (``to_sync_url``)."""
        return to_sync_url(self.url)

    @property
    def async_url(self) -> URL:
        """The URL for asyncpg (``to_async_url``)."""
        return to_async_url(self.url)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some values changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 env_file: str | Path | None = None,
                 default_url: str | URL | Callable[[], str | URL] | None = None,
                 ) -> Settings:
        """Read settings from ``env`` (``os.environ`` when ``None``).

        A ``.env`` file is read only when named: ``env_file`` (e.g. ``".env"``) supplies
        values the environment does not set; the environment wins.

        ``default_url`` is used when ``DATABASE_URL`` is not set, except in production,
        where a missing ``DATABASE_URL`` is a ``ConfigurationError``: a service must never
        fall back to a default database. It may be a function, called only when the
        default is needed (e.g. one that starts a local server), so that production
        never even looks for one.

        Raises:
            ConfigurationError: ``DATABASE_URL`` is missing in production (or with no
                default), or a value is malformed; the message names the variable.
        """
        env = os.environ if env is None else env
        if env_file is not None:
            env = {**read_env_file(env_file), **env}
        raw_env = env.get("ENVIRONMENT", "development").strip().lower() or "development"
        try:
            environment = Environment(raw_env)
        except ValueError:
            raise ConfigurationError(
                f"ENVIRONMENT must be development, production or test, got {raw_env!r}"
            ) from None
        raw_url = env.get("DATABASE_URL", "").strip()
        if not raw_url:
            if environment is Environment.PRODUCTION:
                raise ConfigurationError(
                    "DATABASE_URL is not set and ENVIRONMENT=production: refusing to guess "
                    "a database in production. Set DATABASE_URL=postgresql://user:password"
                    "@host:5432/database")
            if default_url is None:
                raise ConfigurationError(
                    "DATABASE_URL is not set. Set it, or start the local server with "
                    "`python -m labkit db up` and use labkit.lab.database_url()")
            url = parse_url(default_url() if callable(default_url) else default_url)
        else:
            url = parse_url(raw_url)

        pool = pool_profile_for(environment)
        changes: dict[str, Any] = {}
        for var, field, kind in (("DB_POOL_SIZE", "pool_size", int),
                                 ("DB_MAX_OVERFLOW", "max_overflow", int),
                                 ("DB_POOL_TIMEOUT", "pool_timeout", float),
                                 ("DB_POOL_RECYCLE", "pool_recycle", int)):
            if env.get(var, "").strip():
                changes[field] = _parse_number(var, env[var], kind)
        if env.get("DB_POOL_PRE_PING", "").strip():
            changes["pool_pre_ping"] = _parse_bool("DB_POOL_PRE_PING", env["DB_POOL_PRE_PING"])
        if changes and pool.poolclass == "null" and (
                "pool_size" in changes or "max_overflow" in changes):
            changes["poolclass"] = "queue"
        if changes:
            pool = pool.replace(**changes)

        echo = _parse_bool("DB_ECHO", env["DB_ECHO"]) if env.get("DB_ECHO", "").strip() else False
        connect_timeout = (_parse_number("DB_CONNECT_TIMEOUT", env["DB_CONNECT_TIMEOUT"], float)
                           if env.get("DB_CONNECT_TIMEOUT", "").strip() else 5.0)
        statement_timeout = (
            _parse_number("DB_STATEMENT_TIMEOUT", env["DB_STATEMENT_TIMEOUT"], int)
            if env.get("DB_STATEMENT_TIMEOUT", "").strip() else None)
        command_timeout = (
            _parse_number("DB_COMMAND_TIMEOUT", env["DB_COMMAND_TIMEOUT"], float)
            if env.get("DB_COMMAND_TIMEOUT", "").strip() else None)
        tcp: dict[str, Any] = (dict(PRODUCTION_TCP) if environment is Environment.PRODUCTION
                               else {})
        for var, field, kind in (("DB_TCP_KEEPALIVE_IDLE", "tcp_keepalive_idle", int),
                                 ("DB_TCP_KEEPALIVE_INTERVAL", "tcp_keepalive_interval", int),
                                 ("DB_TCP_KEEPALIVE_COUNT", "tcp_keepalive_count", int),
                                 ("DB_TCP_USER_TIMEOUT", "tcp_user_timeout", float)):
            if env.get(var, "").strip():
                tcp[field] = _parse_number(var, env[var], kind)
        behind_pooler = (_parse_bool("DB_BEHIND_POOLER", env["DB_BEHIND_POOLER"])
                         if env.get("DB_BEHIND_POOLER", "").strip() else False)
        return cls(url=url, environment=environment, pool=pool, echo=echo,
                   connect_timeout=connect_timeout, statement_timeout_ms=statement_timeout,
                   command_timeout=command_timeout, behind_pooler=behind_pooler, **tcp)

