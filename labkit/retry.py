"""Retry with exponential backoff and jitter: the whole unit of work, only what is safe."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .errors import (CommitOutcomeUnknownError, ConnectionLostError, LabkitError,
                     RetryExhaustedError, SerializationError, TransientError,
                     is_database_error, translate_error)
from .health import async_check_database, check_database
from .session import async_session_scope, session_scope

__all__ = ["DEFAULT_RETRY", "STARTUP_RETRY", "Attempt", "RetryPolicy", "async_retry",
           "async_run_in_transaction", "async_wait_for_database", "retry",
           "run_in_transaction", "wait_for_database"]

logger = logging.getLogger("labkit")
T = TypeVar("T")
INITIAL_DELAY, MULTIPLIER, MAX_DELAY, JITTER = 0.1, 2.0, 2.0, 0.1  # s, factor, s, +-fraction
PROBE_TIMEOUT = 5.0  # seconds, at most, per wait_for_database probe


@dataclass(frozen=True)
class Attempt:
    """One failed attempt, as passed to ``on_retry``; times in seconds."""
    number: int
    error: LabkitError
    delay: float
    elapsed: float


@dataclass(frozen=True)
class RetryPolicy:
    """What to retry, how often, how long (s); delays grow by ``multiplier``, ``±jitter``."""
    max_attempts: int = 5
    initial_delay: float = INITIAL_DELAY
    multiplier: float = MULTIPLIER
    max_delay: float = MAX_DELAY
    jitter: float = JITTER
    deadline: float | None = None
    retry_on: tuple[type[LabkitError], ...] = (TransientError,)

    def __post_init__(self) -> None:
        if (self.max_attempts < 1 or self.initial_delay < 0 or self.max_delay < 0
                or self.multiplier < 1 or not 0 <= self.jitter < 1
                or (self.deadline is not None and self.deadline <= 0)):
            raise ValueError("need max_attempts >= 1, delays >= 0 s, multiplier >= 1, "
                             f"0 <= jitter < 1 and deadline > 0 s; got {self}")

    def delays(self) -> Iterator[float]:
        """Yield the sleep before each retry (``max_attempts - 1`` values)."""
        delay = min(self.max_delay, self.initial_delay)
        for _ in range(self.max_attempts - 1):
            yield max(0.0, delay * (1 + random.uniform(-self.jitter, self.jitter)))
            delay = min(self.max_delay, delay * self.multiplier)


DEFAULT_RETRY = RetryPolicy(deadline=10.0, retry_on=(ConnectionLostError, SerializationError))
STARTUP_RETRY = RetryPolicy(max_attempts=1000, deadline=30.0)
_OnRetry = Callable[[Attempt], None] | None


class _Budget:
    """One call's attempts, elapsed time and delays; the sync and async loops share it."""
    def __init__(self, policy: RetryPolicy, on_retry: _OnRetry, idempotent: bool) -> None:
        self.policy, self.on_retry, self.idempotent = policy, on_retry, idempotent
        self.start, self.delays = time.monotonic(), policy.delays()
        self.attempts, self.unknown_commits = 1, 0

    def run(self, fn: Callable[[], T]) -> T:
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified by failed()
                time.sleep(self.failed(exc))

    async def run_async(self, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                return await fn()
            except Exception as exc:  # noqa: BLE001 - classified by failed()
                await asyncio.sleep(self.failed(exc))

    def probe_timeout(self) -> float:
        left = (self.policy.deadline or float("inf")) - (time.monotonic() - self.start)
        return max(0.05, min(PROBE_TIMEOUT, left))

    def failed(self, exc: Exception) -> float:
        """Classify a failure; return the delay before the next attempt, or raise."""
        if not is_database_error(exc):
            raise exc  # the caller's own: not ours to classify or retry
        error = translate_error(exc)
        self.unknown_commits += (unknown := isinstance(error, CommitOutcomeUnknownError))
        if not (self.idempotent if unknown else isinstance(error, self.policy.retry_on)):
            if error is exc:
                raise exc
            raise error from exc
        elapsed = time.monotonic() - self.start
        delay, deadline = next(self.delays, None), self.policy.deadline
        if delay is None or (deadline is not None and elapsed + delay > deadline):
            limit = f" / {deadline:g} s" if deadline is not None else ""
            lost = (f" -- {self.unknown_commits} attempt(s) lost the answer to COMMIT: the "
                    "work may have been stored" if self.unknown_commits else "")
            raise RetryExhaustedError(
                f"gave up after {self.attempts} attempt(s) in {elapsed:.2f} s (budget: "
                f"{self.policy.max_attempts} attempts{limit}); last error: "
                f"{type(error).__name__}: {error}{lost}",
                attempts=self.attempts, elapsed=elapsed, last_error=error) from exc
        logger.info("attempt %d failed with %s; retrying in %.2f s", self.attempts,
                    type(error).__name__, delay)
        if self.on_retry is not None:
            self.on_retry(Attempt(self.attempts, error, delay, elapsed))
        self.attempts += 1
        return delay


def retry(fn: Callable[[], T], *, policy: RetryPolicy = DEFAULT_RETRY,
          on_retry: _OnRetry = None, idempotent: bool = False) -> T:
    """Call ``fn()`` until it succeeds, retrying what ``policy.retry_on`` names (a lost COMMIT
    answer only if ``idempotent``) until ``RetryExhaustedError``; other errors raise at once."""
    return _Budget(policy, on_retry, idempotent).run(fn)


async def async_retry(fn: Callable[[], Awaitable[T]], *, policy: RetryPolicy = DEFAULT_RETRY,
                      on_retry: _OnRetry = None, idempotent: bool = False) -> T:
    """Async twin of ``retry``: awaits ``fn()``."""
    return await _Budget(policy, on_retry, idempotent).run_async(fn)


def run_in_transaction(factory: sessionmaker[Session], work: Callable[[Session], T], *,
                       policy: RetryPolicy = DEFAULT_RETRY, on_retry: _OnRetry = None,
                       idempotent: bool = False) -> T:
    """Run ``work(session)`` in a ``session_scope``, retrying the whole transaction."""
    def attempt() -> T:
        with session_scope(factory) as session:
            return work(session)
    return retry(attempt, policy=policy, on_retry=on_retry, idempotent=idempotent)


async def async_run_in_transaction(factory: async_sessionmaker[AsyncSession],
                                   work: Callable[[AsyncSession], Awaitable[T]], *,
                                   policy: RetryPolicy = DEFAULT_RETRY, on_retry: _OnRetry = None,
                                   idempotent: bool = False) -> T:
    """Async twin of ``run_in_transaction``: ``work(session)`` is awaited."""
    async def attempt() -> T:
        async with async_session_scope(factory) as session:
            return await work(session)
    return await async_retry(attempt, policy=policy, on_retry=on_retry, idempotent=idempotent)


def wait_for_database(engine: Engine, *, policy: RetryPolicy = STARTUP_RETRY,
                      on_retry: _OnRetry = None) -> int:
    """Block until a health probe succeeds; return the number of attempts. Each probe gets
    the deadline's rest, at most 5 s; ``RetryExhaustedError`` by then, a bad password at once."""
    budget = _Budget(policy, on_retry, idempotent=False)
    budget.run(lambda: check_database(engine, timeout=budget.probe_timeout()))
    return budget.attempts


async def async_wait_for_database(engine: AsyncEngine, *, policy: RetryPolicy = STARTUP_RETRY,
                                  on_retry: _OnRetry = None) -> int:
    """Async twin of ``wait_for_database``."""
    budget = _Budget(policy, on_retry, idempotent=False)
    await budget.run_async(lambda: async_check_database(engine, timeout=budget.probe_timeout()))
    return budget.attempts
