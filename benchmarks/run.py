"""`make bench`: the same short read transaction through every layer, in interleaved rounds.

    python benchmarks/run.py [--concurrency 1,4,8] [--rounds 16] [--slice 0.2]
                             [--cost-blocks 12] [--cost-calls 100] [--cost-cpu 400]
                             [--seed N] [--quick] [--out build/bench] [--only fleet]

One run per client cannot resolve a few percent on a shared machine: another process
takes a core for a second and that client's only number is off by 30 %. So every client
runs at every concurrency once per *round*, for a short slice, in a new random order
each round; each client's slices are spread over the whole run, and a burst of load
lands on a few slices of many clients instead of all of one client's. The two sides of
every ratio run back to back within a round (``bench.BLOCKS``, in random order), so they
see nearly the same load, and a garbage collection precedes every slice.

The clients (``bench.ALL_CLIENTS``): pgbench, then each layer on the kit's default drivers
(psycopg2 sync, asyncpg async) and on psycopg 3 (``Settings(driver="psycopg")``): raw
driver, SQLAlchemy (Core on psycopg2 only; the ORM session), labkit's scopes.

Reported per client and concurrency: the median throughput of its slices and their
spread (interquartile range, min-max). Reported per comparison (labkit / SQLAlchemy,
raw driver / pgbench, ...): the median of the per-round ratios with a distribution-free
95 % interval for that median (order statistics, the sign-test interval). labkit's two
ratios are pooled over the concurrencies above 1, where the Python client is CPU-bound
and a layer's cost shows in full: each round's ratio is then the geometric mean of its
ratios at those concurrencies; so are labkit's ratios on psycopg 3. They are also given
for the Python process's CPU time per transaction, the layer's own cost, which other
processes disturb far less than throughput, and so are the driver ratios (psycopg 3 over
psycopg2 and over asyncpg, raw and through the ORM session) at every concurrency. The
interval's wider half is the smallest difference the run can resolve; it is written to
the JSON and onto the chart.

Throughput cannot settle whether labkit costs at most 3 % more per transaction than the
SQLAlchemy session it wraps: its intervals are several percent wide on a shared machine.
So each worker process also runs *cost blocks* (``bench.cost_blocks``): labkit's scope
and the SQLAlchemy session, sync and async, one transaction at a time against the same
server, measured two ways. Python calls per transaction (everything ``cProfile`` counts)
are nearly deterministic, whatever else the machine runs: that is the decisive measure,
its interval a small fraction of a percent wide. CPU time per transaction, with the two
alternating transaction by transaction, checks it in seconds. Both are reported as
labkit / SQLAlchemy (above 1: labkit costlier) with the sign-test interval over blocks,
its half-width, and whether "at most 3 % more" is confirmed, ruled out or undecided.

Writes ``results.json``, ``ratios.json`` (``call_ratios``, ``cpu_interleaved_ratios``,
``resolution``) and ``results.png`` to ``--out``, and prints a table, the ratios and the
resolution. About 3.5 minutes with the defaults on 2 cores: 14 clients × 3 concurrencies
× 16 rounds of 0.2 s slices (42 slices a round), then 12 cost blocks.

Last, the fleet simulator's speed (``fleet_speed``: 500 instances at 10,000 requests a
second for 60 simulated seconds, in simulated requests per second of wall time), in
``results.json`` under ``fleet`` and in the report; ``--only fleet`` runs that part alone
(a few seconds) and writes ``fleet.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.lab import bench, database_url, default_server, stats

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parents[1]
CONFIDENCE = 0.95
PCT = f"{CONFIDENCE * 100:.0f} %"
LABKIT_RATIOS = bench.RATIOS[:2]
PSYCOPG3_LABKIT_RATIOS = bench.PSYCOPG3_RATIOS[:2]  # labkit / the ORM session, on psycopg 3
POOLED_RATIOS = LABKIT_RATIOS + PSYCOPG3_LABKIT_RATIOS
DRIVER_RATIOS = bench.PSYCOPG3_RATIOS[2:]  # psycopg 3 / psycopg2 or asyncpg, also in CPU
COST_METRICS = ("calls_per_tx", "cpu_us_per_tx")
DECISIVE = "calls_per_tx"  # the measure that judges the 3 % claim

SHORT = {  # chart labels
    bench.PGBENCH: "pgbench (C)",
    "psycopg2 raw (threads)": "psycopg2 raw",
    "SQLAlchemy Core (sync)": "SQLAlchemy Core",
    "SQLAlchemy ORM session (sync)": "ORM session (sync)",
    "labkit session_scope (sync)": "labkit (sync)",
    "asyncpg raw (pool)": "asyncpg raw",
    "SQLAlchemy ORM session (async)": "ORM session (async)",
    "labkit async_session_scope (async)": "labkit (async)",
    "psycopg 3 raw (threads)": "psycopg 3 raw",
    "SQLAlchemy ORM session (sync, psycopg 3)": "ORM session (sync, psycopg 3)",
    "labkit session_scope (sync, psycopg 3)": "labkit (sync, psycopg 3)",
    "psycopg 3 raw (async pool)": "psycopg 3 raw (async)",
    "SQLAlchemy ORM session (async, psycopg 3)": "ORM session (async, psycopg 3)",
    "labkit async_session_scope (async, psycopg 3)": "labkit (async, psycopg 3)",
}
COLOURS = {  # one hue per family: C client, sync Python (blues), async Python (greens)
    bench.PGBENCH: "#444444",
    "psycopg2 raw (threads)": "#9ecae1",
    "SQLAlchemy Core (sync)": "#4292c6",
    "SQLAlchemy ORM session (sync)": "#08519c",
    "labkit session_scope (sync)": "#e6550d",
    "asyncpg raw (pool)": "#a1d99b",
    "SQLAlchemy ORM session (async)": "#238b45",
    "labkit async_session_scope (async)": "#fd8d3c",
}
# psycopg 3 draws in its counterpart's colour, dotted, with square markers.
COLOURS.update({client: COLOURS[client.replace(", psycopg 3)", ")")]
                for client in bench.PSYCOPG3_CLIENTS if "raw" not in client})
COLOURS.update({"psycopg 3 raw (threads)": COLOURS["psycopg2 raw (threads)"],
                "psycopg 3 raw (async pool)": COLOURS["asyncpg raw (pool)"]})


def worker(concurrencies: list[int], rounds: int, slice_s: float, seed: int, offset: int,
           total: int, cost: dict[str, int], out: Path) -> None:
    """One worker process: its share of the rounds and of the cost blocks, as JSON."""
    url = database_url()
    start = time.monotonic()

    def on_round(number: int, _rounds: int, seconds: float) -> None:
        bench.progress(f"[{offset + number}/{total}] round done in {seconds:.1f} s "
                       f"(process {os.getpid()}, {time.monotonic() - start:.0f} s)")

    def on_block(block: int, seconds: float) -> None:
        bench.progress(f"[cost block {block}/{cost['total']}] calls and CPU time per "
                       f"transaction in {seconds:.1f} s (process {os.getpid()})")

    slices = bench.interleaved_rounds(url, clients=bench.ALL_CLIENTS,
                                      concurrencies=concurrencies,
                                      rounds=rounds, duration=slice_s,
                                      bin_dir=default_server().bin_dir, seed=seed,
                                      on_round=on_round)
    first = cost["offset"] + 1
    costs = bench.cost_blocks(url, range(first, first + cost["blocks"]),
                              calls_transactions=cost["calls"], cpu_transactions=cost["cpu"],
                              warmup=cost["warmup"], seed=seed, on_block=on_block)
    out.write_text(json.dumps({"slices": slices, "costs": costs}))


def measure(concurrencies: list[int], rounds: int, slice_s: float, seed: int,
            processes: int, overhead_samples: int, cost: dict[str, int]) -> dict[str, Any]:
    """Run the interleaved rounds and the cost blocks in worker processes, the pgbench -S
    reference, overheads.

    The rounds and the cost blocks (``cost``: ``blocks``, ``calls``, ``cpu``, ``warmup``)
    are shared among ``processes`` fresh Python processes, one after the other: a
    process's hash seed and memory layout can favour one code path by a few percent for
    its whole life, and a run of one process would report that as a difference between
    the layers.
    """
    url = database_url()
    bench.seed(url)
    bin_dir = default_server().bin_dir
    cells_per_round = len(bench.ALL_CLIENTS) * len(concurrencies)
    processes = max(1, min(processes, rounds))
    bench.progress(f"{rounds} rounds × {cells_per_round} slices of {slice_s:g} s "
                   f"(clients × concurrencies {concurrencies}), random order per round, "
                   f"in {processes} processes, each after a warm-up round")
    bench.progress(f"then {cost['blocks']} cost blocks: labkit and the SQLAlchemy session, "
                   f"{cost['calls']} transactions each under cProfile (calls) and "
                   f"{cost['cpu']} each alternating (CPU time), sync and async")

    def split(total: int) -> list[int]:
        return [total // processes + (1 if k < total % processes else 0)
                for k in range(processes)]

    slices: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    offset = block_offset = 0
    with tempfile.TemporaryDirectory() as tmp:
        for k, (share, blocks) in enumerate(zip(split(rounds), split(cost["blocks"]))):
            out = Path(tmp) / f"worker{k}.json"
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", "--concurrency",
                 ",".join(map(str, concurrencies)), "--rounds", str(share), "--slice",
                 str(slice_s), "--seed", str(seed + k), "--round-offset", str(offset),
                 "--total-rounds", str(rounds), "--cost-blocks", str(blocks),
                 "--cost-block-offset", str(block_offset),
                 "--total-cost-blocks", str(cost["blocks"]), "--cost-calls",
                 str(cost["calls"]), "--cost-cpu", str(cost["cpu"]), "--cost-warmup",
                 str(cost["warmup"]), "--worker-out", str(out)],
                cwd=ROOT, stdout=subprocess.DEVNULL, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark worker {k} failed ({proc.returncode})")
            done = json.loads(out.read_text())
            for cell in done["slices"]:
                slices.append({**cell, "round": offset + cell["round"], "process": k})
            costs += [{**rec, "process": k} for rec in done["costs"]]
            offset += share
            block_offset += blocks
    bench.progress("pgbench -S (one autocommit statement, for reference)")
    reference = bench.run_pgbench(url, bin_dir, max(concurrencies), 1.0, select_only=True)
    bench.progress("overheads: health check, pre-ping, NullPool")
    overheads = bench.overheads(url, n=overhead_samples)
    return {"slices": slices, "costs": costs, "reference": reference, "overheads": overheads}


def compare(slices: list[dict[str, Any]], concurrencies: list[int]) -> list[dict[str, Any]]:
    """Every throughput ratio at every concurrency, plus labkit's pooled headline ratios.

    labkit's ratios (on the default drivers and on psycopg 3) also come as
    ``tx_per_cpu_s``: transactions per second of the Python process's CPU time, the
    layer's own cost, which other processes disturb far less than throughput (they take
    the CPU away; they hardly change what a transaction costs once it runs). So do the
    driver ratios (psycopg 3 over psycopg2 and over asyncpg), at every concurrency.
    """
    rows = []
    pooled_levels = [n for n in concurrencies if n > 1] or concurrencies
    pooled_slices = [s for s in slices if s["concurrency"] in pooled_levels]
    for metric in ("tps", "tx_per_cpu_s"):
        for name, numerator, denominator in POOLED_RATIOS:
            row = bench.paired_ratio(pooled_slices, numerator, denominator, concurrency=None,
                                     confidence=CONFIDENCE, name=name, metric=metric)
            rows.append({**row, "pooled_over": pooled_levels, "headline": True})
    for name, numerator, denominator in bench.RATIOS:
        labkit = (name, numerator, denominator) in POOLED_RATIOS
        metrics = ("tps", "tx_per_cpu_s") if (name, numerator, denominator) in DRIVER_RATIOS \
            else ("tps",)
        for metric in metrics:
            for n in concurrencies:
                row = bench.paired_ratio(slices, numerator, denominator, concurrency=n,
                                         confidence=CONFIDENCE, name=name, metric=metric)
                rows.append({**row, "headline": not labkit and n == max(concurrencies)})
    return rows


def compare_costs(costs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """labkit's cost per transaction over SQLAlchemy's, in calls and in CPU time, per pair."""
    return [bench.cost_ratio(costs, numerator, denominator, metric=metric,
                             confidence=CONFIDENCE, name=name)
            for metric in COST_METRICS for name, numerator, denominator in bench.COST_PAIRS]


def _overall(rows: list[dict[str, Any]]) -> str:
    claims = {r["claim"] for r in rows}
    if "ruled out" in claims:
        return "ruled out"
    return "confirmed" if claims == {"confirmed"} else "undecided"


def resolution(ratios: list[dict[str, Any]], costs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run can and cannot resolve about labkit's cost over SQLAlchemy.

    The decisive measure is Python calls per transaction (``DECISIVE``): nearly
    deterministic, so its interval is a small fraction of the 3 % the claim is about.
    CPU time per transaction, alternating transaction by transaction, is the check on it
    in seconds; throughput and CPU time in the throughput slices are shown for scale.
    """
    names = {name for name, _, _ in LABKIT_RATIOS}
    labkit = [r for r in ratios if r["headline"] and r["name"] in names]
    tps = [r for r in labkit if r["metric"] == "tps"]
    cpu = [r for r in labkit if r["metric"] == "tx_per_cpu_s"]
    worst = max(r["resolves_pct"] for r in tps)
    worst_cpu = max(r["resolves_pct"] for r in cpu)
    calls = [r for r in costs if r["metric"] == DECISIVE]
    alternating = [r for r in costs if r["metric"] == "cpu_us_per_tx"]
    half = max(r["half_width_pct"] for r in calls)
    half_cpu = max(r["half_width_pct"] for r in alternating)
    claim, cpu_claim = _overall(calls), _overall(alternating)

    def side(name: str) -> str:
        return name.split(" / ")[0].removeprefix("labkit ")

    def parts(rows: list[dict[str, Any]]) -> str:
        return ", ".join(f"{side(r['name'])} ±{r['resolves_pct']:.1f} %" for r in rows)

    def costed(rows: list[dict[str, Any]]) -> str:
        return ", ".join(f"{side(r['name'])} {r['ratio']:.3f} [{r['low']:.3f}–{r['high']:.3f}]"
                         for r in rows)

    blocks = min(r["blocks"] for r in calls)
    statement = (
        f"This run resolves labkit's cost per transaction over the SQLAlchemy session it "
        f"wraps to ±{half:.3f} % in Python calls per transaction (labkit / SQLAlchemy: "
        f"{costed(calls)}; {blocks} blocks, {PCT} intervals): labkit costing at most 3 % "
        f"more is {claim.upper()} in calls, a proxy that weighs every call alike and does "
        f"not see the work inside C code. CPU time per transaction, the two alternating "
        f"transaction by transaction, resolves ±{half_cpu:.1f} % ({costed(alternating)}) "
        + ("and agrees" if cpu_claim == claim else f"and leaves it {cpu_claim.upper()}")
        + f". Throughput resolves only about ±{worst:.0f} % ({parts(tps)}), CPU time in the "
        f"throughput slices ±{worst_cpu:.0f} % ({parts(cpu)}).")
    verdicts = {f"{r['name']} ({r['metric']})": r["verdict"] for r in labkit}
    verdicts.update({f"{r['name']} ({r['metric']})": r["verdict"] for r in costs})
    return {"claim": "labkit's cost per transaction is at most 3 % above that of the "
                     "SQLAlchemy session it wraps",
            "decisive_measure": DECISIVE, "half_width_pct": round(half, 3),
            "overhead_at_most_3pct": claim,
            "cpu_interleaved_pct": round(half_cpu, 2), "cpu_interleaved_claim": cpu_claim,
            "throughput_pct": round(worst, 1), "cpu_per_transaction_pct": round(worst_cpu, 1),
            "statement": statement, "verdicts": verdicts}


