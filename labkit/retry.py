"""Retry transient failures with exponential backoff and jitter, within a budget.

Only :class:`TransientError` (after :func:`translate_error`) is retried: a lost
connection, a pool timeout, a serialization failure. An integrity error or a typo in
the SQL fails at once, because running it again cannot help.

Retry the *whole* unit of work, never one statement of a transaction: when the
connection dies mid-transaction, everything since BEGIN is gone with it.
:func:`run_in_transaction` does that with :func:`session_scope`.

Delays: ``initial_delay`` (default 0.1 s), multiplied by ``multiplier`` (2) after each
attempt, capped at ``max_delay`` (2 s), each randomised by ``±jitter`` (10 %), and no
attempt starts after ``deadline`` seconds (``None``: no time budget).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from labkit.errors import (
    LabkitError,
    RetryExhaustedError,
    TransientError,
    is_database_error,
    translate_error,
)
from labkit.session import async_session_scope, session_scope

__all__ = [
    "DEFAULT_RETRY",
    "STARTUP_RETRY",
    "Attempt",
    "RetryPolicy",
    "async_retry",
    "async_run_in_transaction",
    "async_wait_for_database",
    "retry",
    "run_in_transaction",
    "wait_for_database",
]

logger = logging.getLogger("labkit")
T = TypeVar("T")

INITIAL_DELAY = 0.1
MULTIPLIER = 2.0
MAX_DELAY = 2.0
JITTER = 0.1


@dataclass(frozen=True)
class Attempt:
    """One failed attempt, as passed to ``on_retry`` callbacks."""

    number: int
    error: LabkitError
    delay: float
    elapsed: float


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; times in seconds."""

    max_attempts: int = 5
    initial_delay: float = INITIAL_DELAY
    multiplier: float = MULTIPLIER
    max_delay: float = MAX_DELAY
    jitter: float = JITTER
    deadline: float | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("initial_delay and max_delay must be >= 0 seconds")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError(f"deadline must be > 0 seconds, got {self.deadline}")

    def delays(self) -> Iterator[float]:
        """Yield the sleep before each retry (``max_attempts - 1`` values)."""
        delay = self.initial_delay
        for _ in range(self.max_attempts - 1):
            spread = delay * self.jitter
            yield max(0.0, min(self.max_delay, delay) + self.rng.uniform(-spread, spread))
            delay = min(self.max_delay, delay * self.multiplier)


DEFAULT_RETRY = RetryPolicy()
# Start-up: keep trying for up to 30 s while the database comes up.
STARTUP_RETRY = RetryPolicy(max_attempts=1000, initial_delay=0.1, max_delay=2.0, deadline=30.0)


class _Budget:
    """Shared bookkeeping of the sync and async retry loops."""

    def __init__(self, policy: RetryPolicy, on_retry: Callable[[Attempt], None] | None) -> None:
        self.policy = policy
        self.on_retry = on_retry
        self.start = time.monotonic()
        self.delays = policy.delays()
        self.attempts = 0

    def failed(self, exc: BaseException) -> float:
        """Classify a failure; return the delay before the next try, or raise."""
        if not is_database_error(exc):
            raise exc  # the caller's own bug: not ours to classify or retry
        error = translate_error(exc)
        if not isinstance(error, TransientError):
            raise error from exc
        elapsed = time.monotonic() - self.start
        delay = next(self.delays, None)
        deadline = self.policy.deadline
        if delay is not None and deadline is not None and elapsed + delay > deadline:
            delay = None
        if delay is None:
            budget = f"{self.policy.max_attempts} attempts"
            if deadline is not None:
                budget += f" / {deadline:g} s"
            raise RetryExhaustedError(
                f"gave up after {self.attempts} attempt(s) in {elapsed:.2f} s (budget: "
                f"{budget}); last error: {type(error).__name__}: {error}",
                attempts=self.attempts, elapsed=elapsed, last_error=error) from exc
        attempt = Attempt(number=self.attempts, error=error, delay=delay, elapsed=elapsed)
        logger.info("attempt %d failed with %s; retrying in %.2f s", self.attempts,
                    type(error).__name__, delay)
        if self.on_retry is not None:
            self.on_retry(attempt)
        return delay


def retry(fn: Callable[[], T], *, policy: RetryPolicy = DEFAULT_RETRY,
          on_retry: Callable[[Attempt], None] | None = None) -> T:
    """Call ``fn()`` until it succeeds, retrying transient failures with backoff.

    Raises the labkit error at once for a non-transient failure, and
    :class:`RetryExhaustedError` (with ``last_error``) when the budget runs out.
    """
    budget = _Budget(policy, on_retry)
    while True:
        budget.attempts += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by the budget
            time.sleep(budget.failed(exc))


async def async_retry(fn: Callable[[], Awaitable[T]], *, policy: RetryPolicy = DEFAULT_RETRY,
                      on_retry: Callable[[Attempt], None] | None = None) -> T:
    """Async twin of :func:`retry`: awaits ``fn()``."""
    budget = _Budget(policy, on_retry)
    while True:
        budget.attempts += 1
        try:
            return await fn()
        except Exception as exc:  # noqa: BLE001 - classified by the budget
            await asyncio.sleep(budget.failed(exc))


def run_in_transaction(factory: sessionmaker[Session], work: Callable[[Session], T], *,
                       policy: RetryPolicy = DEFAULT_RETRY,
                       on_retry: Callable[[Attempt], None] | None = None) -> T:
    """Run ``work(session)`` in a :func:`session_scope`, retrying the whole transaction.

    ``work`` must be safe to run again: it starts from scratch in a new session each try.
    """
    def attempt() -> T:
        with session_scope(factory) as session:
            return work(session)

    return retry(attempt, policy=policy, on_retry=on_retry)


async def async_run_in_transaction(factory: async_sessionmaker[AsyncSession],
                                   work: Callable[[AsyncSession], Awaitable[T]], *,
                                   policy: RetryPolicy = DEFAULT_RETRY,
                                   on_retry: Callable[[Attempt], None] | None = None) -> T:
    """Async twin of :func:`run_in_transaction`."""
    async def attempt() -> T:
        async with async_session_scope(factory) as session:
            return await work(session)

    return await async_retry(attempt, policy=policy, on_retry=on_retry)


def wait_for_database(engine: Engine, *, policy: RetryPolicy = STARTUP_RETRY,
                      on_retry: Callable[[Attempt], None] | None = None) -> int:
    """Block until the database answers ``SELECT 1``; return the number of attempts.

    For start-up, when the application may come up before its database. A wrong
    password fails at once (not transient); a server that stays down raises
    :class:`RetryExhaustedError` after ``policy.deadline`` seconds.
    """
    attempts = 0

    def probe() -> None:
        nonlocal attempts
        attempts += 1
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    retry(probe, policy=policy, on_retry=on_retry)
    return attempts


async def async_wait_for_database(engine: AsyncEngine, *, policy: RetryPolicy = STARTUP_RETRY,
                                  on_retry: Callable[[Attempt], None] | None = None) -> int:
    """Async twin of :func:`wait_for_database`."""
    attempts = 0

    async def probe() -> Any:
        nonlocal attempts
        attempts += 1
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    await async_retry(probe, policy=policy, on_retry=on_retry)
    return attempts
