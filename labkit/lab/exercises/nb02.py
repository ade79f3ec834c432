"""Exercises of notebook 02 (pool behaviour): a pool sized for a burst."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL

from labkit.lab.exercises import (ExerciseFailed, exercise, is_number, require, scratch_engine,
                                  unique_name)

BURST = 12            # requests arriving at once
HOLD_S = 0.3          # each holds its connection this long
MAX_TIMEOUT_S = 0.5   # the longest a request may wait for a connection
BUDGET = 8            # connections this process may hold on the server


@exercise("02.1", title="A pool too small for its burst",
          hint=f"{BURST} requests of {HOLD_S:g} s at once are served in waves of "
               "pool_size + max_overflow; a request in wave k waits k x 0.3 s. Within "
               "pool_timeout = 0.5 s only two waves fit: how many connections does that "
               f"take? Stay within {BUDGET} in all.")
def burst_pool(namespace: Mapping[str, Any], url: URL) -> str:
    """Send a burst of 12 requests holding a connection 0.3 s each through the learner's pool.

    Passes when every request gets a connection (no pool timeout) within 0.5 s, with
    ``pool_timeout`` at most 0.5 s and at most 8 connections in all.
    """
    size = require(namespace, "POOL_SIZE", is_number, what="a number")
    overflow = require(namespace, "MAX_OVERFLOW", is_number, what="a number")
    timeout = require(namespace, "POOL_TIMEOUT", is_number, what="a number of seconds")
    if size < 1 or overflow < 0 or timeout <= 0:
        raise ExerciseFailed(f"POOL_SIZE={size}, MAX_OVERFLOW={overflow}, POOL_TIMEOUT="
                             f"{timeout}: the size must be >= 1, the overflow >= 0 and the "
                             "timeout > 0")
    if timeout > MAX_TIMEOUT_S:
        raise ExerciseFailed(f"POOL_TIMEOUT={timeout:g} s: a request may wait at most "
                             f"{MAX_TIMEOUT_S:g} s for a connection; a longer timeout only "
                             "hides the queue")
    if size + overflow > BUDGET:
        raise ExerciseFailed(f"POOL_SIZE + MAX_OVERFLOW = {size + overflow}: the server can "
                             f"give this process at most {BUDGET} connections")
    engine = scratch_engine(url, application_name=unique_name("labkit-ex02"),
                            pool_size=int(size), max_overflow=int(overflow),
                            pool_timeout=float(timeout))
    waits: list[float] = []
    timeouts: list[float] = []
    lock = threading.Lock()

    def request() -> None:
        start = time.perf_counter()
        try:
            with engine.connect() as conn:
                waited = time.perf_counter() - start
                conn.execute(text("SELECT pg_sleep(:s)"), {"s": HOLD_S})
            with lock:
                waits.append(waited)
        except sa_exc.TimeoutError:
            with lock:
                timeouts.append(time.perf_counter() - start)

    try:
        held = [engine.connect() for _ in range(int(size))]   # the kept connections, opened
        for conn in held:
            conn.close()
        threads = [threading.Thread(target=request, daemon=True) for _ in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10.0)
    finally:
        engine.dispose()
    connections = int(size + overflow)
    if timeouts or len(waits) < BURST:
        raise ExerciseFailed(
            f"{len(timeouts)} of {BURST} requests gave up with a pool timeout after "
            f"{max(timeouts, default=0):.2f} s: {connections} connections serve the burst in "
            f"{math.ceil(BURST / connections)} waves of {HOLD_S:g} s, and the last wave "
            f"would wait longer than pool_timeout = {timeout:g} s")
    longest = max(waits)
    if longest > MAX_TIMEOUT_S:
        raise ExerciseFailed(f"the slowest request waited {longest:.2f} s for a connection, "
                             f"more than {MAX_TIMEOUT_S:g} s")
    return (f"{BURST} requests, {connections} connections, "
            f"{math.ceil(BURST / connections)} waves: all served, the longest wait "
            f"{longest:.2f} s")
