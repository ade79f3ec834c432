"""Settings: where the database is and how the pool behaves, read once by ``Settings.from_env``.

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
| ``DB_DRIVER`` | ``driver``: ``psycopg`` (psycopg 3); unset: psycopg2 and asyncpg | |
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError, redact

__all__ = ["DEVELOPMENT_POOL", "PRODUCTION_POOL", "TEST_POOL", "PoolProfile", "Settings",
           "build_url", "mask_url", "parse_url", "server_settings", "to_async_url", "to_sync_url"]

ENVIRONMENTS = ("development", "production", "test")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
URL_PARAMETERS = frozenset({"sslmode", "ssl", "options", "application_name",
                            "connect_timeout", "target_session_attrs", "host"})
_BOTH_READ = ("sslrootcert", "sslcert", "sslkey", "sslcrl")  # libpq and asyncpg: PGSSL...
DRIVERS = ("psycopg2", "asyncpg", "psycopg", "psycopg_async")  # the last two: driver="psycopg"
_INT_MAX = 2_147_483_647
_LIMITS: dict[str, tuple[int | None, float]] = {
    "pool_size": (0, _INT_MAX), "max_overflow": (-1, _INT_MAX), "pool_recycle": (-1, _INT_MAX),
    "statement_timeout_ms": (0, _INT_MAX), "processes": (1, _INT_MAX), "port": (1, 65535),
    "pool_timeout": (None, threading.TIMEOUT_MAX), "connect_timeout": (None, _INT_MAX)}
_BOOLS = {word: i < 4 for i, word in enumerate("1 true yes on 0 false no off".split())}
_KINDS = {bool: "true or false", int: "an integer", float: "a number"}
_POOL_ENV = {"DB_POOL_SIZE": ("pool_size", int), "DB_MAX_OVERFLOW": ("max_overflow", int),
             "DB_POOL_TIMEOUT": ("pool_timeout", float), "DB_POOL_RECYCLE": ("pool_recycle", int),
             "DB_POOL_PRE_PING": ("pool_pre_ping", bool)}
_ENV = {"DB_ECHO": ("echo", bool), "DB_CONNECT_TIMEOUT": ("connect_timeout", float),
        "DB_STATEMENT_TIMEOUT": ("statement_timeout_ms", int), "DB_PROCESSES": ("processes", int)}


def _check(name: str, value: Any) -> None:
    """Refuse ``value`` outside ``_LIMITS[name]``: (lowest, highest); lowest None: seconds > 0."""
    low, high = _LIMITS[name]
    number = isinstance(value, numbers.Real if low is None else numbers.Integral)
    if not number or isinstance(value, bool) \
            or not (0 < value if low is None else low <= value) or not value <= high:
        wanted = (f"a number of seconds > 0 and <= {high:g}" if low is None
                  else f"an integer from {low} to {high}")
        raise ConfigurationError(f"{name} must be {wanted}, got {value!r}")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
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
        _one_of("poolclass", self.poolclass, ("queue", "null", "static"))
        for name in ("pool_size", "max_overflow", "pool_recycle", "pool_timeout"):
            _check(name, getattr(self, name))
        if self.poolclass == "queue" and self.pool_size == 0 and self.max_overflow == 0:
            raise ConfigurationError("pool_size and max_overflow cannot both be 0")
        if self.pool_recycle == 0:
            raise ConfigurationError("pool_recycle must be > 0 seconds or -1 (never), got 0")

    def replace(self, **changes: Any) -> PoolProfile:
        """Return a copy with some values changed (validated again)."""
        return dataclasses.replace(self, **changes)


DEVELOPMENT_POOL = PoolProfile(pool_size=5, max_overflow=10, pool_timeout=30.0)
PRODUCTION_POOL = PoolProfile(pool_size=5, max_overflow=5, pool_timeout=5.0, pool_recycle=1800)
TEST_POOL = PoolProfile(poolclass="null", pool_size=0, max_overflow=0, pool_pre_ping=False)
_PROFILES = dict(zip(ENVIRONMENTS, (DEVELOPMENT_POOL, PRODUCTION_POOL, TEST_POOL)))


def parse_url(url: str | URL) -> URL:
    """Parse a PostgreSQL URL or raise ``ConfigurationError`` (password never shown; an
    unencoded ``@`` refused); ``?password=`` moves to the password, ``postgres://`` is renamed."""
    try:
        parsed = url if isinstance(url, URL) else make_url(str(url).strip())
    except (ArgumentError, ValueError):
        raise ConfigurationError("malformed database URL (not shown: it may hold a password); "
                                 "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with "
                                 "@ : / ? # in the password percent-encoded") from None
    if parsed.host is not None and "@" in parsed.host:
        raise ConfigurationError("malformed database URL (not shown: it holds a password): more "
                                 "than one '@'; write an '@' in the password as %40")
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "postgres"):
        raise ConfigurationError(f"labkit speaks PostgreSQL, not {backend!r} ({mask_url(parsed)})")
    parsed = parsed.set(drivername="postgresql" + parsed.drivername[len(backend):])
    password = parsed.query.get("password")
    if password is not None:
        if parsed.password is not None or not isinstance(password, str):
            raise ConfigurationError(f"the URL {mask_url(parsed)} gives the password twice")
        parsed = parsed.difference_update_query(["password"]).set(password=password)
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
    _check("port", port)
    return URL.create("postgresql", user, password, host, port, database)


