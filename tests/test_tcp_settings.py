"""labkit.network.tcp reaches the socket through every driver: read back with getsockopt."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from labkit import Settings, _private
from labkit.network import tcp
from tests.conftest import DRIVERS, for_driver, is_async

TUNED = tcp.TcpSettings(keepalive_idle=17, keepalive_interval=4, keepalive_count=2,
                        user_timeout=3.0)


def _options(fileno: int) -> dict[str, int]:
    with socket.socket(fileno=os.dup(fileno)) as sock:
        return {name: sock.getsockopt(level, getattr(socket, name)) for level, name in (
            (socket.SOL_SOCKET, "SO_KEEPALIVE"), (socket.IPPROTO_TCP, "TCP_KEEPIDLE"),
            (socket.IPPROTO_TCP, "TCP_KEEPINTVL"), (socket.IPPROTO_TCP, "TCP_KEEPCNT"),
            (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT"))}


def _fileno(dbapi_connection: Any) -> int:
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    found = _private.asyncpg_fileno(dbapi_connection) if not hasattr(driver, "fileno") \
        else driver.fileno()
    assert found is not None
    return int(found)


@pytest.mark.parametrize("driver", DRIVERS)
def test_tcp_settings_are_on_the_connections_socket_for_every_driver(db_url: URL, driver: str):
    settings = for_driver(Settings(url=db_url), driver)
    if not is_async(driver):
        engine = tcp.create_engine(settings, TUNED)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            seen = _options(_fileno(conn.connection.dbapi_connection))
        engine.dispose()
    else:
        async def run() -> dict[str, int]:
            async_engine = tcp.create_async_engine(settings, TUNED)
            try:
                async with async_engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                    raw = await conn.get_raw_connection()
                    return _options(_fileno(raw.dbapi_connection))
            finally:
                await async_engine.dispose()
        seen = asyncio.run(run())
    assert seen == {"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 17, "TCP_KEEPINTVL": 4, "TCP_KEEPCNT": 2,
                    "TCP_USER_TIMEOUT": 3000}
