"""Retry with exponential backoff and jitter: the whole unit of work, only what is safe.

``DEFAULT_RETRY`` (a request's) retries a lost connection and a serialization failure or
deadlock: cheap to retry, and nothing was committed. It does not retry timeouts, an
exhausted pool or a full server, which more attempts make worse, nor a COMMIT whose
answer was lost (``CommitOutcomeUnknownError``) unless the work is declared idempotent.
``STARTUP_RETRY`` waits up to 30 s for any ``TransientError``: a server coming up.
docs/concepts/failures.md says why.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .errors import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    LabkitError,
    RetryExhaustedError,
    SerializationError,
    TransientError,
    is_database_error,
    translate_error,
)
from .session import async_session_scope, session_scope

__all__ = ["DEFAULT_RETRY", "STARTUP_RETRY", "Attempt", "RetryPolicy", "async_retry",
           "async_run_in_transaction", "async_wait_for_database", "retry",
           "run_in_transaction", "wait_for_database"]

logger = logging.getLogger("labkit")
T = TypeVar("T")

INITIAL_DELAY = 0.1  # seconds
MULTIPLIER = 2.0
MAX_DELAY = 2.0  # seconds
JITTER = 0.1  # each delay randomised by +-10 %
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
    """How often, how long and what to retry; times in seconds.

    Delays start at ``initial_delay``, grow by ``multiplier`` up to ``max_delay``, each
    randomised by ``±jitter`` (drawn from the process's own generator, so workers forked
    from one parent do not retry in lockstep); no attempt starts after ``deadline``.
    """

    max_attempts: int = 5
    initial_delay: float = INITIAL_DELAY
    multiplier: float = MULTIPLIER
    max_delay: float = MAX_DELAY
    jitter: float = JITTER
    deadline: float | None = None
    retry_on: tuple[type[LabkitError], ...] = (TransientError,)

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
            capped = min(self.max_delay, delay)
            yield max(0.0, capped * (1 + random.uniform(-self.jitter, self.jitter)))
            delay = min(self.max_delay, delay * self.multiplier)


DEFAULT_RETRY = RetryPolicy(deadline=10.0, retry_on=(ConnectionLostError, SerializationError))
STARTUP_RETRY = RetryPolicy(max_attempts=1000, deadline=30.0)


class _Budget:
    """The bookkeeping the sync and async loops share."""

    def __init__(self, policy: RetryPolicy, on_retry: Callable[[Attempt], None] | None,
                 idempotent: bool) -> None:
        self.policy, self.on_retry, self.idempotent = policy, on_retry, idempotent
        self.start = time.monotonic()
        self.delays = policy.delays()
        self.attempts = self.unknown_commits = 0

    def failed(self, exc: Exception) -> float:
        """Classify a failure; return the delay before the next attempt, or raise."""
        if not is_database_error(exc):
            raise exc  # the caller's own: not ours to classify or retry
        error = translate_error(exc)
        if isinstance(error, CommitOutcomeUnknownError):
            self.unknown_commits += 1
            if not self.idempotent:
                self._give_up(error, exc)
        elif not isinstance(error, self.policy.retry_on):
            self._give_up(error, exc)
        elapsed = time.monotonic() - self.start
        delay = next(self.delays, None)
        deadline = self.policy.deadline
        if delay is None or (deadline is not None and elapsed + delay > deadline):
            budget = f"{self.policy.max_attempts} attempts" + (
                f" / {deadline:g} s" if deadline is not None else "")
            message = (f"gave up after {self.attempts} attempt(s) in {elapsed:.2f} s (budget: "
                       f"{budget}); last error: {type(error).__name__}: {error}")
            if self.unknown_commits:
                message += (f" -- {self.unknown_commits} attempt(s) lost the answer to "
                            "COMMIT: the work may have been stored")
            raise RetryExhaustedError(message, attempts=self.attempts, elapsed=elapsed,
                                      last_error=error) from exc
        logger.info("attempt %d failed with %s; retrying in %.2f s", self.attempts,
                    type(error).__name__, delay)
        if self.on_retry is not None:
            self.on_retry(Attempt(self.attempts, error, delay, elapsed))
        return delay

    @staticmethod
    def _give_up(error: LabkitError, exc: Exception) -> NoReturn:
        if error is exc:
            raise exc
        raise error from exc


def retry(fn: Callable[[], T], *, policy: RetryPolicy = DEFAULT_RETRY,
          on_retry: Callable[[Attempt], None] | None = None, idempotent: bool = False) -> T:
    """Call ``fn()`` until it succeeds, retrying what ``policy.retry_on`` names.

    Raises:
        CommitOutcomeUnknownError: at once, unless ``idempotent`` (running ``fn`` twice
            then has the effect of once).
        RetryExhaustedError: the budget ran out; ``last_error`` says why.
        LabkitError: at once, for a database error the policy does not retry. Anything
            that is not a database error propagates unchanged after one attempt.
    """
    budget = _Budget(policy, on_retry, idempotent)
    while True:
        budget.attempts += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by the budget
            time.sleep(budget.failed(exc))


async def async_retry(fn: Callable[[], Awaitable[T]], *, policy: RetryPolicy = DEFAULT_RETRY,
                      on_retry: Callable[[Attempt], None] | None = None,
                      idempotent: bool = False) -> T:
    """Async twin of ``retry``: awaits ``fn()``."""
    budget = _Budget(policy, on_retry, idempotent)
    while True:
        budget.attempts += 1
        try:
            return await fn()
        except Exception as exc:  # noqa: BLE001 - classified by the budget
            await asyncio.sleep(budget.failed(exc))


def run_in_transaction(factory: sessionmaker[Session], work: Callable[[Session], T], *,
                       policy: RetryPolicy = DEFAULT_RETRY,
                       on_retry: Callable[[Attempt], None] | None = None,
                       idempotent: bool = False) -> T:
    """Run ``work(session)`` in a ``session_scope``, retrying the whole transaction.

    Declare ``idempotent=True`` only for work whose second run changes nothing after a
    first that committed (an idempotency key chosen before the first attempt, with
    ``ON CONFLICT DO NOTHING``): then a lost COMMIT answer is retried too.

    Example:
        ```python
        key = request.headers["Idempotency-Key"]   # chosen once, before any attempt

        def pay(session: Session) -> None:
            session.execute(text("INSERT INTO payments (key, amount) VALUES (:k, 100) "
                                 "ON CONFLICT (key) DO NOTHING"), {"k": key})

        run_in_transaction(factory, pay, idempotent=True)
        ```
    """
    def attempt() -> T:
        with session_scope(factory) as session:
            return work(session)

    return retry(attempt, policy=policy, on_retry=on_retry, idempotent=idempotent)


async def async_run_in_transaction(factory: async_sessionmaker[AsyncSession],
                                   work: Callable[[AsyncSession], Awaitable[T]], *,
                                   policy: RetryPolicy = DEFAULT_RETRY,
                                   on_retry: Callable[[Attempt], None] | None = None,
                                   idempotent: bool = False) -> T:
    """Async twin of ``run_in_transaction``: ``work(session)`` is awaited."""
    async def attempt() -> T:
        async with async_session_scope(factory) as session:
            return await work(session)

    return await async_retry(attempt, policy=policy, on_retry=on_retry, idempotent=idempotent)


def _probe_timeout(policy: RetryPolicy, started: float) -> float:
    if policy.deadline is None:
        return PROBE_TIMEOUT
    return max(0.05, min(PROBE_TIMEOUT, policy.deadline - (time.monotonic() - started)))


def wait_for_database(engine: Engine, *, policy: RetryPolicy = STARTUP_RETRY,
                      on_retry: Callable[[Attempt], None] | None = None) -> int:
    """Block until a health probe succeeds; return the number of attempts.

    Each probe gets the time left in ``policy.deadline`` (at most 5 s), so a hung server
    cannot hold start-up past it. A wrong password fails at once; a server that stays
    down raises ``RetryExhaustedError`` by the deadline.
    """
    from .health import check_database

    attempts, started = 0, time.monotonic()

    def probe() -> None:
        nonlocal attempts
        attempts += 1
        check_database(engine, timeout=_probe_timeout(policy, started))

    retry(probe, policy=policy, on_retry=on_retry)
    return attempts


async def async_wait_for_database(engine: AsyncEngine, *, policy: RetryPolicy = STARTUP_RETRY,
                                  on_retry: Callable[[Attempt], None] | None = None) -> int:
    """Async twin of ``wait_for_database``."""
    from .health import async_check_database

    attempts, started = 0, time.monotonic()

    async def probe() -> None:
        nonlocal attempts
        attempts += 1
        await async_check_database(engine, timeout=_probe_timeout(policy, started))

    await async_retry(probe, policy=policy, on_retry=on_retry)
    return attempts
