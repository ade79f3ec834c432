"""Settings: where the database is and how the pool behaves, read in one place.

Nothing is read at import: ``Settings.from_env(env)`` reads a mapping (``os.environ`` by
default) once. One ``DATABASE_URL`` serves both drivers (``to_sync_url``,
``to_async_url``); a URL parameter is honoured by both, or refused at once.

| variable | field | unit |
|---|---|---|
| ``DATABASE_URL`` | ``url`` (required in production) | |
| ``ENVIRONMENT`` | ``environment``: development, production or test | |
| ``DB_POOL_SIZE`` | ``pool.pool_size``: connections kept open | |
| ``DB_MAX_OVERFLOW`` | ``pool.max_overflow``: extra connections under a burst | |
| ``DB_POOL_TIMEOUT`` | ``pool.pool_timeout``: wait for a free connection | seconds |
| ``DB_POOL_RECYCLE`` | ``pool.pool_recycle``: replace older connections (-1 never) | seconds |
| ``DB_POOL_PRE_PING`` | ``pool.pool_pre_ping``: test each connection at checkout | bool |
| ``DB_ECHO`` | ``echo``: log every statement | bool |
| ``DB_CONNECT_TIMEOUT`` | ``connect_timeout``: give up opening a connection | seconds |
| ``DB_STATEMENT_TIMEOUT`` | ``statement_timeout_ms``: the server cancels longer ones | ms |
| ``DB_PROCESSES`` | ``processes``: processes sharing the server (budget) | |
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError, redact

__all__ = ["DEVELOPMENT_POOL", "PRODUCTION_POOL", "TEST_POOL", "PoolProfile", "Settings",
           "build_url", "mask_url", "parse_url", "server_settings", "to_async_url",
           "to_sync_url"]

ENVIRONMENTS = ("development", "production", "test")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# What both drivers honour; anything else (a typo, one driver's option) is refused.
URL_PARAMETERS = frozenset({"sslmode", "ssl", "options", "application_name",
                            "connect_timeout", "target_session_attrs", "host"})
_BOTH_READ = ("sslrootcert", "sslcert", "sslkey", "sslcrl")  # libpq and asyncpg: PGSSL...


def _seconds(name: str, value: Any, maximum: float = threading.TIMEOUT_MAX) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or not 0 < float(value) <= maximum:
        raise ConfigurationError(f"{name} must be a number of seconds > 0 and <= {maximum:g}, "
                                 f"got {value!r}")
    return float(value)


def _integer(name: str, value: Any, low: int, high: int = 2_147_483_647) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not low <= int(value) <= high:
        raise ConfigurationError(f"{name} must be an integer from {low} to {high}, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class PoolProfile:
    """Pool settings for SQLAlchemy (seconds; ``pool_recycle=-1``: never); ``poolclass`` is
    ``"queue"``, ``"null"`` (a connection per checkout) or ``"static"`` (one, shared)."""

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
        _integer("pool_size", self.pool_size, 0)
        _integer("max_overflow", self.max_overflow, -1)
        _integer("pool_recycle", self.pool_recycle, -1)
        if self.poolclass == "queue" and self.pool_size == 0 and self.max_overflow == 0:
            raise ConfigurationError("pool_size and max_overflow cannot both be 0")
        if self.pool_recycle == 0:
            raise ConfigurationError("pool_recycle must be > 0 seconds or -1 (never), got 0")
        _seconds("pool_timeout", self.pool_timeout)

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


DEVELOPMENT_POOL = PoolProfile(pool_size=5, max_overflow=10, pool_timeout=30.0)
# Small on purpose: processes x (pool_size + max_overflow + 1 probe) must fit the server's
# max_connections, and a request waits at most 5 s for a connection (docs: engine and pool).
PRODUCTION_POOL = PoolProfile(pool_size=5, max_overflow=5, pool_timeout=5.0,
                              pool_recycle=1800)
# Tests open and close engines often against servers that restart: nothing is kept.
TEST_POOL = PoolProfile(poolclass="null", pool_size=0, max_overflow=0, pool_pre_ping=False)
_PROFILES = {"development": DEVELOPMENT_POOL, "production": PRODUCTION_POOL,
             "test": TEST_POOL}


def parse_url(url: str | URL) -> URL:
    """Parse a PostgreSQL URL; raise ``ConfigurationError`` (never showing the password).

    ``postgres://`` becomes ``postgresql://``; a ``?password=`` moves into the password
    field, which every rendering masks; an unencoded ``@`` in the password is refused.
    """
    try:
        parsed = url if isinstance(url, URL) else make_url(str(url).strip())
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            "malformed database URL (not shown: it may hold a password); expected "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with @ : / ? # in the "
            "password percent-encoded (labkit.build_url does it)") from None
    if parsed.host is not None and "@" in parsed.host:
        raise ConfigurationError(
            "malformed database URL (not shown: it holds a password): more than one '@'; "
            "write an '@' in the password as %40 (labkit.build_url does it)")
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "postgres"):
        raise ConfigurationError(f"labkit speaks PostgreSQL, not {backend!r} "
                                 f"({mask_url(parsed)})")
    parsed = parsed.set(drivername="postgresql" + parsed.drivername[len(backend):])
    if "password" in parsed.query:
        if parsed.password is not None or not isinstance(parsed.query["password"], str):
            raise ConfigurationError(
                f"the database URL {mask_url(parsed)} gives the password twice; keep one")
        parsed = parsed.difference_update_query(["password"]).set(
            password=parsed.query["password"])
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigurationError(f"port {parsed.port} in {mask_url(parsed)} is not 1-65535")
    return parsed


def mask_url(url: str | URL) -> str:
    """Return the URL as text with its password (wherever it sits) shown as ``***``."""
    try:
        url = url if isinstance(url, URL) else make_url(str(url).strip())
    except (ArgumentError, ValueError):
        return redact(str(url))
    if "password" in url.query:
        url = url.difference_update_query(["password"]).set(password="***")
    if url.host is not None and "@" in url.host:
        url = url.set(password="***", host=url.host.rsplit("@", 1)[1])
    return url.render_as_string(hide_password=True)


def build_url(*, user: str, password: str | None, host: str, port: int = 5432,
              database: str) -> URL:
    """Build a PostgreSQL URL from parts; the password may hold any character."""
    _integer("port", port, 1, 65535)
    return URL.create("postgresql", username=user, password=password, host=host, port=port,
                      database=database)


def _one(url: URL, name: str) -> str | None:
    value = url.query.get(name)
    if value is None or isinstance(value, str):
        return value
    if name == "host":
        return ",".join(value)
    raise ConfigurationError(f"URL parameter {name!r} is given twice in {mask_url(url)}")


def _ssl_mode(url: URL) -> str | None:
    modes = {name: _one(url, name) for name in ("sslmode", "ssl")}
    for name, mode in modes.items():
        if mode is not None and mode not in SSL_MODES:
            raise ConfigurationError(f"URL parameter {name}={mode!r} is not one of "
                                     f"{', '.join(SSL_MODES)}")
    if None not in modes.values() and modes["sslmode"] != modes["ssl"]:
        raise ConfigurationError("the URL gives sslmode and ssl with different values")
    return modes["sslmode"] or modes["ssl"]


def _with_driver(url: str | URL, driver: str, ssl_name: str) -> URL:
    parsed = parse_url(url)
    if "+" in parsed.drivername and parsed.get_driver_name() not in ("psycopg2", "asyncpg"):
        raise ConfigurationError(f"unknown driver {parsed.get_driver_name()!r} in "
                                 f"{mask_url(parsed)}: use postgresql:// (labkit picks "
                                 "psycopg2 or asyncpg)")
    mode = _ssl_mode(parsed)
    parsed = parsed.set(drivername=f"postgresql+{driver}").difference_update_query(
        ["sslmode", "ssl"])
    return parsed.update_query_dict({ssl_name: mode}) if mode else parsed


def to_sync_url(url: str | URL) -> URL:
    """Return the URL for psycopg2 (``postgresql+psycopg2://``, TLS mode as ``sslmode``)."""
    return _with_driver(url, "psycopg2", "sslmode")


def to_async_url(url: str | URL) -> URL:
    """Return the URL for asyncpg (``postgresql+asyncpg://``, TLS mode as ``ssl``); its
    ``options`` become asyncpg's ``server_settings`` in ``create_async_engine``."""
    parsed = _with_driver(url, "asyncpg", "ssl")
    server_settings(_one(parsed, "options") or "")
    return parsed


def server_settings(options: str) -> dict[str, str]:
    """Turn libpq ``options`` (``-c name=value ...``) into asyncpg's ``server_settings``."""
    words = [w.replace("\\ ", " ") for w in re.split(r"(?<!\\)\s+", options.strip()) if w]
    settings: dict[str, str] = {}
    while words:
        word = words.pop(0)
        if word == "-c" and words:
            pair = words.pop(0)
        elif word.startswith(("--", "-c")) and len(word) > 2:
            pair = word[2:]
        else:
            raise ConfigurationError(f"URL parameter 'options' holds {word!r}: only "
                                     "'-c name=value' settings are understood")
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigurationError("URL parameter 'options' holds a '-c' without name=value")
        settings[name.replace("-", "_")] = value
    return settings


def _parse(kind: type) -> Callable[[str, str], Any]:
    """A parser of one variable's text: ``bool``, ``int`` or (finite) ``float``."""
    def parse(name: str, raw: str) -> Any:
        text = raw.strip().lower()
        if kind is bool and text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text in ("1", "true", "yes", "on")
        try:
            value = None if kind is bool else kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise ConfigurationError(f"{name} must be " + {bool: "true or false", int: "an "
                                     "integer", float: "a number"}[kind] + f", got {raw!r}")
        return value
    return parse


_ENV = {"DB_POOL_SIZE": ("pool.pool_size", int), "DB_MAX_OVERFLOW": ("pool.max_overflow", int),
        "DB_POOL_TIMEOUT": ("pool.pool_timeout", float),
        "DB_POOL_RECYCLE": ("pool.pool_recycle", int),
        "DB_POOL_PRE_PING": ("pool.pool_pre_ping", bool), "DB_ECHO": ("echo", bool),
        "DB_CONNECT_TIMEOUT": ("connect_timeout", float),
        "DB_STATEMENT_TIMEOUT": ("statement_timeout_ms", int), "DB_PROCESSES": ("processes", int)}


@dataclass(frozen=True)
class Settings:
    """Everything labkit needs to open a database; its ``repr`` (the URL's) masks the password.

    ``connect_timeout`` (seconds, default 5) and ``application_name`` (default
    ``"labkit"``) may come from the URL's query instead; given both ways with different
    values they are refused. ``statement_timeout_ms`` is sent at connect time.
    ``processes`` is how many processes share the server, for the connection budget.
    """

    url: URL
    environment: str = "development"
    pool: PoolProfile = DEVELOPMENT_POOL
    echo: bool = False
    connect_timeout: float | None = None
    statement_timeout_ms: int | None = None
    application_name: str | None = None
    processes: int = 1

    def __post_init__(self) -> None:
        url = parse_url(self.url)
        for name, default in (("connect_timeout", 5.0), ("application_name", "labkit")):
            given, in_url = getattr(self, name), _one(url, name)  # type: Any, Any
            if in_url is not None:
                if name == "connect_timeout":
                    in_url = float(_parse(float)(name, in_url))
                if given not in (None, in_url, default):  # a default counts as not given
                    raise ConfigurationError(f"{name} is given twice, in the URL ({in_url}) "
                                             f"and in the settings ({given}); keep one")
                url, given = url.difference_update_query([name]), (
                    in_url if given in (None, default) else given)
            object.__setattr__(self, name, default if given is None else given)
        for name in url.query:
            if name in _BOTH_READ:
                raise ConfigurationError(f"URL parameter {name!r}: set PG{name.upper()} in the "
                                         "environment instead, which both drivers read")
            if name not in URL_PARAMETERS:
                raise ConfigurationError(
                    f"unknown URL parameter {name!r} in {mask_url(url)}: labkit accepts "
                    f"{', '.join(sorted(URL_PARAMETERS))} (the same for both drivers)")
        _ssl_mode(url)
        server_settings(_one(url, "options") or "")
        object.__setattr__(self, "url", url)
        if self.environment not in ENVIRONMENTS:
            raise ConfigurationError(f"ENVIRONMENT must be one of {', '.join(ENVIRONMENTS)}, "
                                     f"got {self.environment!r}")
        _seconds("connect_timeout", self.connect_timeout, 2_147_483_647)
        if self.statement_timeout_ms is not None:
            _integer("statement_timeout_ms", self.statement_timeout_ms, 0)
        _integer("processes", self.processes, 1)

    @property
    def sync_url(self) -> URL:
        """The URL for psycopg2."""
        return to_sync_url(self.url)

    @property
    def async_url(self) -> URL:
        """The URL for asyncpg."""
        return to_async_url(self.url)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some values changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 default_url: str | URL | Callable[[], str | URL] | None = None) -> Settings:
        """Read settings from ``env`` (``os.environ`` when ``None``), as the table says.

        ``ENVIRONMENT`` picks the pool profile (``TEST_POOL`` becomes a queue when given a
        size). ``default_url`` (or a function returning it) serves when ``DATABASE_URL`` is
        unset, except in production: a ``ConfigurationError``, never a guess, as for any
        malformed value (the message names the variable).
        """
        env = os.environ if env is None else env
        environment = env.get("ENVIRONMENT", "").strip().lower() or "development"
        if environment not in ENVIRONMENTS:
            raise ConfigurationError(f"ENVIRONMENT must be one of {', '.join(ENVIRONMENTS)}, "
                                     f"got {environment!r}")
        raw_url: str | URL = env.get("DATABASE_URL", "").strip()
        if not raw_url:
            if environment == "production":
                raise ConfigurationError(
                    "DATABASE_URL is not set and ENVIRONMENT=production: refusing to guess a "
                    "database in production. Set DATABASE_URL=postgresql://USER:PASSWORD@HOST"
                    ":5432/DATABASE")
            if default_url is None:
                raise ConfigurationError("DATABASE_URL is not set")
            raw_url = default_url() if callable(default_url) else default_url
        values: dict[str, Any] = {}
        pool_changes: dict[str, Any] = {}
        for var, (field, kind) in _ENV.items():
            if env.get(var, "").strip():
                target = pool_changes if field.startswith("pool.") else values
                target[field.removeprefix("pool.")] = _parse(kind)(var, env[var])
        pool = _PROFILES[environment]
        if pool.poolclass == "null" and {"pool_size", "max_overflow"} & pool_changes.keys():
            pool_changes["poolclass"] = "queue"
        return cls(url=parse_url(raw_url), environment=environment,
                   pool=pool.replace(**pool_changes), **values)
