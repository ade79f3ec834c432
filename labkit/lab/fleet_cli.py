"""``python -m labkit.lab fleet``: the fleet simulator's answers for your own numbers.

    python -m labkit.lab fleet --instances 200 --workers 4 --pool-size 5 --max-overflow 5 \\
        --max-connections 500 --rate 2000 --hold-ms 5 --out build/fleet.png

Prints the connection budget, the predicted checkout waits (the simulator beside Erlang C)
and a restart-storm summary per retry policy, and writes a chart of the storm. The costs
are the simulator's defaults unless ``--calibrate`` measures them against the lab's
database first.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from labkit.lab.fleet import (Bouncer, Calibration, Fleet, FleetResult, Pool, Retry, Server,
                              ServerRestart, Workload, connection_budget, erlang_terms, simulate)
from labkit.retry import DEFAULT_RETRY, STARTUP_RETRY

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add the ``fleet`` subcommand to the lab's command line."""
    p = sub.add_parser("fleet", help="simulate a fleet of app instances against one server",
                       description=(__doc__ or "").splitlines()[0])
    p.add_argument("--instances", type=int, required=True, help="app instances")
    p.add_argument("--workers", type=int, default=1, help="worker processes per instance")
    p.add_argument("--pool-size", type=int, default=5, help="pool_size of each worker's pool")
    p.add_argument("--max-overflow", type=int, default=10, help="max_overflow of each pool")
    p.add_argument("--pool-timeout", type=float, default=30.0, help="pool_timeout, s")
    p.add_argument("--no-probe", action="store_true",
                   help="no health probe connection per process (labkit's probe keeps one)")
    p.add_argument("--max-connections", type=int, required=True, help="the server's")
    p.add_argument("--reserved", type=int, default=3,
                   help="slots not the application's (superuser_reserved_connections...)")
    p.add_argument("--rate", type=float, required=True, help="requests per second, fleet-wide")
    p.add_argument("--hold-ms", type=float, required=True,
                   help="mean time a request holds its connection, ms")
    p.add_argument("--pgbouncer", choices=["session", "transaction"],
                   help="put PgBouncer in front in this mode")
    p.add_argument("--bouncer-pool-size", type=int, default=20,
                   help="PgBouncer's default_pool_size")
    p.add_argument("--max-client-conn", type=int, default=100, help="PgBouncer's")
    p.add_argument("--restart-s", type=float, default=3.0,
                   help="how long the server is down in the restart storm, s")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="simulated seconds for the waits (default 20)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure the costs against the lab's database first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the restart-storm chart here (PNG)")


def _fleet(args: argparse.Namespace, calibration: Calibration) -> Fleet:
    bouncer = (Bouncer(mode=args.pgbouncer, default_pool_size=args.bouncer_pool_size,
                       max_client_conn=args.max_client_conn) if args.pgbouncer else None)
    return Fleet(instances=args.instances, workers=args.workers, bouncer=bouncer,
                 pool=Pool(pool_size=args.pool_size, max_overflow=args.max_overflow,
                           pool_timeout=args.pool_timeout, pre_ping=True,
                           probe=not args.no_probe),
                 server=Server(max_connections=args.max_connections, reserved=args.reserved),
                 calibration=calibration)


def _ms(seconds: float) -> str:
    return "unbounded" if math.isinf(seconds) else f"{seconds * 1000:.3f} ms"


def run(args: argparse.Namespace) -> int:
    """Answer the budget, waits and restart-storm questions; 0 when done."""
    calibration = Calibration()
    if args.calibrate:
        from labkit.lab import local_settings
        from labkit.lab.fleet_calibrate import calibrate
        calibration = calibrate(local_settings()).calibration
    fleet = _fleet(args, calibration)
    hold_s = args.hold_ms / 1000
    load = Workload(rate_per_s=args.rate, hold_s=hold_s)
    print(f"fleet: {fleet.instances} instances x {fleet.workers} workers = {fleet.processes} "
          f"processes; pool_size {args.pool_size} + max_overflow {args.max_overflow}"
          f"{'' if args.no_probe else ' + 1 probe'}; server max_connections "
          f"{args.max_connections} ({fleet.server.usable} usable)"
          + (f"; PgBouncer {args.pgbouncer} mode, default_pool_size {args.bouncer_pool_size},"
             f" max_client_conn {args.max_client_conn}" if args.pgbouncer else ""))
    print(f"costs: {calibration.source} (connect {calibration.connect_s * 1000:.1f} ms)")

    budget = connection_budget(fleet)
    terms = erlang_terms(fleet, args.rate, hold_s)
    print("\nbudget")
    print(f"  worst case: {budget.processes} x {budget.per_process} = "
          f"{budget.processes * (budget.per_process or 0)} connections for {budget.available} "
          f"usable slots" + (f" (through PgBouncer: {budget.needed} server connections)"
                             if args.pgbouncer else "")
          + f": {'fits' if budget.ok else 'OVER BUDGET'}")
    if not budget.ok:
        print("  (pools open lazily: whether connects fail depends on the load; see the waits)")
    print(f"  in use on average (Little's law): {terms['fleet_in_use']:.1f} connections, "
          f"{terms['in_use_per_process']:.3f} per process")

    steady = simulate(fleet, load, duration_s=args.seconds, seed=args.seed)
    print("\npredicted waits (steady load)")
    print(f"  Erlang C per process ({args.pool_size + args.max_overflow} connections): mean "
          f"{_ms(terms['mean_wait_s'])}, p99 {_ms(terms['p99_wait_s'])}")
    print(f"  simulated, {args.seconds:g} s: mean {_ms(steady.mean_wait_s)}, p99 "
          f"{_ms(steady.wait_percentile_s(99))}; peak {steady.peak_server_connections} server "
          f"connections; failures {steady.failures or 'none'}")

    policies: dict[str, Retry | None] = {
        "no retry": None, "DEFAULT_RETRY": Retry(DEFAULT_RETRY),
        "STARTUP_RETRY": Retry(STARTUP_RETRY),
        "STARTUP_RETRY, full jitter": Retry(STARTUP_RETRY, jitter="full")}
    down_at, end = 2.0, 2.0 + args.restart_s + 8.0
    storms: dict[str, FleetResult] = {
        name: simulate(fleet, load, duration_s=end, seed=args.seed, bin_s=0.1, retry=policy,
                       faults=[ServerRestart(at_s=down_at, down_s=args.restart_s)])
        for name, policy in policies.items()}
    up = down_at + args.restart_s
    print(f"\nrestart storm: the server down {args.restart_s:g} s")
    print(f"  {'policy':28} {'peak attempts/s':>15} {'failed requests':>15} "
          f"{'clean again after':>17}")
    for name, r in storms.items():
        clean = r.recovery_s(up)
        print(f"  {name:28} {max(r.connect_attempts_per_s()):15.0f} "
              f"{sum(r.failures.values()):15} "
              + (f"{clean:15.1f} s" if clean is not None else f"{'not in the run':>17}"))
    if args.out is not None:
        from labkit.lab import charts
        first = next(iter(storms.values()))
        fig = charts.fleet_chart(
            first.times, {n: r.connect_attempts_per_s() for n, r in storms.items()},
            {n: r.server_connections for n, r in storms.items()},
            hlines={f"usable slots = {fleet.server.usable}": fleet.server.usable},
            windows=[(down_at, up, "server down")],
            top_label="connection attempts per second", bottom_label="server connections",
            title=f"A {args.restart_s:g} s restart under {fleet.instances} instances x "
                  f"{fleet.workers} workers at {args.rate:g} requests/s")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=100)
        print(f"\nwrote {args.out}")
    return 0

