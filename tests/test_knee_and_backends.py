"""The knee sweep (``labkit.lab.knee``) and backend memory (``labkit.lab.backends``), real server."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from labkit import Settings, create_engine
from labkit.lab.backends import backend_pid, context_bytes, process_memory
from labkit.lab.knee import cpu_work, create_hot_row, hot_row_work, knee_rounds, summarize_knee


def test_knee_rounds_run_every_size_in_every_round_with_fixed_work(settings: Settings):
    records = knee_rounds(settings, [1, 3], {"CPU-bound": cpu_work(1000)}, transactions=6,
                          rounds=2)
    assert sorted((r["round"], r["size"]) for r in records) == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["transactions"] == 6 and r["errors"] == 0 and r["tps"] > 0 for r in records)
    summary = summarize_knee(records)["CPU-bound"]
    assert list(summary) == [1, 3]
    assert summary[3]["p99_ms"] >= summary[3]["p50_ms"] > 0


def test_knee_rounds_refuse_fewer_transactions_than_threads(settings: Settings):
    with pytest.raises(ValueError, match="transactions"):
        knee_rounds(settings, [1, 8], {"CPU-bound": cpu_work(10)}, transactions=4, rounds=1)


def test_hot_row_work_counts_every_transaction(settings: Settings):
    engine = create_engine(settings)
    try:
        create_hot_row(engine, "labkit_hot_row_test")
        with engine.connect() as conn:
            before = conn.execute(text("SELECT n FROM labkit_hot_row_test")).scalar_one()
        knee_rounds(settings, [2], {"hot": hot_row_work("labkit_hot_row_test")},
                    transactions=10, rounds=1)
        with engine.connect() as conn:
            after = conn.execute(text("SELECT n FROM labkit_hot_row_test")).scalar_one()
        assert after - before == 20      # 10 in the warm-up slice, 10 recorded
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS labkit_hot_row_test"))
        engine.dispose()


def test_a_backend_reports_its_own_memory_and_grows_with_the_catalog(settings: Settings):
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            fresh = context_bytes(conn)
            conn.execute(text("SELECT count(*) FROM information_schema.columns")).scalar_one()
            assert context_bytes(conn) > fresh > 100_000
            memory = process_memory(backend_pid(conn))
    finally:
        engine.dispose()
    if memory is not None:           # a server on this machine, readable by this user
        assert memory["rss"] > memory["pss"] > 0 and memory["private"] > 0


def test_process_memory_is_none_for_what_it_cannot_read():
    assert process_memory(2**22 + 12345) is None          # no such process
    assert process_memory(1 if Path("/proc/1").exists() else 2**22) is None  # not PostgreSQL
