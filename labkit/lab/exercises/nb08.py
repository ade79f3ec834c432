"""Exercises of notebook 08, the network between app and database.

08.1: a query must get control back within a bound when a proxy forgets its flow
silently (TCP keepalives cannot see it: the proxy's kernel answers them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from labkit.errors import translate_error
from labkit.lab.exercises import ExerciseFailed, exercise, require
from labkit.lab.proxy import FaultProxy

BOUND_S = 3.0        # the caller must get control back within this, from the query's start
FORGET_AFTER_S = 0.4  # the proxy forgets a flow idle this long
SLOW_QUERY = "SELECT pg_sleep(4)"
GIVE_UP_S = BOUND_S + 1.0  # the check stops waiting here (and cuts the connection)


def _outcome(fn: Any, give_up: float) -> tuple[float | None, BaseException | None, bool]:
    """Run ``fn`` in a daemon thread; return (seconds, its error, finished in time)."""
    box: dict[str, Any] = {}

    def run() -> None:
        start = time.perf_counter()
        try:
            fn()
            box["error"] = None
        except Exception as exc:  # noqa: BLE001 - reported to the learner
            box["error"] = exc
        box["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=run, name="labkit-exercise-08.1", daemon=True)
    worker.start()
    worker.join(give_up)
    if worker.is_alive():
        return None, None, False
    return box["seconds"], box["error"], True


@exercise("08.1", title="A query that cannot wait forever",
          hint="TCP keepalives are answered by the proxy's own kernel, so they never fire "
               "here. Give every statement a client-side deadline below 3 s: "
               "labkit.deadline.bound_statements(engine, seconds) on the engine you return.")
def check_bounded_wait(namespace: Mapping[str, Any], url: URL) -> str:
    """Run a slow query through a proxy that forgets the flow; it must end within 3 s."""
    make_engine = require(namespace, "make_engine", callable)
    with FaultProxy(str(url.host), int(url.port or 5432)) as proxy:
        engine = make_engine(proxy.url(url))
        if not isinstance(engine, Engine):
            raise ExerciseFailed(f"make_engine(url) must return a sync Engine, got "
                                 f"{type(engine).__name__}")
        try:
            conn = engine.connect()
            try:
                # An ordinary query must still work: the deadline may not be absurdly short.
                try:
                    conn.execute(text("SELECT pg_sleep(0.2)"))
                    conn.commit()
                except Exception as exc:
                    raise ExerciseFailed(
                        "an ordinary 0.2 s query failed before any fault: "
                        f"{type(translate_error(exc)).__name__}") from exc
                with proxy.reaping_idle(FORGET_AFTER_S, how="silent"):
                    seconds, error, finished = _outcome(
                        lambda: conn.execute(text(SLOW_QUERY)), GIVE_UP_S)
                    forgotten = proxy.get_stats()["reaped"]
                if not finished:
                    proxy.close()  # frees the waiting thread: its socket gets a FIN
                    raise ExerciseFailed(
                        f"the proxy forgot the connection {FORGET_AFTER_S:g} s into the query "
                        f"and the caller was still waiting after {GIVE_UP_S:g} s (the bound "
                        f"is {BOUND_S:g} s); it would wait forever, since the proxy's kernel "
                        "acknowledges everything and TCP sees nothing wrong")
            finally:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - the connection may be broken by design
                    pass
        finally:
            engine.dispose()
    if error is None:
        raise ExerciseFailed(f"`{SLOW_QUERY}` answered although the proxy forgot its flow "
                             f"({forgotten} reaped): was the query sent through the proxy?")
    if forgotten < 1:
        raise ExerciseFailed("the query failed before the proxy forgot its flow: "
                             f"{type(translate_error(error)).__name__} after {seconds:.2f} s")
    assert seconds is not None
    if seconds > BOUND_S:
        raise ExerciseFailed(f"the caller got control back after {seconds:.1f} s; the bound "
                             f"is {BOUND_S:g} s")
    return (f"the flow was forgotten {FORGET_AFTER_S:g} s into the query; the caller got "
            f"{type(translate_error(error)).__name__} after {seconds:.2f} s "
            f"(bound {BOUND_S:g} s)")
