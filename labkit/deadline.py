"""Deadlines the drivers cannot enforce themselves: a watchdog that cuts a connection's socket.

A server that accepts TCP but never answers (a frozen process, a paused VM, a proxy or
pooler whose backend hangs) keeps the kernel ACKing, so neither TCP keepalives nor
``tcp_user_timeout`` notice anything, and libpq has no client-side deadline for a query
on an open connection. A blocked ``recv`` ends only when the socket does. The watchdog
does exactly that: one daemon thread keeps a heap of deadlines and, when one passes,
calls ``shutdown(SHUT_RDWR)`` on the connection's socket. The blocked driver call then
fails at once (psycopg2: "server closed the connection unexpectedly"; asyncpg: the
connection is closed), and the pool discards the connection.

labkit uses it for:

- the pool's pre-ping (``bound_pre_ping``): a checkout from a warm pool fails within the
  ping timeout instead of hanging on a hung server;
- the health probe (``labkit.health``), which always answers within its timeout;
- optionally, every statement of a sync engine (``bound_statements``): the client-side
  twin of asyncpg's ``command_timeout``.

Arming and disarming cost a lock and a heap operation (microseconds), never a thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from labkit.errors import DatabaseUnavailableError, QueryTimeoutError

__all__ = [
    "Ticket",
    "Watchdog",
    "bound_pre_ping",
    "bound_statements",
    "connection_fileno",
    "watchdog",
]

logger = logging.getLogger("labkit")


class Ticket:
    """One armed deadline; ``disarm()`` before the connection is used for anything else."""

    __slots__ = ("deadline", "fileno", "fired", "_active", "_watchdog")

    def __init__(self, watchdog: Watchdog, fileno: int, deadline: float) -> None:
        self._watchdog = watchdog
        self.fileno = fileno
        self.deadline = deadline
        self.fired = False
        self._active = True

    def disarm(self) -> bool:
        """Stop watching; return True when the deadline had already cut the socket."""
        return self._watchdog._disarm(self)


class Watchdog:
    """A single daemon thread that shuts sockets down when their deadline passes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Ticket]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, fileno: int, seconds: float) -> Ticket:
        """Cut the socket ``fileno`` after ``seconds`` unless disarmed before."""
        ticket = Ticket(self, fileno, time.monotonic() + max(0.0, seconds))
        with self._cond:
            heapq.heappush(self._heap, (ticket.deadline, next(self._seq), ticket))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="labkit-watchdog",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is ticket:
                self._cond.notify()
        return ticket

    def _disarm(self, ticket: Ticket) -> bool:
        with self._cond:
            ticket._active = False
            return ticket.fired

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and not self._heap[0][2]._active:
                    heapq.heappop(self._heap)
                if not self._heap:
                    # Sleep until armed again; wake now and then to drop cancelled entries.
                    self._cond.wait(timeout=1.0)
                    continue
                deadline, _, ticket = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(timeout=delay)
                    continue
                heapq.heappop(self._heap)
                # Fired under the lock: a disarmed ticket's socket is never touched, so a
                # file descriptor reused after close cannot be cut by mistake.
                ticket._active = False
                ticket.fired = True
                _shutdown(ticket.fileno)


def _shutdown(fileno: int) -> None:
    try:
        sock = socket.socket(fileno=_dup(fileno))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or not connected: nothing left to cut
    finally:
        sock.close()  # closes the duplicate only


def _dup(fileno: int) -> int:
    import os

    return os.dup(fileno)


watchdog = Watchdog()
"""The process-wide watchdog labkit arms."""


def connection_fileno(dbapi_connection: Any) -> int | None:
    """Return the socket descriptor of a psycopg2 or asyncpg (via SQLAlchemy) connection."""
    fileno = getattr(dbapi_connection, "fileno", None)
    if callable(fileno):  # psycopg2
        try:
            return int(fileno())
        except Exception:  # noqa: BLE001 - a closed connection has no socket
            return None
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    transport = getattr(driver, "_transport", None)  # asyncpg.Connection
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else None
    except Exception:  # noqa: BLE001
        return None


