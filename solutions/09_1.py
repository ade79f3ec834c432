"""Exercise 09.1, solved: build the engine for a transaction-mode pooler (``labkit.network.pooler``).

What was wrong: ``labkit.create_async_engine`` sent ``statement_timeout`` as a startup
parameter, which PgBouncer refuses ("unsupported startup parameter"); and asyncpg's
named, cached prepared statements (``__asyncpg_stmt_1__``, ... numbered per process)
clash with those another worker left on the server connection PgBouncer hands over.
``labkit.network.pooler.create_async_engine`` sends only ``application_name`` at connect, sets
the timeout per transaction with ``SET LOCAL``, turns asyncpg's statement caches off and
names every prepared statement uniquely.
"""

from labkit import Settings
from labkit.network import pooler


def make_engine(url):
    """An async engine for a service whose URL points at PgBouncer in transaction mode.

    Every statement must still run under a 2 s statement timeout.
    """
    settings = Settings(url=url, application_name="labkit-exercise-09-1", statement_timeout_ms=2000)
    return pooler.create_async_engine(settings)
