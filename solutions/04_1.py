"""Solution 04.1: one transfer, one transaction.

What was wrong: ``session.commit()`` between the debit and the credit ended the
transaction half-way. When the credit then failed (no such account), the debit was
already permanent: the money left one account and arrived nowhere. ``factory.begin()``
opens one transaction for the whole block, commits it when the block ends and rolls all
of it back when anything inside raises.
"""

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

DEBIT = text("UPDATE accounts SET balance = balance - :amount WHERE id = :id")
CREDIT = text("UPDATE accounts SET balance = balance + :amount WHERE id = :id")


def transfer(factory: sessionmaker[Session], source: int, target: int, amount: int) -> None:
    """Move ``amount`` from account ``source`` to account ``target``: all of it or nothing."""
    with factory.begin() as session:          # commits at the end, rolls back on error
        session.execute(DEBIT, {"id": source, "amount": amount})
        credited = session.execute(CREDIT, {"id": target, "amount": amount}).rowcount
        if credited != 1:
            raise LookupError(f"no account {target}")   # rolls the debit back too
