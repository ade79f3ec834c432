"""TCP keepalives and ``TCP_USER_TIMEOUT``, the same on both drivers (optional module).

Linux probes an idle connection only after two hours of silence, and retries sent data
for about 15 minutes: a NAT or load balancer forgets an idle flow long before, and a
dead peer goes unnoticed. ``PRODUCTION_TCP`` probes after 60 s, every 10 s, 3 times,
and drops a connection whose sent data stays unacknowledged for 30 s. psycopg2 and psycopg 3
get them as libpq parameters; asyncpg, which has none, as socket options once connected.

```python
engine = labkit.network.tcp.create_engine(settings, PRODUCTION_TCP)
async_engine = labkit.network.tcp.create_async_engine(settings, PRODUCTION_TCP)
```

Keepalives do not end a wait for an answer from a server that still ACKs (hung, not
gone): only a client deadline does (``labkit.deadline``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import _private
from .. import engine as _engine
from ..config import Settings
from ..errors import ConfigurationError

__all__ = ["PRODUCTION_TCP", "TcpSettings", "create_async_engine", "create_engine"]

_ENV = {"DB_TCP_KEEPALIVE_IDLE": ("keepalive_idle", int),
        "DB_TCP_KEEPALIVE_INTERVAL": ("keepalive_interval", int),
        "DB_TCP_KEEPALIVE_COUNT": ("keepalive_count", int),
        "DB_TCP_USER_TIMEOUT": ("user_timeout", float)}


@dataclass(frozen=True)
class TcpSettings:
    """Keepalive probes (whole seconds, a count) and ``user_timeout`` (seconds); ``None``
    leaves the operating system's default."""

    keepalive_idle: int | None = None
    keepalive_interval: int | None = None
    keepalive_count: int | None = None
    user_timeout: float | None = None

    def __post_init__(self) -> None:
        for name, high in (("keepalive_idle", 32_767), ("keepalive_interval", 32_767),
                           ("keepalive_count", 127)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= high):
                raise ConfigurationError(f"{name} must be an integer from 1 to {high}, "
                                         f"got {value!r}")
        timeout = self.user_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, numbers.Real) or not 0 < timeout <= 2_147_483):  # nan fails too
            raise ConfigurationError("user_timeout must be a number of seconds > 0 and "
                                     f"<= 2147483, got {timeout!r}")

    def replace(self, **changes: Any) -> TcpSettings:
        """Return a copy with some values changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TcpSettings:
        """Read ``DB_TCP_KEEPALIVE_IDLE``, ``_INTERVAL``, ``_COUNT`` and ``DB_TCP_USER_TIMEOUT``;
        with ``ENVIRONMENT=production`` the unset ones come from ``PRODUCTION_TCP``."""
        env = os.environ if env is None else env
        production = env.get("ENVIRONMENT", "").strip().lower() == "production"
        values = dataclasses.asdict(PRODUCTION_TCP) if production else {}
        for var, (field, kind) in _ENV.items():
            if env.get(var, "").strip():
                try:
                    values[field] = kind(env[var].strip())
                except ValueError:
                    values[field] = math.nan
                if not math.isfinite(values[field]):
                    raise ConfigurationError(
                        f"{var} must be {'an integer' if kind is int else 'a number'}, "
                        f"got {env[var]!r}")
        return cls(**values)

    def libpq_args(self) -> dict[str, int]:
        """libpq's connection parameters for these settings (psycopg2's ``connect_args``)."""
        args = {f"keepalives_{name}": getattr(self, f"keepalive_{name}")
                for name in ("idle", "interval", "count")
                if getattr(self, f"keepalive_{name}") is not None}
        if args:
            args["keepalives"] = 1
        if self.user_timeout is not None:
            args["tcp_user_timeout"] = max(1, round(self.user_timeout * 1000))  # ms
        return args

    def socket_options(self) -> list[tuple[int, int, int]]:
        """The ``(level, option, value)`` socket options libpq would set."""
        options = [(socket.IPPROTO_TCP, getattr(socket, option), value)
                   for option, value in (("TCP_KEEPIDLE", self.keepalive_idle),
                                         ("TCP_KEEPINTVL", self.keepalive_interval),
                                         ("TCP_KEEPCNT", self.keepalive_count))
                   if value is not None and hasattr(socket, option)]
        if options:
            options.insert(0, (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        if self.user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            max(1, round(self.user_timeout * 1000))))
        return options


PRODUCTION_TCP = TcpSettings(keepalive_idle=60, keepalive_interval=10, keepalive_count=3,
                             user_timeout=30.0)


def create_engine(settings: Settings, tcp: TcpSettings, **overrides: Any) -> Engine:
    """``labkit.create_engine`` with ``tcp`` given to libpq."""
    connect_args = {**tcp.libpq_args(), **overrides.pop("connect_args", {})}
    return _engine.create_engine(settings, connect_args=connect_args, **overrides)


def create_async_engine(settings: Settings, tcp: TcpSettings,
                        **overrides: Any) -> AsyncEngine:
    """``labkit.create_async_engine`` with ``tcp`` set on each new connection's socket
    (psycopg 3: given to libpq)."""
    if settings.driver == "psycopg":
        return _engine.create_async_engine(settings, connect_args={
            **tcp.libpq_args(), **overrides.pop("connect_args", {})}, **overrides)
    engine = _engine.create_async_engine(settings, **overrides)
    options = tcp.socket_options()
    if options:
        @event.listens_for(engine.sync_engine, "connect")
        def tune(dbapi_connection: Any, record: Any) -> None:
            fileno = _private.asyncpg_fileno(dbapi_connection)
            if fileno is not None:
                sock = socket.socket(fileno=os.dup(fileno))
                try:
                    for level, option, value in options:
                        sock.setsockopt(level, option, value)
                finally:
                    sock.close()  # the duplicate only
    return engine
