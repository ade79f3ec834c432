"""Exercises of notebook 06 (async vs sync): one session per task."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from labkit.lab.exercises import ExerciseFailed, exercise, require, scratch_async_engine

IDS = [1, 2, 3, 4, 5, 6]
LOOKUP_S = 0.2                      # each lookup waits this long in the server
SERIAL_S = LOOKUP_S * len(IDS)      # one after another: 1.2 s
CONCURRENT_LIMIT_S = SERIAL_S / 2   # side by side takes about 0.2 s; accept up to 0.6 s


async def _warm(engine: AsyncEngine, connections: int) -> None:
    """Open the pool's connections first, so that only the lookups are timed."""
    async def one() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await asyncio.sleep(0.05)   # keep it while the others open theirs
    await asyncio.gather(*(one() for _ in range(connections)))


async def _run(prices: Any, url: URL) -> tuple[Any, float, int]:
    engine = scratch_async_engine(url, pool_size=len(IDS), pool_timeout=2.0)
    try:
        await _warm(engine, len(IDS))
        factory = async_sessionmaker(engine, expire_on_commit=False)
        start = time.monotonic()
        try:
            result = await asyncio.wait_for(prices(factory, list(IDS)), SERIAL_S + 3)
        except sa_exc.InvalidRequestError as exc:
            raise ExerciseFailed(
                f"SQLAlchemy refused: {str(exc).splitlines()[0]}. Several tasks used one "
                "AsyncSession at once: a session is one connection, one conversation"
            ) from None
        except asyncio.TimeoutError:
            raise ExerciseFailed(f"`prices` did not finish within {SERIAL_S + 3:g} s") from None
        elapsed = time.monotonic() - start
        left_out = engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    return result, elapsed, left_out


@exercise("06.1", title="One AsyncSession shared by concurrent tasks",
          hint="Give each task its own session: a helper coroutine that opens "
               "`async with factory() as session:` for one lookup, and gather those.")
def shared_async_session(namespace: Mapping[str, Any], url: URL) -> str:
    """Look up 6 prices, each waiting 0.2 s in the server, with a pool of 6 connections.

    Passes when the prices are right, the lookups ran side by side (under 0.6 s in all,
    where one after another takes 1.2 s), and no connection is left checked out.
    """
    prices = require(namespace, "prices", inspect.iscoroutinefunction, what="an async function")
    result, elapsed, left_out = asyncio.run(_run(prices, url))
    expected = [i * 10 for i in IDS]
    if list(result or []) != expected:
        raise ExerciseFailed(f"prices({IDS}) returned {result}, expected {expected}")
    if elapsed >= CONCURRENT_LIMIT_S:
        raise ExerciseFailed(
            f"{len(IDS)} lookups of {LOOKUP_S:g} s each took {elapsed:.2f} s: they ran one "
            f"after another (that takes {SERIAL_S:.1f} s), queued on one session's single "
            "connection, although the pool had one connection free for each")
    if left_out:
        raise ExerciseFailed(f"{left_out} connections were left checked out: close every session")
    return (f"{len(IDS)} lookups of {LOOKUP_S:g} s each in {elapsed:.2f} s, side by side "
            "on their own sessions")
