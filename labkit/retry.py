"""Retry transient failures with exponential backoff and jitter, within a budget.

Only ``TransientError`` (after ``translate_error``) is retried: a lost connection, a
pool timeout, a serialization failure. An integrity error or a typo in the SQL fails at
once, because running it again cannot help.

Retry the *whole* unit of work, never one statement of a transaction, and know which
failures make that safe:

- The connection is lost *before* ``COMMIT`` is sent (mid-statement, or the server
  restarted while the transaction was open): the server rolls the transaction back,
  everything since BEGIN is gone, and running it again stores it once.
- The server *answers* ``COMMIT`` with an error (a serialization failure, a deferred
  constraint): the transaction was rolled back too; retried if transient.
- The connection is lost *while* ``COMMIT`` is in flight: the server may have committed
  and lost only its answer. ``session_scope`` raises ``CommitOutcomeUnknownError``,
  which is **not** retried by default, because running a non-idempotent write again
  (``INSERT INTO payments ...``) can store it twice. Make the work idempotent (a
  client-chosen idempotency key with ``INSERT ... ON CONFLICT DO NOTHING``, or an
  ``UPDATE ... SET status = 'paid' WHERE id = :id``) and say so with
  ``run_in_transaction(factory, work, idempotent=True)``: then a retry after a commit
  that did happen finds the row and does nothing.

``run_in_transaction`` does all of that with ``session_scope``.

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
from typing import Any, NoReturn, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from labkit.errors import (
    CommitOutcomeUnknownError,
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
PROBE_TIMEOUT = 5.0


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


# A request's retries: a few attempts within 10 s. The budget matters most for the
# errors that are slow to arrive (a pool timeout, a statement timeout): retrying them
# without one would hold the caller for minutes and pile load on a server that is
# already too slow to answer.
DEFAULT_RETRY = RetryPolicy(deadline=10.0)
# Start-up: keep trying for up to 30 s while the database comes up.
STARTUP_RETRY = RetryPolicy(max_attempts=1000, initial_delay=0.1, max_delay=2.0, deadline=30.0)


class _Budget:
    """Shared bookkeeping of the sync and async retry loops.

    Retries ``TransientError``; retries ``CommitOutcomeUnknownError`` only when the
    caller declared the work ``idempotent``, and counts such attempts, so that a final
    ``RetryExhaustedError`` can say that the work may have been stored.
    """

    def __init__(self, policy: RetryPolicy, on_retry: Callable[[Attempt], None] | None, *,
                 idempotent: bool = False) -> None:
        self.policy = policy
        self.on_retry = on_retry
        self.idempotent = idempotent
        self.start = time.monotonic()
        self.delays = policy.delays()
        self.attempts = 0
        self.unknown_commits = 0

    def failed(self, exc: BaseException) -> float:
        """Classify a failure; return the delay before the next try, or raise."""
        if not is_database_error(exc):
            raise exc  # the caller's own bug: not ours to classify or retry
        error = translate_error(exc)
        if isinstance(error, CommitOutcomeUnknownError):
            self.unknown_commits += 1
            if not self.idempotent:
                logger.warning("attempt %d: the answer to COMMIT was lost, the outcome is "
                               "unknown; not retried (the work is not declared idempotent)",
                               self.attempts)
                self._give_up(error, exc)
        elif not isinstance(error, TransientError):
            self._give_up(error, exc)
        elapsed = time.monotonic() - self.start
        delay = next(self.delays, None)
        deadline = self.policy.deadline
        if delay is not None and deadline is not None and elapsed + delay > deadline:
            delay = None
        if delay is None:
            budget = f"{self.policy.max_attempts} attempts"
            if deadline is not None:
                budget += f" / {deadline:g} s"
            message = (f"gave up after {self.attempts} attempt(s) in {elapsed:.2f} s (budget: "
                       f"{budget}); last error: {type(error).__name__}: {error}")
            if self.unknown_commits:
                message += (f" -- {self.unknown_commits} attempt(s) lost the answer to "
                            f"COMMIT: the work may have been stored")
            raise RetryExhaustedError(message, attempts=self.attempts, elapsed=elapsed,
                                      last_error=error) from exc
        attempt = Attempt(number=self.attempts, error=error, delay=delay, elapsed=elapsed)
        logger.info("attempt %d failed with %s; retrying in %.2f s", self.attempts,
                    type(error).__name__, delay)
        if self.on_retry is not None:
            self.on_retry(attempt)
        return delay

    @staticmethod
    def _give_up(error: LabkitError, exc: BaseException) -> NoReturn:
        """Raise ``error`` for ``exc`` at once, keeping a labkit error's own cause."""
        if error is exc:
            raise exc  # already ours (e.g. from session_scope): its __cause__ is the driver's
        raise error from exc


