"""At its deadline, cut a blocking call's socket: a hung server ACKs TCP, keepalives miss it."""

from __future__ import annotations

import contextlib
import heapq
import os
import socket
import threading
import time

__all__ = ["Ticket", "arm"]
_cond = threading.Condition()
_heap: list[tuple[float, int, Ticket]] = []  # (deadline, id(ticket), ticket)
_thread: threading.Thread | None = None


class Ticket:
    """One armed deadline (``deadline`` on ``time.monotonic()``'s clock)."""

    def __init__(self, fileno: int, deadline: float) -> None:
        self.fileno, self.deadline, self.fired, self.active = fileno, deadline, False, True

    def disarm(self) -> bool:
        """Stop watching; True when the deadline had passed and the socket was cut."""
        with _cond:
            self.active = False
            return self.fired


def arm(fileno: int, seconds: float) -> Ticket:
    """Cut socket ``fileno`` after ``seconds`` unless the ticket is disarmed first."""
    global _thread
    ticket = Ticket(fileno, time.monotonic() + max(0.0, seconds))
    with _cond:
        heapq.heappush(_heap, (ticket.deadline, id(ticket), ticket))
        if _thread is None or not _thread.is_alive():  # also after a fork
            (_thread := threading.Thread(target=_run, name="labkit-watchdog", daemon=True)).start()
        _cond.notify()
    return ticket


def _run() -> None:  # one daemon thread: drop disarmed tickets, shutdown() sockets past due
    while True:
        with _cond:
            if not _heap or (_heap[0][2].active and _heap[0][0] > time.monotonic()):
                _cond.wait(timeout=_heap[0][0] - time.monotonic() if _heap else None)
                continue
            ticket = heapq.heappop(_heap)[2]  # due, or disarmed
            ticket.fired, ticket.active = ticket.active, False  # under the lock: disarm sees it
            if ticket.fired:  # shutdown() on a duplicate fd: closing it leaves the original open
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(ticket.fileno)) as s:
                    s.shutdown(socket.SHUT_RDWR)
