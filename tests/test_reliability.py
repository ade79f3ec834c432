"""Nothing acknowledged is lost: concurrent writers while the server restarts and backends die.

Writers go through labkit's patterns only: a pre-pinged pool, ``run_in_transaction`` (the
whole transaction retried on transient errors) and an idempotent write (a client-chosen
order id with ``ON CONFLICT DO NOTHING``), so a retry after a commit whose answer was lost
cannot write twice. Everything runs on a throwaway server.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from labkit import (
    DEVELOPMENT_POOL,
    TEST_POOL,
    PoolMetrics,
    RetryExhaustedError,
    RetryPolicy,
    Settings,
    create_engine,
    create_sessionmaker,
    run_in_transaction,
)
from labkit.lab.faults import restart, terminate_backends, throwaway_server

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

WRITERS = 4
LINES_PER_ORDER = 3
RECOVERY_BOUND_S = 5.0  # asserted; the aim (2 s) is reported
REPORT = Path(__file__).resolve().parents[1] / "build" / "reliability" / "report.json"


def test_no_acknowledged_write_is_lost_across_restarts_and_killed_backends(capsys):
    with throwaway_server() as server:
        url = server.info().url()
        admin = create_engine(Settings(url=url, application_name="rel-admin"), pool=TEST_POOL)
        with admin.begin() as conn:
            conn.execute(text("CREATE TABLE orders (id bigint PRIMARY KEY, writer int NOT NULL)"))
            conn.execute(text(
                "CREATE TABLE order_lines (order_id bigint NOT NULL REFERENCES orders(id), "
                "n int NOT NULL, PRIMARY KEY (order_id, n))"))
        engine = create_engine(
            Settings(url=url, application_name="rel-writer", connect_timeout=2),
            pool=DEVELOPMENT_POOL.replace(pool_size=WRITERS, max_overflow=0, pool_timeout=10,
                                          pool_pre_ping=True))
        metrics = PoolMetrics.attach(engine)
        factory = create_sessionmaker(engine)
        policy = RetryPolicy(max_attempts=10_000, initial_delay=0.05, max_delay=0.5, deadline=30)

        acked: dict[int, list[tuple[int, float]]] = {w: [] for w in range(WRITERS)}
        gave_up: list[int] = []
        retries = [0]
        stop = threading.Event()
        t0 = time.perf_counter()

        def writer(w: int) -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                order_id = w * 1_000_000 + seq

                def write(session, order_id=order_id) -> None:
                    session.execute(text("INSERT INTO orders VALUES (:id, :w) "
                                         "ON CONFLICT DO NOTHING"), {"id": order_id, "w": w})
                    session.execute(text(
                        "INSERT INTO order_lines SELECT :id, n FROM generate_series(1, :k) n "
                        "ON CONFLICT DO NOTHING"), {"id": order_id, "k": LINES_PER_ORDER})

                try:
                    run_in_transaction(factory, write, policy=policy,
                                       on_retry=lambda a: retries.__setitem__(0, retries[0] + 1))
                except RetryExhaustedError:
                    gave_up.append(order_id)
                    continue
                acked[w].append((order_id, time.perf_counter() - t0))
                time.sleep(0.005)

        faults: list[dict[str, object]] = []

        def inject() -> None:
            plan = [("restart fast", 1.5), ("kill backends", 1.0), ("restart immediate", 1.5),
                    ("kill backends", 1.0), ("restart fast", 1.5), ("kill backends", 1.0)]
            time.sleep(1.0)
            for kind, pause in plan:
                at = time.perf_counter() - t0
                if kind.startswith("restart"):
                    restart(server, kind.split()[1])
                else:
                    terminate_backends(admin, "rel-writer")
                faults.append({"kind": kind, "at": at, "up": time.perf_counter() - t0})
                time.sleep(pause)
            stop.set()

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        injector = threading.Thread(target=inject)
        for t in [*threads, injector]:
            t.start()
        for t in [injector, *threads]:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in [injector, *threads]), "writers did not stop"

        with admin.connect() as conn:
            stored = set(conn.execute(text("SELECT id FROM orders")).scalars())
            partial = conn.execute(text(
                "SELECT count(*) FROM orders o WHERE (SELECT count(*) FROM order_lines l "
                "WHERE l.order_id = o.id) <> :k"), {"k": LINES_PER_ORDER}).scalar_one()
            lines = conn.execute(text("SELECT count(*) FROM order_lines")).scalar_one()
        acknowledged = [oid for w in acked for oid, _ in acked[w]]
        lost = set(acknowledged) - stored
        duplicates = len(acknowledged) - len(set(acknowledged))

        recoveries = []
        for fault in faults:
            for w in range(WRITERS):
                after = [t for _, t in acked[w] if t > float(fault["up"])]  # type: ignore[arg-type]
                if after:
                    recoveries.append(after[0] - float(fault["up"]))  # type: ignore[arg-type]

        before = metrics.snapshot()["invalidations"]
        held = [engine.connect() for _ in range(WRITERS)]
        for conn in held:
            conn.execute(text("SELECT 1"))
        for conn in held:
            conn.close()
        broken_at_end = metrics.snapshot()["invalidations"] - before
        engine.dispose()
        admin.dispose()

    report = {
        "faults_injected": len(faults), "faults": faults,
        "writes_acknowledged": len(acknowledged), "writes_lost": len(lost),
        "duplicates": duplicates, "partial_transactions": partial,
        "lines": lines, "retries": retries[0], "gave_up": len(gave_up),
        "longest_recovery_s": round(max(recoveries), 3) if recoveries else None,
        "median_recovery_s": round(sorted(recoveries)[len(recoveries) // 2], 3)
        if recoveries else None,
        "broken_connections_at_end": broken_at_end,
        "pool": metrics.snapshot(),
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    with capsys.disabled():
        print("\nreliability:", json.dumps({k: v for k, v in report.items()
                                             if k not in ("faults", "pool")}))

    assert len(faults) == 6
    assert len(acknowledged) > 100
    assert not lost, f"acknowledged but missing: {sorted(lost)[:10]}"
    assert duplicates == 0
    assert partial == 0
    assert lines == len(stored) * LINES_PER_ORDER
    assert not gave_up
    assert len(recoveries) == len(faults) * WRITERS, "a writer never recovered after a fault"
    assert max(recoveries) < RECOVERY_BOUND_S
    assert broken_at_end == 0
