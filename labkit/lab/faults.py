"""Fault injection against a *throwaway* local server; every fault is undone on exit.

Destructive experiments never touch the learner's database: ``throwaway_server``
starts a private PostgreSQL in a temporary folder (even when ``DATABASE_URL`` points
elsewhere) and deletes it afterwards. Each fault is a context manager, so a failing cell
still resumes a paused server or starts a stopped one:

```python
with throwaway_server() as server:
    with paused(server):          # SIGSTOP: a hung server (not a partition)
        ...
    with stopped(server):         # down, then started again on the same port
        ...
```
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, text

from labkit.lab.server import LocalServer, Namespace

__all__ = [
    "connections_exhausted",
    "paused",
    "paused_backend",
    "restart",
    "stopped",
    "terminate_backends",
    "throwaway_server",
]


@contextlib.contextmanager
def throwaway_server(*, settings: dict[str, str] | None = None,
                     prefix: str = "labkit-throwaway-",
                     netns: Namespace | None = None) -> Iterator[LocalServer]:
    """Start a private PostgreSQL for destructive experiments; destroy it on exit.

    With ``netns`` (a ``labkit.lab.netns.NetworkNamespace``) the server listens on
    that namespace's own loopback: only connections opened inside reach it, and
    network faults in the namespace (a partition) never touch the host.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix)) / "server"
    server = LocalServer(root, settings=settings, netns=netns)

    def clean_up() -> None:
        server.destroy()
        shutil.rmtree(root.parent, ignore_errors=True)

    # A notebook may never reach its last cell: clean up when the kernel exits, too.
    atexit.register(clean_up)
    try:
        server.ensure_running()
        yield server
    finally:
        clean_up()
        atexit.unregister(clean_up)


def restart(server: LocalServer, mode: str = "fast") -> float:
    """Restart the server (``fast``: clean; ``immediate``: crash-like); return seconds down."""
    start = time.perf_counter()
    server.restart(mode)  # type: ignore[arg-type]
    return time.perf_counter() - start


@contextlib.contextmanager
def stopped(server: LocalServer, mode: str = "fast") -> Iterator[None]:
    """Stop the server for the duration of the block, then start it again."""
    server.stop(mode)  # type: ignore[arg-type]
    try:
        yield
    finally:
        server.start()


@contextlib.contextmanager
def paused(server: LocalServer) -> Iterator[None]:
    """Freeze the whole server (SIGSTOP): a hung server, not a network partition.

    The kernel still accepts connections and ACKs every byte, so TCP keepalives and
    ``tcp_user_timeout`` see a healthy connection; only client-side deadlines end the wait.
    """
    server.pause()
    try:
        yield
    finally:
        server.resume()


@contextlib.contextmanager
def paused_backend(pid: int) -> Iterator[None]:
    """Freeze one server backend process (SIGSTOP): one hung connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def terminate_backends(admin: Engine, application_name: str) -> int:
    """Kill every backend of ``application_name`` (``pg_terminate_backend``); return count."""
    with admin.connect() as conn:
        killed: int = conn.execute(text(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = :app AND pid <> pg_backend_pid()"),
            {"app": application_name}).scalar_one()
    return int(killed)


@contextlib.contextmanager
def connections_exhausted(server: LocalServer, *, leave: int = 0) -> Iterator[int]:
    """Hold server connections until ``max_connections`` minus ``leave`` are in use.

    Yields how many this context opened; closes them on exit.
    """
    import psycopg2

    info = server.info()
    held = []
    try:
        while True:
            try:
                held.append(info.connect(application_name="labkit-hog"))
            except psycopg2.OperationalError as exc:
                if "too many clients" not in str(exc) and "remaining connection slots" not in str(exc):
                    raise
                break
        for _ in range(min(leave, len(held))):
            held.pop().close()
        yield len(held)
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                conn.close()