def bound_pre_ping(engine: Engine, seconds: float) -> None:
    """Make the pool's pre-ping fail within ``seconds`` however the server is broken.

    SQLAlchemy's pre-ping is a ``SELECT 1`` with no deadline: on a hung server it waits
    forever while holding the caller. Bounded, a ping that times out raises
    ``DatabaseUnavailableError`` at once (no reconnect attempt: a server that does not
    answer a ping will not answer a login either), and the pool discards the connection.
    A ping that fails fast (server restarted) still makes the pool reconnect, as before.
    """
    dialect = engine.dialect
    original = dialect.do_ping

    def do_ping(dbapi_connection: Any) -> bool:
        fileno = connection_fileno(dbapi_connection)
        if fileno is None:
            return bool(original(dbapi_connection))
        ticket = watchdog.arm(fileno, seconds)
        try:
            result = bool(original(dbapi_connection))
        except BaseException as exc:
            if ticket.disarm():
                raise _ping_timeout(seconds) from exc
            raise
        if ticket.disarm():
            raise _ping_timeout(seconds)
        return result

    dialect.do_ping = do_ping  # type: ignore[method-assign]


def _ping_timeout(seconds: float) -> DatabaseUnavailableError:
    return DatabaseUnavailableError(
        f"The server accepted the connection but did not answer the pool's pre-ping within "
        f"{seconds:g} s (connect_timeout): it is hung or overloaded, or the network between "
        "you drops packets. The connection was closed; nothing was sent on it.")


def bound_statements(engine: Engine, seconds: float) -> None:
    """Give every statement of a sync engine a client-side deadline of ``seconds``.

    ``statement_timeout`` lets the *server* cancel a slow statement; it cannot help when
    the server (or the path to it) stops answering. At the deadline the watchdog cuts
    the socket: the statement fails with ``QueryTimeoutError`` and the connection is
    discarded. Set it above ``statement_timeout`` so the server gets to cancel first.
    """
    key = "labkit_deadline_ticket"

    @event.listens_for(engine, "before_cursor_execute")
    def arm(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
            executemany: bool) -> None:
        fileno = connection_fileno(conn.connection.dbapi_connection)
        if fileno is not None:
            conn.info[key] = watchdog.arm(fileno, seconds)

    @event.listens_for(engine, "after_cursor_execute")
    def disarm(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        ticket = conn.info.pop(key, None)
        if ticket is not None:
            ticket.disarm()

    @event.listens_for(engine, "handle_error")
    def timed_out(context: Any) -> Any:
        conn = context.connection
        ticket = conn.info.pop(key, None) if conn is not None else None
        if ticket is None or not ticket.disarm():
            return None
        context.is_disconnect = True  # the socket is cut: the pool must discard it
        context.invalidate_pool_on_disconnect = False  # only this connection
        error = QueryTimeoutError(
            f"The statement got no answer within {seconds:g} s (command_timeout): the "
            "server or the network stopped answering. The connection was closed; if this "
            "was a COMMIT, its outcome is unknown.")
        error.__cause__ = context.original_exception
        return error

    # COMMIT and ROLLBACK are not cursor executions: bound them at the dialect. A cut
    # COMMIT surfaces as a lost connection (its outcome unknown); a cut ROLLBACK lets the
    # pool discard the connection instead of hanging the caller's cleanup.
    dialect = engine.dialect
    for name in ("do_commit", "do_rollback"):
        setattr(dialect, name, _bounded(getattr(dialect, name), seconds))


def _bounded(method: Any, seconds: float) -> Any:
    def call(dbapi_connection: Any) -> Any:
        fileno = connection_fileno(dbapi_connection)
        if fileno is None:
            return method(dbapi_connection)
        ticket = watchdog.arm(fileno, seconds)
        try:
            return method(dbapi_connection)
        finally:
            ticket.disarm()

    return call
