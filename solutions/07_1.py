"""Solution 07.1: bound both waits of a checkout.

What was wrong: nothing limited how long a request waits for a connection. From a full
pool it waited SQLAlchemy's default ``pool_timeout`` of 30 s; against a server that
accepts the TCP connection and then never answers (frozen, overloaded, a half-open
network path), libpq's default is to wait for ever. ``pool_timeout`` bounds the first
wait, the driver's ``connect_timeout`` the second; a request then fails in about 2 s and
can be answered with a 503 while the pool or the server recovers.
"""

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL


def make_engine(url: URL) -> Engine:
    """The service's engine: 2 pooled connections; a checkout fails within 2 s, whatever happens."""
    return create_engine(url, pool_size=2, max_overflow=0,
                         pool_timeout=2,                        # waiting for a free connection
                         connect_args={"connect_timeout": 2})   # waiting for the server
