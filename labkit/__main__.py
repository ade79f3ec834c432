"""``python -m labkit health [--url URL] [--timeout S] [--json]``: is the database there?

Checks ``--url``, else ``DATABASE_URL``. Exits 0 when healthy, 1 when not, 2 on a usage
or configuration error. Never prints a password.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .config import TEST_POOL, Settings
from .engine import create_engine
from .errors import ConfigurationError, redact
from .health import HealthReport, health_check


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m labkit",
                                     description="labkit: check that the database answers")
    health = parser.add_subparsers(dest="command", required=True).add_parser(
        "health", help="check that the database answers")
    health.add_argument("--url", help="database URL (default: DATABASE_URL)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 0 < args.timeout < float("inf"):  # NaN too
        print("error: --timeout must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        env = {**os.environ, **({"DATABASE_URL": args.url} if args.url else {})}
        engine = create_engine(Settings.from_env(env).replace(
            pool=TEST_POOL, connect_timeout=max(1.0, min(args.timeout, 5.0))))
    except ConfigurationError as exc:
        message = redact(str(exc))
        if args.json:
            print(json.dumps(HealthReport(ok=False, latency_ms=0.0, error=type(exc).__name__,
                                          message=message, timeout_s=args.timeout).to_dict()))
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        report = health_check(engine, timeout=args.timeout)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    elif report.ok:
        print(f"ok: PostgreSQL {report.server_version} answered in {report.latency_ms:.1f} ms")
    else:
        print(f"not ok after {report.latency_ms:.0f} ms: {report.error}: {report.message}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a probe stuck on a hung server is a daemon thread: leave without it