# --- chart ---------------------------------------------------------------------------------

def _plain(ax: Axes, axis: str) -> None:
    """Plain-number tick labels (2,000 rather than 2×10³) on a log axis."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(fmt)
    target.set_minor_formatter(NullFormatter())


def _throughput(ax: Axes, summary: list[dict[str, Any]], concurrencies: list[int]) -> None:
    from matplotlib.ticker import NullFormatter

    for client in bench.ALL_CLIENTS:
        rows = [r for r in summary if r["client"] == client]
        xs = [r["concurrency"] for r in rows]
        med = [r["tps"] for r in rows]
        err = [[m - r["tps_q1"] for m, r in zip(med, rows)],
               [r["tps_q3"] - m for m, r in zip(med, rows)]]
        dashed, third = client.startswith("labkit"), client in bench.PSYCOPG3_CLIENTS
        style = ("-." if third else "--") if dashed else (":" if third else "-")
        ax.errorbar(xs, med, yerr=err, marker="s" if third else "o", markersize=5, capsize=3,
                    linestyle=style, color=COLOURS[client], label=SHORT[client])
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrencies, [str(n) for n in concurrencies])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.set_yticks([500, 1000, 2000, 5000, 10_000, 20_000, 50_000])
    _plain(ax, "y")
    low = min(r["tps_q1"] for r in summary)
    high = max(r["tps_q3"] for r in summary)
    ax.set_ylim(low / 1.5, high * 1.5)
    ax.set_title("Throughput by layer (median of rounds, bars: IQR)")
    ax.set_xlabel("concurrent workers")
    ax.set_ylabel("transactions per second (log scale)")


def _forest(ax: Axes, rows: list[dict[str, Any]], labels: list[str], *,
            log: bool) -> None:
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        labkit = r["name"].startswith("labkit")
        colour = "#e6550d" if labkit else "#08519c"
        ax.errorbar([r["median"]], [y], xerr=[[r["median"] - r["low"]],
                                             [r["high"] - r["median"]]],
                    marker="o", markersize=6, capsize=4, color=colour, linestyle="none")
        ax.annotate(f"{r['median']:.2f}  [{r['low']:.2f}–{r['high']:.2f}]", (r["high"], y),
                    textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.axvline(1.0, color="grey", linewidth=1)
    ax.set_yticks(ys, labels, fontsize=9)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    lo = min(min(r["low"] for r in rows), 1.0)
    hi = max(max(r["high"] for r in rows), 1.0)
    if log:  # room on the right for the printed interval
        ax.set_xscale("log")
        left, right = lo / 1.3, hi * (hi / lo) ** 0.6 * 1.3
        ax.set_xlim(left, right)
        ax.set_xticks([t for t in (0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20)
                       if left <= t <= right])
        _plain(ax, "x")
    else:
        span = max(hi - lo, 0.1)
        ax.set_xlim(lo - 0.1 * span, hi + 0.6 * span)


def _labkit_label(r: dict[str, Any]) -> str:
    side = r["name"].split(" / ")[0].removeprefix("labkit ")
    side += " on psycopg 3" if r["name"].endswith("psycopg 3") else ""
    what = "throughput" if r["metric"] == "tps" else "tx per CPU-second"
    if r["concurrency"] == "pooled":
        return f"{side}: {what}\n(workers {', '.join(map(str, r['pooled_over']))} pooled)"
    workers = "worker" if r["concurrency"] == 1 else "workers"
    return f"{side}: {what}\n({r['concurrency']} {workers})"


def _hw(r: dict[str, Any]) -> str:
    """A cost ratio's half-width in percent, with the decimals it needs."""
    return f"{r['half_width_pct']:.3f}" if r["half_width_pct"] < 0.1 else (
        f"{r['half_width_pct']:.2f}")


