"""A deadline for a blocking call on a connection: at the deadline, cut its socket.

A hung server (a frozen process, a paused VM) keeps ACKing TCP, so neither keepalives
nor ``tcp_user_timeout`` notice, and libpq has no deadline of its own for a query on an
open connection. One daemon thread keeps a heap of deadlines; when one passes it calls
``shutdown(SHUT_RDWR)`` on the socket, and the blocked driver call fails at once.
Arming and disarming cost a lock and a heap operation, never a thread.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time

__all__ = ["Ticket", "arm"]


class Ticket:
    """One armed deadline; ``disarm()`` returns True if the socket was already cut."""

    __slots__ = ("active", "deadline", "fileno", "fired")

    def __init__(self, fileno: int, deadline: float) -> None:
        self.fileno, self.deadline, self.fired, self.active = fileno, deadline, False, True

    def disarm(self) -> bool:
        """Stop watching; True when the deadline had passed and the socket was cut."""
        with _cond:
            self.active = False
            return self.fired


_cond = threading.Condition()
_heap: list[tuple[float, int, Ticket]] = []
_order = itertools.count()
_thread: threading.Thread | None = None


def arm(fileno: int, seconds: float) -> Ticket:
    """Cut socket ``fileno`` after ``seconds`` unless the ticket is disarmed first."""
    global _thread
    ticket = Ticket(fileno, time.monotonic() + max(0.0, seconds))
    with _cond:
        heapq.heappush(_heap, (ticket.deadline, next(_order), ticket))
        if _thread is None or not _thread.is_alive():  # also after a fork
            _thread = threading.Thread(target=_run, name="labkit-watchdog", daemon=True)
            _thread.start()
        _cond.notify()
    return ticket


def _run() -> None:
    while True:
        with _cond:
            while _heap and not _heap[0][2].active:
                heapq.heappop(_heap)
            if not _heap:
                _cond.wait()
                continue
            delay = _heap[0][0] - time.monotonic()
            if delay > 0:
                _cond.wait(timeout=delay)
                continue
            ticket = heapq.heappop(_heap)[2]
            # Under the lock: a disarmed ticket's descriptor, perhaps reused since, is
            # never touched.
            ticket.active, ticket.fired = False, True
            try:
                sock = socket.socket(fileno=os.dup(ticket.fileno))
            except OSError:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: nothing left to cut
            finally:
                sock.close()  # the duplicate only
