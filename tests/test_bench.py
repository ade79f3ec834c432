"""`make bench`: interleaved rounds, medians with their spread, ratios with intervals.

The statistics are checked on numbers whose answer is known; the benchmark itself runs
once in its quick mode against the real server and its output is checked for shape.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.lab import bench

ROOT = Path(__file__).resolve().parents[1]


# --- the statistics ----------------------------------------------------------------------

@pytest.mark.parametrize(("n", "confidence", "k", "coverage"), [
    (8, 0.95, 1, 0.9922),    # only min-max reaches 95 % with 8 values
    (12, 0.95, 3, 0.9614),   # 3rd smallest to 3rd largest
    (12, 0.99, 2, 0.9937),
    (20, 0.95, 6, 0.9586),
])
def test_median_interval_uses_the_widest_order_statistics_that_reach_the_confidence(
        n, confidence, k, coverage):
    values = [float(i) for i in range(1, n + 1)]
    low, high, reached = bench.median_interval(values, confidence)
    assert (low, high) == (k, n + 1 - k)
    assert reached == pytest.approx(coverage, abs=1e-4)
    assert reached >= confidence


def test_median_interval_says_when_too_few_values_reach_the_confidence():
    low, high, reached = bench.median_interval([3.0, 1.0, 2.0], 0.95)
    assert (low, high) == (1.0, 3.0)
    assert reached == pytest.approx(0.75)


def _slices(rounds: dict[int, dict[str, float]], concurrency: int = 4) -> list[dict]:
    return [{"client": client, "concurrency": concurrency, "round": rnd, "tps": tps}
            for rnd, row in rounds.items() for client, tps in row.items()]


def test_paired_ratio_cancels_load_that_both_sides_of_a_round_share():
    # The machine's load swings tenfold between rounds; B is always 10 % slower than A.
    load = [1.0, 0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8]
    cells = _slices({i + 1: {"A": 2000 * x, "B": 1800 * x} for i, x in enumerate(load)})
    ratio = bench.paired_ratio(cells, "B", "A", concurrency=4)
    assert ratio["median"] == ratio["low"] == ratio["high"] == pytest.approx(0.9)
    assert ratio["rounds"] == 8 and ratio["resolves_pct"] == 0.0
    assert ratio["verdict"].startswith("B is slower, by 10.0 to 10.0 %")


def test_paired_ratio_resolves_no_difference_when_the_interval_contains_one():
    per_round = [0.95, 1.04, 0.99, 1.06, 0.97, 1.01, 1.03, 0.98]
    cells = _slices({i + 1: {"A": 1000.0, "B": 1000.0 * r} for i, r in enumerate(per_round)})
    ratio = bench.paired_ratio(cells, "B", "A", concurrency=4, confidence=0.95)
    assert (ratio["low"], ratio["high"]) == (0.95, 1.06)  # 8 rounds: min-max for 95 %
    assert ratio["verdict"].startswith("no difference resolved")
    assert ratio["resolves_pct"] == pytest.approx(max(1.0 - 0.95, 1.06 - 1.0) / 1.0 * 100,
                                                  abs=0.6)


def test_pooled_ratio_is_the_geometric_mean_of_each_rounds_concurrencies():
    cells = (_slices({1: {"A": 100.0, "B": 200.0}, 2: {"A": 100.0, "B": 100.0}}, 4)
             + _slices({1: {"A": 100.0, "B": 50.0}, 2: {"A": 100.0, "B": 400.0}}, 8))
    ratio = bench.paired_ratio(cells, "B", "A")
    assert ratio["concurrency"] == "pooled"
    assert sorted(ratio["per_round"]) == pytest.approx([1.0, 2.0])  # sqrt(2*0.5), sqrt(1*4)


def test_summarize_reports_median_and_spread_per_client_and_concurrency():
    cells = [{"client": "SQLAlchemy Core (sync)", "concurrency": 4, "round": i, "tps": tps,
              "p50_ms": 1.0, "p99_ms": 2.0, "transactions": 10}
             for i, tps in enumerate([100.0, 400.0, 200.0, 300.0, 500.0], start=1)]
    (row,) = bench.summarize(cells)
    assert (row["tps"], row["tps_q1"], row["tps_q3"]) == (300.0, 200.0, 400.0)
    assert (row["tps_min"], row["tps_max"], row["rounds"]) == (100.0, 500.0, 5)
    assert row["spread_pct"] == pytest.approx(200 / 300 * 100, abs=0.1)


def test_every_ratio_compares_clients_that_run_side_by_side():
    blocks = [set(block) for block in bench.BLOCKS]
    for name, numerator, denominator in bench.RATIOS:
        assert any({numerator, denominator} <= block for block in blocks), name
    assert sorted(c for block in bench.BLOCKS for c in block) == sorted(bench.CLIENTS)


# --- the benchmark, quick, against the real server -----------------------------------------

@pytest.mark.slow
def test_benchmark_writes_interleaved_rounds_ratios_with_intervals_and_a_chart(
        tmp_path, db_url):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                           "--seed", "7", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"meta", "method", "resolution", "clients", "ratios", "reference", "overheads",
            "slices"} <= set(result)
    meta = result["meta"]
    assert meta["seed"] == 7 and meta["rounds"] >= 3 and meta["concurrency"] == [2]

    # Every client ran once per round, each round in its own order.
    slices = result["slices"]
    assert len(slices) == meta["rounds"] * len(bench.CLIENTS)
    orders = []
    for rnd in range(1, meta["rounds"] + 1):
        in_round = sorted((s for s in slices if s["round"] == rnd), key=lambda s: s["position"])
        assert sorted(s["client"] for s in in_round) == sorted(bench.CLIENTS)
        orders.append(tuple(s["client"] for s in in_round))
    assert len(set(orders)) > 1, "the order must change between rounds"
    # The rounds are shared among fresh processes.
    assert {s["process"] for s in slices} == set(range(meta["processes"])) and meta["processes"] > 1
    for s in slices:
        assert s["tps"] > 0 and s["transactions"] > 0

    # Per client: the median and spread of its rounds.
    assert {r["client"] for r in result["clients"]} == set(bench.CLIENTS)
    for r in result["clients"]:
        assert r["rounds"] == meta["rounds"]
        assert r["tps_min"] <= r["tps_q1"] <= r["tps"] <= r["tps_q3"] <= r["tps_max"]
        assert {"p50_ms", "p99_ms", "spread_pct", "cpu_us_per_tx"} <= set(r)

    # Ratios with intervals, labkit's first, for throughput and CPU per transaction.
    names = {(r["name"], r["metric"]) for r in result["ratios"] if r["headline"]}
    assert {("labkit sync / SQLAlchemy ORM sync", "tps"),
            ("labkit async / SQLAlchemy ORM async", "tps"),
            ("labkit sync / SQLAlchemy ORM sync", "tx_per_cpu_s"),
            ("labkit async / SQLAlchemy ORM async", "tx_per_cpu_s"),
            ("psycopg2 raw / pgbench", "tps")} <= names
    for r in result["ratios"]:
        assert r["low"] <= r["median"] <= r["high"]
        assert 0 < r["confidence"] <= 1 and r["rounds"] == meta["rounds"]
        assert math.isfinite(r["resolves_pct"]) and r["verdict"]

    # What the run can and cannot resolve, in the JSON and printed.
    resolution = result["resolution"]
    assert resolution["statement"].startswith("This run resolves")
    assert resolution["throughput_pct"] > 0 and resolution["cpu_per_transaction_pct"] > 0
    assert resolution["statement"] in proc.stdout
    ratios = json.loads((tmp_path / "ratios.json").read_text())
    assert "labkit sync / SQLAlchemy ORM sync" in ratios["ratios"]
    assert "labkit async / SQLAlchemy ORM async" in ratios["cpu_ratios"]

    assert result["reference"]["client"] == bench.PGBENCH_SELECT
    assert "health_check (warm pool)" in {o["client"] for o in result["overheads"]}
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "[1/" in proc.stderr  # progress shown
    assert (db_url.password or "\0") not in proc.stdout + proc.stderr