def _cost_panel(ax: Axes, costs: list[dict[str, Any]]) -> None:
    """labkit's cost per transaction / SQLAlchemy's: calls and alternating CPU time."""
    order = sorted(costs, key=lambda r: (not r["name"].startswith("labkit sync"),
                                         r["metric"] != DECISIVE))
    ys = list(range(len(order)))[::-1]
    for y, r in zip(ys, order):
        colour = "#e6550d" if r["metric"] == DECISIVE else "#756bb1"
        ax.errorbar([r["ratio"]], [y], xerr=[[r["ratio"] - r["low"]], [r["high"] - r["ratio"]]],
                    marker="D" if r["metric"] == DECISIVE else "o", markersize=6, capsize=4,
                    color=colour, linestyle="none")
        ax.annotate(f"{r['ratio']:.3f}  ±{_hw(r)} %\n{r['claim']}",
                    (r["high"], y), textcoords="offset points", xytext=(6, -6), fontsize=8)
    labels = []
    for r in order:
        what = ("Python calls" if r["metric"] == DECISIVE
                else "CPU time, alternating")
        labels.append(f"{r['name'].split(' / ')[0].removeprefix('labkit ')}: {what}")
    ax.set_yticks(ys, labels, fontsize=9)
    ax.set_ylim(-0.7, len(order) - 0.3)
    bound = bench.OVERHEAD_BOUND
    lo = min(min(r["low"] for r in order), 0.97)
    hi = max(max(r["high"] for r in order), bound)
    span = hi - lo
    ax.set_xlim(lo - 0.08 * span, hi + 0.55 * span)
    ax.axvline(1.0, color="grey", linewidth=1)
    ax.axvspan(ax.get_xlim()[0], bound, color="#fdae6b", alpha=0.2, linewidth=0)
    ax.axvline(bound, color="#a63603", linestyle="--", linewidth=1)
    ax.annotate("claim: ≤ +3 %", (bound, len(order) - 0.45), ha="left", va="top",
                fontsize=8, color="#a63603", xytext=(3, 0), textcoords="offset points")
    ax.set_title("labkit's cost per transaction / SQLAlchemy's\n"
                 f"(one at a time; median of blocks,\n{PCT} interval)")
    ax.set_xlabel("cost ratio (1 = same cost; > 1 = labkit costlier)")