def retry(fn: Callable[[], T], *, policy: RetryPolicy = DEFAULT_RETRY,
          on_retry: Callable[[Attempt], None] | None = None, idempotent: bool = False) -> T:
    """Call ``fn()`` until it succeeds, retrying transient failures with backoff.

    Args:
        fn: the unit of work; called again from scratch after each transient failure.
        policy: attempts, delays and time budget.
        on_retry: called with the failed ``Attempt`` before each sleep.
        idempotent: also retry ``CommitOutcomeUnknownError`` (a COMMIT whose answer was
            lost), because running ``fn`` twice has the same effect as once.

    Returns:
        What ``fn()`` returned.

    Raises:
        CommitOutcomeUnknownError: at once, unless ``idempotent``.
        RetryExhaustedError: the budget ran out; ``last_error`` says why, and the
            message says when an attempt may have been committed.
        LabkitError: at once, for a non-transient database failure. Anything that is
            not a database error propagates unchanged after one attempt.
    """
    budget = _Budget(policy, on_retry, idempotent=idempotent)
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
    budget = _Budget(policy, on_retry, idempotent=idempotent)
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

    Each attempt starts from scratch in a new session. Retried: transient failures
    that leave nothing committed (a connection lost before ``COMMIT``, a serialization
    failure, a pool timeout). Not retried unless ``idempotent=True``: a connection lost
    while ``COMMIT`` was in flight (``CommitOutcomeUnknownError``), because the server
    may have committed, and running ``work`` again would then do it twice.

    Declare ``idempotent=True`` only for work whose second run changes nothing after a
    first run that committed, e.g. a write keyed by an idempotency key the caller
    chose before the first attempt (see the example). Read-only work is idempotent too.

    Args:
        factory: the session factory; one new session per attempt.
        work: the transaction's body; its return value is returned.
        policy: attempts, delays and time budget.
        on_retry: called with the failed ``Attempt`` before each retry (with
            ``idempotent=True`` its ``error`` may be a ``CommitOutcomeUnknownError``).
        idempotent: retry a commit whose outcome is unknown too.

    Returns:
        What ``work`` returned in the attempt that committed.

    Raises:
        CommitOutcomeUnknownError: the answer to COMMIT was lost (unless ``idempotent``):
            look the work up, or make it idempotent.
        RetryExhaustedError: transient failures used up ``policy``.

    Example:
        ```python
        key = request.headers["Idempotency-Key"]   # chosen once, before any attempt

        def pay(session: Session) -> None:
            session.execute(text(
                "INSERT INTO payments (key, amount) VALUES (:key, :amount) "
                "ON CONFLICT (key) DO NOTHING"), {"key": key, "amount": 100})

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


def _attempt_timeout(policy: RetryPolicy, started: float) -> float:
    """How long one start-up probe may wait: the time left in the budget, at most 5 s."""
    if policy.deadline is None:
        return PROBE_TIMEOUT
    left = policy.deadline - (time.monotonic() - started)
    return max(0.05, min(PROBE_TIMEOUT, left))


def wait_for_database(engine: Engine, *, policy: RetryPolicy = STARTUP_RETRY,
                      on_retry: Callable[[Attempt], None] | None = None) -> int:
    """Block until the database answers a health probe; return the number of attempts.

    For start-up, when the application may come up before its database. Each attempt is
    a ``check_database`` bounded by the time left in ``policy.deadline`` (at most 5 s),
    so a server that hangs cannot hold start-up past the deadline. A wrong password or
    database name fails at once (not transient); a server that stays down raises
    ``RetryExhaustedError`` by ``policy.deadline`` seconds.
    """
    from labkit.health import check_database

    attempts = 0
    started = time.monotonic()

    def probe() -> None:
        nonlocal attempts
        attempts += 1
        check_database(engine, timeout=_attempt_timeout(policy, started))

    retry(probe, policy=policy, on_retry=on_retry)
    return attempts


async def async_wait_for_database(engine: AsyncEngine, *, policy: RetryPolicy = STARTUP_RETRY,
                                  on_retry: Callable[[Attempt], None] | None = None) -> int:
    """Async twin of ``wait_for_database``."""
    from labkit.health import async_check_database

    attempts = 0
    started = time.monotonic()

    async def probe() -> None:
        nonlocal attempts
        attempts += 1
        await async_check_database(engine, timeout=_attempt_timeout(policy, started))

    await async_retry(probe, policy=policy, on_retry=on_retry)
    return attempts
