"""Exercises of notebook 11 (drivers): a psycopg_pool sized for a burst."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from psycopg_pool import ConnectionPool, PoolTimeout
from sqlalchemy.engine import URL

from labkit.lab.drivers import libpq_conninfo
from labkit.lab.exercises import ExerciseFailed, exercise, is_number, require, unique_name

BURST = 10            # requests arriving at once
HOLD_S = 0.3          # each holds its connection this long
MAX_TIMEOUT_S = 0.5   # the longest a request may wait for a connection
BUDGET = 6            # connections this process may hold on the server


@exercise("11.1", title="A psycopg_pool too small for its burst",
          hint=f"psycopg_pool serves the {BURST} requests first come, first served, in waves "
               f"of max_size; a request in wave k waits k x {HOLD_S:g} s. Within timeout = "
               f"{MAX_TIMEOUT_S:g} s only two waves fit: how many connections does that take? "
               f"Stay within {BUDGET}, and keep them open (min_size) so that the burst does "
               "not wait for connections being opened.")
def burst_psycopg_pool(namespace: Mapping[str, Any], url: URL) -> str:
    """Send 10 requests at once, each holding a connection 0.3 s, through the learner's pool.

    Passes when every request gets a connection within 0.5 s (no ``PoolTimeout``), with
    ``timeout`` at most 0.5 s and at most 6 connections.
    """
    min_size = require(namespace, "MIN_SIZE", is_number, what="a number")
    max_size = require(namespace, "MAX_SIZE", is_number, what="a number")
    timeout = require(namespace, "TIMEOUT", is_number, what="a number of seconds")
    if min_size < 0 or max_size < 1 or min_size > max_size or timeout <= 0:
        raise ExerciseFailed(f"MIN_SIZE={min_size}, MAX_SIZE={max_size}, TIMEOUT={timeout}: "
                             "psycopg_pool needs 0 <= min_size <= max_size, max_size >= 1 "
                             "and a timeout > 0")
    if timeout > MAX_TIMEOUT_S:
        raise ExerciseFailed(f"TIMEOUT={timeout:g} s: a request may wait at most "
                             f"{MAX_TIMEOUT_S:g} s for a connection; a longer timeout only "
                             "hides the queue")
    if max_size > BUDGET:
        raise ExerciseFailed(f"MAX_SIZE={max_size}: the server can give this process at most "
                             f"{BUDGET} connections")
    pool = ConnectionPool(libpq_conninfo(url, application_name=unique_name("labkit-ex11"),
                                         connect_timeout=3),
                          min_size=int(min_size), max_size=int(max_size),
                          timeout=float(timeout), open=False)
    waits: list[float] = []
    timeouts: list[float] = []
    lock = threading.Lock()

    def request() -> None:
        start = time.perf_counter()
        try:
            with pool.connection() as conn:
                waited = time.perf_counter() - start
                conn.execute("SELECT pg_sleep(%s)", (HOLD_S,))
            with lock:
                waits.append(waited)
        except PoolTimeout:
            with lock:
                timeouts.append(time.perf_counter() - start)

    try:
        pool.open(wait=True, timeout=10.0)          # min_size connections open before the burst
        threads = [threading.Thread(target=request, daemon=True) for _ in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10.0)
    finally:
        pool.close()
    waves = math.ceil(BURST / int(max_size))
    if timeouts or len(waits) < BURST:
        raise ExerciseFailed(
            f"{len(timeouts)} of {BURST} requests gave up with PoolTimeout after "
            f"{max(timeouts, default=0):.2f} s: {int(max_size)} connections serve the burst in "
            f"{waves} waves of {HOLD_S:g} s, and the last wave would wait longer than "
            f"timeout = {timeout:g} s")
    longest = max(waits)
    if longest > MAX_TIMEOUT_S:
        raise ExerciseFailed(f"the slowest request waited {longest:.2f} s for a connection, "
                             f"more than {MAX_TIMEOUT_S:g} s")
    return (f"{BURST} requests, {int(max_size)} connections, {waves} waves: all served, "
            f"the longest wait {longest:.2f} s")