def _one(url: URL, name: str) -> str | None:
    value = url.query.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"URL parameter {name!r} is given twice in {mask_url(url)}")
    return value


def to_sync_url(url: str | URL, driver: str | None = None) -> URL:
    """Return the URL for psycopg2, or psycopg 3 if ``driver="psycopg"`` (``sslmode``)."""
    parsed = parse_url(url)
    if "+" in parsed.drivername and parsed.get_driver_name() not in DRIVERS:
        raise ConfigurationError(f"unknown driver in {mask_url(parsed)}: use postgresql[+psycopg]")
    modes = {name: _one(parsed, name) for name in ("sslmode", "ssl")}
    for name, mode in modes.items():
        if mode not in (None, *SSL_MODES):
            raise ConfigurationError(f"URL parameter {name}={mode!r} is not one of "
                                     f"{', '.join(SSL_MODES)}")
    if None not in modes.values() and modes["sslmode"] != modes["ssl"]:
        raise ConfigurationError("the URL gives sslmode and ssl with different values")
    mode = modes["sslmode"] or modes["ssl"]
    parsed = parsed.set(drivername=f"postgresql+{driver or 'psycopg2'}")
    parsed = parsed.difference_update_query(["ssl"])
    return parsed.update_query_dict({"sslmode": mode}) if mode else parsed


def to_async_url(url: str | URL, driver: str | None = None) -> URL:
    """Return the URL for asyncpg (``ssl``; ``options`` become server_settings), or psycopg 3's."""
    parsed = to_sync_url(url, driver)
    server_settings(_one(parsed, "options") or "")
    if driver == "psycopg":
        return parsed
    mode = parsed.query.get("sslmode")
    parsed = parsed.set(drivername="postgresql+asyncpg").difference_update_query(["sslmode"])
    return parsed.update_query_dict({"ssl": mode}) if mode else parsed


def server_settings(options: str) -> dict[str, str]:
    """Turn libpq ``options`` (``-c name=value ...``) into asyncpg's ``server_settings``."""
    words = iter(w.replace("\\ ", " ") for w in re.split(r"(?<!\\)\s+", options.strip()) if w)
    settings: dict[str, str] = {}
    for word in words:
        flag = word + next(words, "") if word == "-c" else word
        match = re.fullmatch(r"(?:-c|--)([^=]+)=(.*)", flag, re.DOTALL)
        if match is None and len(flag) > 2 and flag.startswith(("-c", "--")):
            raise ConfigurationError("the URL's options hold a '-c' without name=value")
        if match is None:
            raise ConfigurationError(f"the URL's options hold {flag!r}: only '-c name=value'")
        settings[match[1].replace("-", "_")] = match[2]
    return settings


