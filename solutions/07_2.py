"""Solution 07.2: an idempotency key, then the promise.

What was wrong: when the answer to ``COMMIT`` is lost, the payment may be stored or
not. ``run_in_transaction`` rightly refused to guess and raised
``CommitOutcomeUnknownError``. Declaring the plain ``INSERT`` idempotent is not the fix:
the retry inserts the same payment again, and the primary key rejects it
(``IntegrityError``) although the first attempt was committed. With
``ON CONFLICT (payment) DO NOTHING`` a second run after a committed first one changes
nothing; only then is ``idempotent=True`` true, and the retry is safe.
"""

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from labkit import RetryPolicy, run_in_transaction

RECORD = text("INSERT INTO payments (payment, amount) VALUES (:payment, :amount) "
              "ON CONFLICT (payment) DO NOTHING")


def pay(factory: sessionmaker[Session], payment: str, amount: int) -> None:
    """Record payment ``payment`` exactly once, even when the answer to its COMMIT is lost."""
    run_in_transaction(factory,
                       lambda session: session.execute(RECORD, {"payment": payment,
                                                                "amount": amount}),
                       idempotent=True,    # true now: a second run changes nothing
                       policy=RetryPolicy(max_attempts=3, initial_delay=0.01))
