"""`make bench`: interleaved rounds, medians with their spread, ratios with intervals.

The statistics are checked on numbers whose answer is known (the percentile and the
median interval themselves in ``test_stats.py``); the benchmark itself runs once in its
quick mode against the real server and its output is checked for shape.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.lab import bench

ROOT = Path(__file__).resolve().parents[1]


# --- the statistics ----------------------------------------------------------------------

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
    assert sorted(c for block in bench.BLOCKS for c in block) == sorted(bench.ALL_CLIENTS)


def test_psycopg3_clients_run_the_same_layers_on_the_third_driver():
    assert bench.ALL_CLIENTS == [*bench.CLIENTS, *bench.PSYCOPG3_CLIENTS]
    assert len(set(bench.ALL_CLIENTS)) == len(bench.ALL_CLIENTS)
    assert {name for name, _, _ in bench.PSYCOPG3_RATIOS} == {
        "labkit sync / SQLAlchemy ORM sync, on psycopg 3",
        "labkit async / SQLAlchemy ORM async, on psycopg 3",
        "psycopg 3 raw / psycopg2 raw", "psycopg 3 async raw / asyncpg raw",
        "ORM sync on psycopg 3 / on psycopg2", "ORM async on psycopg 3 / on asyncpg"}
    for _, numerator, denominator in bench.PSYCOPG3_RATIOS:  # psycopg 3 on top
        assert numerator in bench.PSYCOPG3_CLIENTS
        assert (denominator in bench.PSYCOPG3_CLIENTS) == numerator.startswith("labkit")


@pytest.mark.parametrize("client", bench.PSYCOPG3_CLIENTS)
def test_psycopg3_clients_talk_to_the_server_through_psycopg3(client, db_url):
    bench.seed(db_url)
    rec = bench.run_client(db_url, client, 2, 0.1)
    assert rec["client"] == client and rec["transactions"] > 0 and rec["tps"] > 0
    if "raw" in client:
        return
    if client in bench.SYNC_CLIENTS:
        _, engine = bench._sync_client(db_url, client, 1)
        try:
            assert engine.dialect.driver == "psycopg"
        finally:
            engine.dispose()
        return

    async def driver() -> tuple[str, bool]:
        _, closers = await bench._async_client(db_url, client, 1)
        try:
            dialect = closers[0].__self__.dialect  # type: ignore[attr-defined]  # engine.dispose
            return dialect.driver, dialect.is_async
        finally:
            for close in closers:
                await close()

    assert asyncio.run(driver()) == ("psycopg", True)


# --- calls and CPU time per transaction ------------------------------------------------

def _leaf() -> int:
    return 1


def _fifty() -> None:
    for _ in range(50):
        _leaf()


def _hundred() -> None:
    for _ in range(100):
        _leaf()


def _ten_abs() -> None:
    for x in range(10):
        abs(x)


def test_count_calls_counts_every_call_exactly():
    assert bench.count_calls(_fifty, n=20) == 51.0  # _fifty itself and 50 calls of _leaf
    assert bench.count_calls(_ten_abs, n=7) == 11.0  # calls of C functions count too
    assert bench.count_calls(_fifty, n=1) == bench.count_calls(_fifty, n=200)


def test_count_calls_of_a_function_doing_twice_the_calls_gives_a_ratio_near_two():
    ratio = bench.count_calls(_hundred, n=50) / bench.count_calls(_fifty, n=50)
    assert ratio == pytest.approx(2.0, rel=0.02)  # 101 / 51
    assert bench.count_calls(_fifty, n=50) / bench.count_calls(_fifty, n=50) == 1.0


def test_count_calls_async_counts_the_awaited_work_and_the_loops():
    async def fifty() -> None:
        _fifty()

    async def hundred() -> None:
        _hundred()

    async def hundred_yielding() -> None:
        _hundred()
        await asyncio.sleep(0)

    async def counts() -> tuple[float, float, float]:
        return (await bench.count_calls_async(fifty, n=20),
                await bench.count_calls_async(hundred, n=20),
                await bench.count_calls_async(hundred_yielding, n=20))

    few, many, yielding = asyncio.run(counts())
    assert (few, many) == (52.0, 102.0)  # the coroutine, its function, the leaves
    assert many / few == pytest.approx(2.0, rel=0.02)
    assert yielding > many + 3  # sleep(0) hands over to the loop, whose work counts too


def _costs(per_block: list[tuple[float, float]], metric: str = "calls_per_tx") -> list[dict]:
    return [{"block": b, "client": client, metric: value}
            for b, (labkit, sqlalchemy) in enumerate(per_block, start=1)
            for client, value in (("L", labkit), ("S", sqlalchemy))]


@pytest.mark.parametrize(("labkit", "claim"), [
    ([1010.0, 1011.0, 1009.0, 1010.0, 1010.5, 1009.5], "confirmed"),  # +1 %
    ([1100.0, 1101.0, 1099.0, 1100.0, 1100.5, 1099.5], "ruled out"),  # +10 %
    ([1000.0, 1060.0, 990.0, 1045.0, 1002.0, 1010.0], "undecided"),   # straddles +3 %
])
def test_cost_ratio_judges_at_most_three_percent_from_the_interval(labkit, claim):
    ratio = bench.cost_ratio(_costs([(x, 1000.0) for x in labkit]), "L", "S")
    assert ratio["claim"] == claim and claim in ratio["verdict"]
    assert ratio["blocks"] == 6 and ratio["low"] == min(labkit) / 1000
    assert ratio["high"] == max(labkit) / 1000  # 6 blocks: min-max reaches 96.9 %
    assert ratio["half_width"] == pytest.approx(
        max(ratio["ratio"] - ratio["low"], ratio["high"] - ratio["ratio"]), abs=1e-5)
    assert ratio["half_width_pct"] == pytest.approx(
        ratio["half_width"] / ratio["ratio"] * 100, abs=1e-3)


def test_cost_ratio_of_identical_costs_is_one_with_no_width():
    ratio = bench.cost_ratio(_costs([(450.0, 450.0)] * 8, "cpu_us_per_tx"), "L", "S",
                             metric="cpu_us_per_tx")
    assert (ratio["ratio"], ratio["half_width_pct"], ratio["claim"]) == (1.0, 0.0, "confirmed")
    with pytest.raises(ValueError):
        bench.cost_ratio(_costs([(1.0, 1.0)]), "L", "nobody")


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

    # Every client, on every driver, ran once per round, each round in its own order.
    slices = result["slices"]
    assert len(slices) == meta["rounds"] * len(bench.ALL_CLIENTS)
    orders = []
    for rnd in range(1, meta["rounds"] + 1):
        in_round = sorted((s for s in slices if s["round"] == rnd), key=lambda s: s["position"])
        assert sorted(s["client"] for s in in_round) == sorted(bench.ALL_CLIENTS)
        orders.append(tuple(s["client"] for s in in_round))
    assert len(set(orders)) > 1, "the order must change between rounds"
    # The rounds are shared among fresh processes.
    assert {s["process"] for s in slices} == set(range(meta["processes"])) and meta["processes"] > 1
    for s in slices:
        assert s["tps"] > 0 and s["transactions"] > 0

    # Per client: the median and spread of its rounds.
    assert {r["client"] for r in result["clients"]} == set(bench.ALL_CLIENTS)
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
    # The same on psycopg 3, and psycopg 3 against psycopg2 and asyncpg, raw and through
    # the ORM session, in throughput and in CPU per transaction.
    third = {name for name, _, _ in bench.PSYCOPG3_RATIOS}
    assert {(name, metric) for name in third for metric in ("tps", "tx_per_cpu_s")} <= names
    for r in result["ratios"]:
        if r["name"] in third and r["headline"]:
            expected = "pooled" if r["name"].startswith("labkit") else max(meta["concurrency"])
            assert r["concurrency"] == expected, r["name"]
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
    assert third <= set(ratios["ratios"]) and third <= set(ratios["cpu_ratios"])
    assert "psycopg 3 async raw / asyncpg raw" in proc.stdout

    # labkit's cost per transaction over SQLAlchemy's: calls (decisive) and CPU time, in
    # blocks shared among the processes, each with an interval and its half-width.
    costs = result["costs"]
    assert {c["block"] for c in costs} == set(range(1, meta["cost_blocks"] + 1))
    assert {c["process"] for c in costs} == set(range(meta["processes"]))
    assert {c["client"] for c in costs} == {client for _, a, b in bench.COST_PAIRS
                                            for client in (a, b)}
    for c in costs:
        assert c["calls_per_tx"] > 100 and c["cpu_us_per_tx"] > 0
    names = {name for name, _, _ in bench.COST_PAIRS}
    for key in ("call_ratios", "cpu_interleaved_ratios"):
        assert set(ratios[key]) == names
        for r in ratios[key].values():
            assert {"name", "ratio", "low", "high", "half_width", "half_width_pct"} <= set(r)
            assert r["low"] <= r["ratio"] <= r["high"] and r["blocks"] == meta["cost_blocks"]
            assert r["half_width_pct"] == pytest.approx(
                max(r["ratio"] - r["low"], r["high"] - r["ratio"]) / r["ratio"] * 100,
                abs=0.01)
            assert r["claim"] in {"confirmed", "ruled out", "undecided"}
    for r in ratios["call_ratios"].values():
        # Counted calls barely move between blocks: far finer than the 3 % in question.
        assert 0.5 < r["ratio"] < 1.5 and r["half_width_pct"] < 0.5
    resolution = ratios["resolution"]
    assert resolution["decisive_measure"] == "calls_per_tx"
    assert resolution["half_width_pct"] == max(
        r["half_width_pct"] for r in ratios["call_ratios"].values())
    assert resolution["overhead_at_most_3pct"] in {"confirmed", "ruled out", "undecided"}
    assert f"±{resolution['half_width_pct']:.3f} %" in resolution["statement"]
    assert "calls/tx" in proc.stdout

    assert result["reference"]["client"] == bench.PGBENCH_SELECT
    assert "health_check (warm pool)" in {o["client"] for o in result["overheads"]}
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "[1/" in proc.stderr  # progress shown
    assert (db_url.password or "\0") not in proc.stdout + proc.stderr