def _parse(kind: type, name: str, raw: str) -> Any:
    """Read variable ``name``'s text as a ``bool``, an ``int`` or a finite ``float``."""
    text = raw.strip().lower()
    try:
        value = _BOOLS[text] if kind is bool else kind(text)
    except (KeyError, ValueError):
        value = None
    if value is None or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be {_KINDS[kind]}, got {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything labkit needs to open a database; its ``repr`` masks the password. The URL may
    give ``connect_timeout`` (5 s), ``application_name`` and the driver (``+psycopg``)."""

    url: URL
    environment: str = "development"
    pool: PoolProfile = DEVELOPMENT_POOL
    echo: bool = False
    connect_timeout: float | None = None
    statement_timeout_ms: int | None = None
    application_name: str | None = None
    processes: int = 1
    driver: Literal["psycopg"] | None = None  # psycopg 3; None: psycopg2, and asyncpg for async

    def __post_init__(self) -> None:
        url = parse_url(self.url)
        named = url.drivername.partition("+")[2] in DRIVERS[2:]  # postgresql+psycopg://
        if self.driver not in (None, "psycopg") or (self.driver and "+" in url.drivername
                                                     and not named):
            raise ConfigurationError(f"driver must be 'psycopg' (psycopg 3) or None (psycopg2 "
                                     f"and asyncpg), as the URL says; got {self.driver!r}")
        object.__setattr__(self, "driver", "psycopg" if named else self.driver)
        for name, default in (("connect_timeout", 5.0), ("application_name", "labkit")):
            given, in_url = getattr(self, name), _one(url, name)  # type: Any, Any
            if in_url is not None:
                in_url = _parse(float, name, in_url) if name == "connect_timeout" else in_url
                if given not in (None, in_url, default):  # a default counts as unset
                    raise ConfigurationError(f"{name} is given twice, in the URL ({in_url}) "
                                             f"and in the settings ({given}); keep one")
                given = in_url if given in (None, default) else given
            object.__setattr__(self, name, default if given is None else given)
            url = url.difference_update_query([name])
        for name in url.query:
            if name in _BOTH_READ:
                raise ConfigurationError(f"URL parameter {name!r}: set PG{name.upper()} in the "
                                         "environment instead, which every driver reads")
            if name not in URL_PARAMETERS:
                raise ConfigurationError(f"unknown URL parameter {name!r} in {mask_url(url)}: "
                                         f"labkit accepts {', '.join(sorted(URL_PARAMETERS))}")
        to_async_url(url, self.driver)  # the driver, TLS mode and options
        object.__setattr__(self, "url", url)
        _one_of("ENVIRONMENT", self.environment, ENVIRONMENTS)
        for name in ("connect_timeout", "statement_timeout_ms", "processes"):
            if name != "statement_timeout_ms" or self.statement_timeout_ms is not None:
                _check(name, getattr(self, name))

    @property
    def sync_url(self) -> URL:
        """The URL for the sync engine's driver (psycopg2, or psycopg 3)."""
        return to_sync_url(self.url, self.driver)

    @property
    def async_url(self) -> URL:
        """The URL for the async engine's driver (asyncpg, or psycopg 3)."""
        return to_async_url(self.url, self.driver)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some values changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 default_url: str | URL | Callable[[], str | URL] | None = None) -> Settings:
        """Read ``env`` (``os.environ`` if ``None``) as the table says; ``ENVIRONMENT`` picks the
        pool; ``default_url`` (or a callable) stands in for ``DATABASE_URL``, not in production."""
        env = os.environ if env is None else env
        environment = env.get("ENVIRONMENT", "").strip().lower() or "development"
        _one_of("ENVIRONMENT", environment, ENVIRONMENTS)
        production = environment == "production"
        raw_url = env.get("DATABASE_URL", "").strip() or (None if production else default_url)
        if raw_url is None:
            raise ConfigurationError(f"DATABASE_URL is not set{' in production' * production}")
        raw_url = raw_url() if callable(raw_url) else raw_url
        pool_changes, values = ({field: _parse(kind, var, env[var]) for var, (field, kind)
                                 in table.items() if env.get(var, "").strip()}
                                for table in (_POOL_ENV, _ENV))
        values["driver"] = env.get("DB_DRIVER", "").strip().lower() or None
        pool = _PROFILES[environment]
        if pool.poolclass == "null" and {"pool_size", "max_overflow"} & pool_changes.keys():
            pool_changes["poolclass"] = "queue"  # TEST_POOL given a size becomes a queue
        return cls(url=parse_url(raw_url), environment=environment,
                   pool=pool.replace(**pool_changes), **values)
