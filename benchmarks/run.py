"""`make bench`: the same short read transaction through every layer, as JSON + PNG.

    python benchmarks/run.py [--concurrency 1,4,8] [--duration 3] [--out build/bench]

Writes ``results.json`` (a list of records: client, concurrency, tps, p50_ms, p99_ms, ...)
and ``results.png``, and prints a table and the ratios between layers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from labkit.lab import database_url, default_server  # noqa: E402
from labkit.lab import bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(concurrencies: list[int], duration: float) -> list[dict[str, Any]]:
    url = database_url()
    bench.seed(url)
    bin_dir = default_server().bin_dir
    records: list[dict[str, Any]] = []
    plan = bench.iter_plan(concurrencies)
    for i, (client, n) in enumerate(plan, start=1):
        bench.progress(f"[{i}/{len(plan)}] {client} × {n} for {duration:g} s")
        if client == "pgbench":
            rec = bench.run_pgbench(url, bin_dir, n, duration)
        elif client in bench.SYNC_CLIENTS:
            rec = bench.run_sync_client(url, client, n, duration)
        else:
            rec = asyncio.run(bench.run_async_client(url, client, n, duration))
        bench.progress(f"      {rec['tps']:9.1f} tps  p50 {rec['p50_ms']:.3f} ms  "
                       f"p99 {rec['p99_ms']:.3f} ms")
        records.append(rec)
    bench.progress("pgbench -S (one autocommit statement, for reference)")
    records.append(bench.run_pgbench(url, bin_dir, max(concurrencies), duration,
                                     select_only=True))
    bench.progress("overheads: health check, pre-ping, NullPool")
    records.extend(bench.overheads(url))
    return records


def peak(records: list[dict[str, Any]], client: str) -> dict[str, Any]:
    """The record where ``client`` reached its highest throughput."""
    return max((r for r in records if r["client"] == client), key=lambda r: r["tps"])


def ratios(records: list[dict[str, Any]]) -> dict[str, float]:
    """The ratios the issue notes quote, each at the concurrency where each client peaks."""
    python_clients = [c for c in (*bench.SYNC_CLIENTS, *bench.ASYNC_CLIENTS)]
    best_python = max((peak(records, c) for c in python_clients), key=lambda r: r["tps"])
    pg = peak(records, "pgbench (C, same transaction)")

    def ratio(a: str, b: str) -> float:
        return round(peak(records, a)["tps"] / peak(records, b)["tps"], 3)

    return {
        "labkit async / SQLAlchemy async": ratio("labkit async_session_scope (async)",
                                                 "SQLAlchemy ORM session (async)"),
        "labkit sync / SQLAlchemy sync": ratio("labkit session_scope (sync)",
                                               "SQLAlchemy ORM session (sync)"),
        f"best Python ({best_python['client']}) / pgbench": round(
            best_python["tps"] / pg["tps"], 3),
        "asyncpg raw / SQLAlchemy async": ratio("asyncpg raw (pool)",
                                                "SQLAlchemy ORM session (async)"),
    }


def chart(records: list[dict[str, Any]], path: Path) -> None:
    loads = [r for r in records if r.get("kind") != "overhead" and "-S" not in r["client"]]
    clients = list(dict.fromkeys(r["client"] for r in loads))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for client in clients:
        rows = sorted((r for r in loads if r["client"] == client), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["tps"] for r in rows], marker="o", label=client)
        right.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=client)
    left.set_title("Throughput: check out, SELECT by primary key, commit")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("transactions per second")
    left.set_yscale("log")
    right.set_title("p99 latency of the same transaction")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("p99 latency (ms)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    left.legend(fontsize="small")
    fig.suptitle(f"labkit benchmark, {os.cpu_count()} cores, PostgreSQL over TCP on 127.0.0.1 "
                 f"(Python {platform.python_version()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8",
                        help="comma-separated client counts (default 1,4,8)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds per client and concurrency (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench")
    args = parser.parse_args(argv)
    concurrencies = [int(x) for x in args.concurrency.split(",") if x.strip()]
    start = time.monotonic()
    records = run(concurrencies, args.duration)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=2))
    chart(records, args.out / "results.png")
    print(f"\n{'client':40s} {'conc':>4s} {'tps':>10s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for r in records:
        p99 = f"{r['p99_ms']:9.3f}" if r["p99_ms"] is not None else f"{'-':>9s}"
        print(f"{r['client']:40s} {r['concurrency']:4d} {r['tps']:10.1f} {r['p50_ms']:9.3f} {p99}")
    print("\nratios (each client at its peak concurrency):")
    result_ratios = ratios(records)
    for name, value in result_ratios.items():
        print(f"  {name}: {value:.3f}")
    (args.out / "ratios.json").write_text(json.dumps(result_ratios, indent=2))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.png'} "
          f"in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
