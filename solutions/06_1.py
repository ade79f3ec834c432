"""Solution 06.1: one AsyncSession per task.

What was wrong: every lookup ran on the same ``AsyncSession``, and a session is one
connection, one conversation with the server. Started together on a session that had no
connection yet, the tasks were refused (``InvalidRequestError``: the session is
"provisioning a new connection"); on a session already connected they would have queued
behind each other on its one connection, in one transaction. A session per task lets
each lookup take its own pooled connection, so the waits overlap.
"""

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

PRICE = text("SELECT :id * 10 FROM pg_sleep(0.2)")   # a lookup that waits 0.2 s in the server


async def price(factory: async_sessionmaker[AsyncSession], item: int) -> int:
    """Look up one price in a session of its own."""
    async with factory() as session:
        return await session.scalar(PRICE, {"id": item})


async def prices(factory: async_sessionmaker[AsyncSession], ids: list[int]) -> list[int]:
    """Look up the prices of ``ids`` concurrently: all together in about 0.2 s, not 0.2 s each."""
    return list(await asyncio.gather(*(price(factory, item) for item in ids)))
