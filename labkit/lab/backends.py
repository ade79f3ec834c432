"""What a connection costs the server: the memory of its backend process.

Every connection is served by a process of its own on the server (a *backend*), forked
by the postmaster. Two views of its memory:

- ``context_bytes``: what the backend has allocated for itself (its memory contexts:
  catalog caches, plans, buffers of the statement running), read with
  ``pg_backend_memory_contexts`` on that very connection. Works against any server.
- ``process_memory``: what the operating system counts for the process, from
  ``/proc/<pid>/smaps_rollup``. ``rss`` counts every page the process touches, shared
  ones included (the shared buffers, the server's code), so summing it over backends
  counts the shared memory once per backend; ``pss`` charges each shared page to the
  processes sharing it in equal parts, so PSS sums to what the server really uses.
  Only for a server on this machine whose processes this user may read (the kit's local
  server); ``None`` otherwise (a container, another host).

Example:
    ```python
    with engine.connect() as conn:
        context_bytes(conn), process_memory(backend_pid(conn))
        # (1480880, {'rss': 11.2, 'pss': 1.4, 'private': 1.1})
    ```
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, text

__all__ = ["backend_pid", "context_bytes", "process_memory"]

_KEYS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "private", "Private_Dirty": "private"}


def backend_pid(conn: Connection) -> int:
    """The pid of the server process serving ``conn``."""
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def context_bytes(conn: Connection) -> int:
    """Bytes this connection's backend has allocated in its memory contexts."""
    return int(conn.execute(text(
        "SELECT sum(total_bytes) FROM pg_backend_memory_contexts")).scalar_one())


def process_memory(pid: int) -> dict[str, float] | None:
    """``{"rss", "pss", "private"}`` of a server process, in MB; ``None`` if not readable.

    ``None`` also when ``pid`` is not a PostgreSQL process on this machine (a server in
    a container reports pids of its own namespace).
    """
    try:
        if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"postgres"):
            return None
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return None
    out = {"rss": 0.0, "pss": 0.0, "private": 0.0}
    for line in lines:
        key, _, value = line.partition(":")
        if key in _KEYS:
            out[_KEYS[key]] += int(value.split()[0]) / 1024.0
    return out
