"""Settings: where the database is and how the pool behaves, read in one place.

Nothing here reads the environment at import. :meth:`Settings.from_env` reads a mapping
(``os.environ`` by default) once; tests pass a plain dict.

Environment variables (all optional except ``DATABASE_URL`` in production):

===========================  ===============================================  ==========
variable                     meaning                                          unit
===========================  ===============================================  ==========
``DATABASE_URL``             ``postgresql://user:password@host:port/db``
``ENVIRONMENT``              ``development`` | ``production`` | ``test``
``DB_POOL_SIZE``             connections kept open in the pool
``DB_MAX_OVERFLOW``          extra connections allowed under burst
``DB_POOL_TIMEOUT``          wait for a free connection before failing        seconds
``DB_POOL_RECYCLE``          replace connections older than this (-1: never)  seconds
``DB_POOL_PRE_PING``         test each connection at checkout                 true/false
``DB_ECHO``                  log every SQL statement                          true/false
``DB_CONNECT_TIMEOUT``       give up opening a connection after               seconds
``DB_STATEMENT_TIMEOUT``     server cancels statements running longer         milliseconds
===========================  ===============================================  ==========
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from labkit.errors import ConfigurationError, redact

__all__ = [
    "DEVELOPMENT_POOL",
    "PRODUCTION_POOL",
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
    Times are in seconds; ``pool_recycle=-1`` never recycles.
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
        if self.pool_size < 0:
            raise ConfigurationError(f"pool_size must be >= 0, got {self.pool_size}")
        if self.poolclass == "queue" and self.pool_size == 0 and self.max_overflow == 0:
            raise ConfigurationError("pool_size and max_overflow cannot both be 0")
        if self.max_overflow < -1:
            raise ConfigurationError(
                f"max_overflow must be >= -1 (-1: unlimited), got {self.max_overflow}")
        if self.pool_timeout <= 0:
            raise ConfigurationError(f"pool_timeout must be > 0 seconds, got {self.pool_timeout}")
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

def parse_url(url: str | URL) -> URL:
    """Parse a database URL, raising :class:`ConfigurationError` when it is malformed."""
    if isinstance(url, URL):
        return url
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("the database URL is empty; expected "
                                 "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    try:
        parsed = make_url(url.strip())
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            "malformed database URL (not shown: it may hold a password): expected "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE; a password holding any of "
            "@ : / ? # must be percent-encoded (labkit.build_url does it)") from None
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


def to_sync_url(url: str | URL) -> URL:
    """Return the URL for the sync engine: ``postgresql+psycopg2://``."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite")
    return _with_driver(parsed, SYNC_DRIVER)


def to_async_url(url: str | URL) -> URL:
    """Return the URL for the async engine: ``postgresql+asyncpg://``."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    return _with_driver(parsed, ASYNC_DRIVER)


def build_url(*, user: str, password: str | None, host: str, port: int = 5432,
              database: str, driver: str = SYNC_DRIVER) -> URL:
    """Build a PostgreSQL URL from parts; the password may hold any character.

    >>> build_url(user="app", password="p@ss:w/rd", host="db", database="app")
    postgresql+psycopg2://app:***@db:5432/app
    """
    if not 0 < int(port) < 65536:
        raise ConfigurationError(f"port must be between 1 and 65535, got {port}")
    return URL.create(f"postgresql+{driver}", username=user, password=password,
                      host=host, port=int(port), database=database)


def mask_url(url: str | URL) -> str:
    """Return the URL as text with its password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    return redact(url)


def url_as_text(url: URL) -> str:
    """Return the URL as text *with* its password, percent-encoded (for DATABASE_URL)."""
    return url.render_as_string(hide_password=False)


# --- .env files -------------------------------------------------------------------------

def read_env_file(path: str | Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines from a ``.env`` file (``#`` comments, optional quotes).

    Logs a warning when the file is readable or writable by group or others: it usually
    holds the database password, so it should be ``chmod 600``. A missing file reads as
    empty.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is accessible to other users (mode %o); it may hold a password: "
                       "chmod 600 %s", path, stat.S_IMODE(mode), path)
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
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
        return kind(raw.strip())
    except ValueError:
        raise ConfigurationError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Everything labkit needs to open a database: URL, environment and pool profile.

    ``url`` is a SQLAlchemy ``URL``; its ``str`` and this object's ``repr`` mask the
    password. ``connect_timeout`` is in seconds, ``statement_timeout_ms`` in
    milliseconds (``None``: the server's default). ``application_name`` is what the
    server shows in ``pg_stat_activity``.
    """

    url: URL
    environment: Environment = Environment.DEVELOPMENT
    pool: PoolProfile = DEVELOPMENT_POOL
    echo: bool = False
    connect_timeout: float = 5.0
    statement_timeout_ms: int | None = None
    application_name: str = "labkit"

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", parse_url(self.url))
        object.__setattr__(self, "environment", Environment(self.environment))
        if self.connect_timeout <= 0:
            raise ConfigurationError(
                f"connect_timeout must be > 0 seconds, got {self.connect_timeout}")
        if self.statement_timeout_ms is not None and self.statement_timeout_ms < 0:
            raise ConfigurationError(
                f"statement_timeout_ms must be >= 0, got {self.statement_timeout_ms}")

    def __repr__(self) -> str:
        return (f"Settings(url={mask_url(self.url)!r}, environment={self.environment.value!r}, "
                f"pool={self.pool!r}, echo={self.echo}, connect_timeout={self.connect_timeout}, "
                f"statement_timeout_ms={self.statement_timeout_ms}, "
                f"application_name={self.application_name!r})")

    __str__ = __repr__

    @property
    def password(self) -> str | None:
        """The password in the URL (for redacting it from messages)."""
        return self.url.password  # type: ignore[return-value]

    @property
    def sync_url(self) -> URL:
        return to_sync_url(self.url)

    @property
    def async_url(self) -> URL:
        return to_async_url(self.url)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some values changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 env_file: str | Path | None = None,
                 default_url: str | URL | None = None) -> Settings:
        """Read settings from ``env`` (``os.environ`` when ``None``).

        ``env_file`` (e.g. ``".env"``) supplies values the environment does not set;
        the environment wins. ``default_url`` is used when ``DATABASE_URL`` is not set,
        except in production, where a missing ``DATABASE_URL`` is a
        :class:`ConfigurationError`: a service must never fall back to a default database.
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
            url = parse_url(default_url)
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
        return cls(url=url, environment=environment, pool=pool, echo=echo,
                   connect_timeout=connect_timeout, statement_timeout_ms=statement_timeout)