def chart(result: dict[str, Any], path: Path) -> None:
    """Throughput by layer, the layer ratios, and labkit's ratios against the claim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, ratios, meta = result["clients"], result["ratios"], result["meta"]
    concurrencies = meta["concurrency"]
    fig = plt.figure(figsize=(22, 9.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[7.9, 1.7])  # type: ignore[misc]
    left, middle, right, costs = top.subplots(
        1, 4, gridspec_kw={"width_ratios": [1.1, 1.0, 1.0, 1.0]})
    _throughput(left, summary, concurrencies)
    bottom.legend(*left.get_legend_handles_labels(), loc="center left", ncol=5, fontsize=9,
                  title="throughput panel (dashed: labkit; squares, dotted: psycopg 3)",
                  title_fontsize=9)

    others = [r for r in ratios if r["headline"] and not r["name"].startswith("labkit")]
    _forest(middle, others, [r["name"].replace(" / ", "\n/ ") + (
        " (tx per CPU-s)" if r["metric"] == "tx_per_cpu_s" else "") for r in others], log=True)
    middle.set_title(f"Layer ratios at {max(concurrencies)} workers\n"
                     f"(median of paired rounds, {PCT} interval)")
    middle.set_xlabel("ratio of throughputs, or of tx per CPU-second (log scale; 1 = equal)")

    # labkit on psycopg 3: the pooled rows only (every concurrency is in the JSON).
    labkit = [r for r in ratios if r["name"].startswith("labkit") and (
        r["concurrency"] == "pooled" or not r["name"].endswith("psycopg 3"))]
    labkit.sort(key=lambda r: (r["name"].endswith("psycopg 3"),
                               not r["name"].startswith("labkit sync"),
                               r["concurrency"] != "pooled", r["metric"] != "tps",
                               str(r["concurrency"])))
    _forest(right, labkit, [_labkit_label(r) for r in labkit], log=False)
    right.axvspan(0.97, 1.03, color="#fdae6b", alpha=0.3, linewidth=0)
    right.annotate("±3 %", (1.0, -0.6), ha="center", va="bottom", fontsize=9,
                   color="#a63603")
    right.set_title("labkit / the SQLAlchemy session it wraps\n"
                    f"(median of paired rounds, {PCT} interval)")
    right.set_xlabel("ratio (1 = no cost; < 1 = labkit slower or costlier)")
    _cost_panel(costs, result["cost_ratios"])
    for ax in (left, middle, right, costs):
        ax.grid(True, alpha=0.3)
    top.suptitle(f"labkit benchmark: check out, SELECT by primary key, commit — "
                 f"{meta['rounds']} interleaved rounds × {meta['slice_s']:g} s slices in "
                 f"{meta['processes']} processes, {meta['cores']} cores, PostgreSQL over TCP "
                 f"on 127.0.0.1, Python {meta['python']}", fontsize=11)
    bottom.text(0.99, 0.5, "\n".join(textwrap.wrap(result["resolution"]["statement"], 120)),
                ha="right", va="center", fontsize=10, color="#a63603")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- report --------------------------------------------------------------------------------

def report(result: dict[str, Any]) -> None:
    print(f"\n{'client':46s} {'conc':>4s} {'tps median':>10s} {'IQR':>15s} "
          f"{'min–max':>15s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU µs/tx':>9s}")
    for r in result["clients"]:
        cpu = f"{r['cpu_us_per_tx']:9.0f}" if r["cpu_us_per_tx"] is not None else f"{'-':>9s}"
        print(f"{r['client']:46s} {r['concurrency']:4d} {r['tps']:10.0f} "
              f"{r['tps_q1']:7.0f}–{r['tps_q3']:<7.0f} {r['tps_min']:7.0f}–{r['tps_max']:<7.0f} "
              f"{r['p50_ms']:7.3f} {r['p99_ms']:7.3f} {cpu}")
    ref = result["reference"]
    print(f"{ref['client']:46s} {ref['concurrency']:4d} {ref['tps']:10.0f}  (one run)")
    print(f"\nratios (median of paired rounds, {PCT} interval):")
    for r in result["ratios"]:
        where = ("pooled " + ",".join(map(str, r["pooled_over"]))
                 if r["concurrency"] == "pooled" else f"at {r['concurrency']}")
        mark = "*" if r["headline"] else " "
        metric = "throughput" if r["metric"] == "tps" else "tx/CPU-s"
        print(f" {mark}{r['name']:50s} {metric:10s} {where:11s} {r['median']:6.3f} "
              f"[{r['low']:.3f}–{r['high']:.3f}]  ±{r['resolves_pct']:.1f} %")
    print("  (* headline; throughput = transactions per second, tx/CPU-s = transactions "
          "per second of the Python process's CPU time)")
    print(f"\nlabkit's cost per transaction / SQLAlchemy's, one transaction at a time "
          f"(median of blocks, {PCT} interval; claim: at most +3 %):")
    for r in result["cost_ratios"]:
        metric = "calls/tx" if r["metric"] == DECISIVE else "CPU/tx alternating"
        mark = "*" if r["metric"] == DECISIVE else " "
        per_tx = [c[r["metric"]] for c in result["costs"] if c["client"] == r["numerator"]]
        base = [c[r["metric"]] for c in result["costs"] if c["client"] == r["denominator"]]
        unit = "" if r["metric"] == DECISIVE else " µs"
        print(f" {mark}{r['name']:36s} {metric:18s} {r['ratio']:7.4f} "
              f"[{r['low']:.4f}–{r['high']:.4f}]  ±{_hw(r):5s} %  "
              f"{r['claim']:9s} ({stats.median(per_tx):.1f} vs "
              f"{stats.median(base):.1f}{unit}, {r['blocks']} blocks)")
    print("  (* decisive: Python calls per transaction, counted by cProfile)")
    print("\noverheads (median ms): " + ", ".join(
        f"{o['client']} {o['p50_ms']:.3f}" for o in result["overheads"]))
    print("\n" + result["resolution"]["statement"])


def fleet_speed(*, instances: int = 500, rate_per_s: float = 10_000.0,
                seconds: float = 60.0, seed: int = 0) -> dict[str, Any]:
    """The fleet simulator's speed (``labkit.lab.fleet``): ``instances`` × pool_size 10 at
    ``rate_per_s`` Poisson requests (5 ms held) for ``seconds`` simulated seconds, timed on
    the wall clock; the target is at most 30 s for 500 instances at 10,000/s for 60 s."""
    from labkit.lab.fleet import Fleet, Pool, Server, Workload, simulate

    fleet = Fleet(instances=instances, pool=Pool(pool_size=10, max_overflow=0),
                  server=Server(max_connections=12 * instances))
    start, cpu = time.perf_counter(), time.process_time()
    result = simulate(fleet, Workload(rate_per_s=rate_per_s, hold_s=0.005),
                      duration_s=seconds, seed=seed)
    wall = time.perf_counter() - start
    return {"instances": instances, "rate_per_s": rate_per_s, "simulated_s": seconds,
            "requests": result.requests, "wall_s": round(wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
            "requests_per_wall_s": round(result.requests / wall), "target_wall_s": 30.0,
            "within_target": wall <= 30.0}


def report_fleet(fleet: dict[str, Any]) -> None:
    print(f"\nfleet simulator: {fleet['requests']:,} requests ({fleet['instances']} instances, "
          f"{fleet['rate_per_s']:,.0f}/s for {fleet['simulated_s']:g} simulated s) in "
          f"{fleet['wall_s']:.1f} s of wall time: {fleet['requests_per_wall_s']:,} simulated "
          f"requests per second (target: the whole run within {fleet['target_wall_s']:g} s: "
          f"{'met' if fleet['within_target'] else 'MISSED'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8",
                        help="comma-separated worker counts (default 1,4,8)")
    parser.add_argument("--rounds", type=int, default=16, help="recorded rounds (default 16)")
    parser.add_argument("--processes", type=int, default=3,
                        help="worker processes sharing the rounds (default 3)")
    parser.add_argument("--slice", type=float, default=0.2, dest="slice_s",
                        help="seconds per client, concurrency and round (default 0.2)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random order (default: from the clock, recorded)")
    parser.add_argument("--cost-blocks", type=int, default=12,
                        help="blocks measuring labkit's calls and CPU time per transaction "
                             "against SQLAlchemy's (default 12)")
    parser.add_argument("--cost-calls", type=int, default=100,
                        help="transactions per client and block counted under cProfile "
                             "(default 100)")
    parser.add_argument("--cost-cpu", type=int, default=400,
                        help="transactions per client and block timed on the CPU clock, "
                             "alternating (default 400)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run to check the output (2 workers, 6 rounds of 0.1 s "
                             "and 6 small cost blocks in 2 processes)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench")
    parser.add_argument("--only", choices=["fleet"],
                        help="run only the fleet simulator's speed (fleet.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--round-offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--total-rounds", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cost-block-offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--total-cost-blocks", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cost-warmup", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only == "fleet":
        fleet = fleet_speed()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fleet.json").write_text(json.dumps(fleet, indent=2))
        report_fleet(fleet)
        return 0
    concurrencies = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    rounds, slice_s, samples, processes = args.rounds, args.slice_s, 300, args.processes
    cost = {"blocks": args.cost_blocks, "calls": args.cost_calls, "cpu": args.cost_cpu,
            "warmup": args.cost_warmup}
    if args.quick and not args.worker:
        concurrencies, rounds, slice_s, samples, processes = [2], 6, 0.1, 30, 2
        cost = {"blocks": 6, "calls": 20, "cpu": 60, "warmup": 10}
    seed = args.seed if args.seed is not None else time.time_ns() % 1_000_000
    if args.worker:
        worker(concurrencies, rounds, slice_s, seed, args.round_offset,
               args.total_rounds or rounds,
               {**cost, "offset": args.cost_block_offset,
                "total": args.total_cost_blocks or cost["blocks"]}, args.worker_out)
        return 0
    if min(cost.values()) < 1:
        parser.error("--cost-blocks, --cost-calls and --cost-cpu must be at least 1")
    start, started = time.monotonic(), datetime.now(timezone.utc)
    measured = measure(concurrencies, rounds, slice_s, seed, processes, samples, cost)
    ratios = compare(measured["slices"], concurrencies)
    cost_ratios = compare_costs(measured["costs"])
    result: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "concurrency": concurrencies, "rounds": rounds, "slice_s": slice_s,
            "processes": processes, "seed": seed, "cost_blocks": cost["blocks"],
            "cost_calls_transactions": cost["calls"], "cost_cpu_transactions": cost["cpu"],
            "elapsed_s": None,
        },
        "method": {
            "rounds": "every client at every concurrency once per round, in a new random "
                      "order each round (the two sides of each ratio back to back), shared "
                      "among fresh worker processes, each after an unrecorded warm-up round",
            "clients": "per client and concurrency: median throughput of the rounds' "
                       "slices; spread as interquartile range (tps_q1-tps_q3) and min-max. "
                       "Clients named '..., psycopg 3)' run on psycopg 3 "
                       "(Settings(driver='psycopg'), SQLAlchemy postgresql+psycopg); "
                       "'psycopg 3 raw (threads)' holds a connection per thread like "
                       "psycopg2's, 'psycopg 3 raw (async pool)' a psycopg_pool "
                       "AsyncConnectionPool of one connection per task like asyncpg's pool; "
                       "psycopg 3 with its defaults (server-side binding, statements "
                       "prepared from their sixth execution, after prepare_threshold=5)",
            "ratios": f"median of the per-round ratios of two clients with a distribution-"
                      f"free {PCT} interval for that median (order statistics, "
                      "sign test); labkit's headline ratios (on both drivers) pool the "
                      "concurrencies above 1 (geometric mean of each round's ratios); the "
                      "driver ratios (psycopg 3 / psycopg2 or asyncpg) come in throughput "
                      "and tx_per_cpu_s at every concurrency, headline at the highest",
            "metrics": "tps: transactions per second; tx_per_cpu_s: transactions per second "
                       "of the Python process's CPU time while the clock ran (a layer's own "
                       "cost; pgbench has none)",
            "resolves_pct": "the interval's wider half in percent of the median: smaller "
                            "differences are beyond what the run can see",
            "cost_ratios": "labkit's cost per transaction over the SQLAlchemy session it "
                           "wraps, one transaction at a time on a one-connection engine "
                           "per client, in blocks shared among the worker processes. "
                           "calls_per_tx: every call cProfile sees (Python functions, C "
                           "functions, coroutine resumptions) per transaction, the same "
                           "keys for both, nearly deterministic and the decisive measure; "
                           "cpu_us_per_tx: this thread's CPU time per transaction, the two "
                           "clients alternating transaction by transaction (A B B A). Ratio "
                           "= labkit / SQLAlchemy (> 1: labkit costlier), median of the "
                           f"blocks with the {PCT} sign-test interval; half_width is its "
                           "wider half (half_width_pct in percent of the ratio); claim: "
                           "confirmed if the interval lies at or below 1.03, ruled out if "
                           "above, undecided if it straddles 1.03",
        },
        "resolution": resolution(ratios, cost_ratios),
        "clients": bench.summarize(measured["slices"]),
        "ratios": ratios,
        "cost_ratios": cost_ratios,
        "costs": measured["costs"],
        "reference": measured["reference"],
        "overheads": measured["overheads"],
        "slices": measured["slices"],
    }
    result["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
    result["fleet"] = fleet_speed()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    headline: dict[str, dict[str, Any]] = {"tps": {}, "tx_per_cpu_s": {}}
    for r in ratios:
        if r["headline"]:
            headline[r["metric"]][r["name"]] = {
                k: r[k] for k in ("concurrency", "median", "low", "high", "confidence",
                                  "resolves_pct", "verdict")}
    by_metric: dict[str, dict[str, Any]] = {metric: {} for metric in COST_METRICS}
    for r in cost_ratios:
        by_metric[r["metric"]][r["name"]] = {
            k: r[k] for k in ("name", "ratio", "low", "high", "half_width", "half_width_pct",
                              "confidence", "blocks", "claim", "verdict")}
    (args.out / "ratios.json").write_text(json.dumps(
        {"ratios": headline["tps"], "cpu_ratios": headline["tx_per_cpu_s"],
         "call_ratios": by_metric["calls_per_tx"],
         "cpu_interleaved_ratios": by_metric["cpu_us_per_tx"],
         "resolution": result["resolution"]}, indent=2))
    chart(result, args.out / "results.png")
    report(result)
    report_fleet(result["fleet"])
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'ratios.json'} and "
          f"{args.out / 'results.png'} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
