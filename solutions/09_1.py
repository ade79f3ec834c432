"""Exercise 09.1, solved: tell labkit the URL is a transaction-mode pooler.

What was wrong: labkit sent ``statement_timeout`` as a startup parameter, which
PgBouncer refuses ("unsupported startup parameter"); and asyncpg's named, cached
prepared statements (``__asyncpg_stmt_1__``, ... numbered per process) clash with those
another worker left on the server connection PgBouncer hands over. With
``behind_pooler=True`` labkit sends only ``application_name`` at connect, sets the
timeout per transaction with ``SET LOCAL``, turns asyncpg's statement caches off and
names every prepared statement uniquely.
"""

from labkit import Settings


def make_settings(url):
    """Settings for a service whose URL points at PgBouncer in transaction mode.

    Every statement must still run under a 2 s statement timeout.
    """
    return Settings(url=url, application_name="labkit-exercise-09-1", statement_timeout_ms=2000,
                    behind_pooler=True)
