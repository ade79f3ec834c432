"""`benchmarks/run.py` writes records of the documented shape and a chart (a tiny run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_writes_json_records_and_a_png(tmp_path, db_url):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"),
                           "--concurrency", "2", "--duration", "0.5", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "results.json").read_text())
    clients = {r["client"] for r in records}
    assert {"pgbench (C, same transaction)", "asyncpg raw (pool)", "psycopg2 raw (threads)",
            "SQLAlchemy Core (sync)", "SQLAlchemy ORM session (sync)",
            "SQLAlchemy ORM session (async)", "labkit session_scope (sync)",
            "labkit async_session_scope (async)", "health_check (warm pool)"} <= clients
    for r in records:
        assert {"client", "concurrency", "tps", "p50_ms", "p99_ms"} <= set(r)
        assert r["tps"] > 0
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "ratios" in proc.stdout and "[1/" in proc.stderr  # table and progress shown
    assert (db_url.password or "\0") not in proc.stdout + proc.stderr
