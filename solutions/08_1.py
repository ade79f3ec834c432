"""Exercise 08.1, solved: a client-side deadline on every statement.

What was wrong: the engine relied on TCP keepalives to notice a dead connection. A proxy
(or load balancer) that forgets a flow silently is itself a TCP endpoint: its kernel
answers the keepalive probes, so the client's kernel sees a healthy connection and the
query waits for an answer that never comes. Only a deadline the client keeps itself
holds whatever breaks: ``labkit.deadline.bound_statements`` (its watchdog cuts the
socket when a statement runs longer, and the statement fails with ``QueryTimeoutError``).
Keepalives still help against a real partition, so they stay.
"""

import labkit
import labkit.network.tcp
from labkit import Settings
from labkit.deadline import bound_statements
from labkit.network.tcp import TcpSettings


def make_engine(url):
    """An engine whose statements give control back within 3 s, whatever the network does."""
    settings = Settings(url=url, application_name="labkit-exercise-07-1")
    keepalives = TcpSettings(keepalive_idle=1, keepalive_interval=1, keepalive_count=2)
    engine = labkit.network.tcp.create_engine(
        settings, keepalives, pool=labkit.DEVELOPMENT_POOL.replace(pool_size=1, max_overflow=0))
    bound_statements(engine, 1.5)   # every statement: an answer within 1.5 s, or cut
    return engine
