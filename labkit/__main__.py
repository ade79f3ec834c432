"""``python -m labkit health [--url URL] [--timeout S] [--json]``: is the database there?"""

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
    """Run the command line; return the exit code: 0 healthy, 1 not, 2 usage or configuration."""
    about = "check that the database answers"
    parser = argparse.ArgumentParser(prog="python -m labkit", description=f"labkit: {about}")
    health = parser.add_subparsers(dest="command", required=True).add_parser("health", help=about)
    health.add_argument("--url", help="database URL (default: DATABASE_URL)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.add_argument("--json", action="store_true", help="print one JSON object")
    if not 0 < (args := parser.parse_args(argv)).timeout < float("inf"):  # NaN too
        print("error: --timeout must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        env = {**os.environ, **({"DATABASE_URL": args.url} if args.url else {})}
        engine = create_engine(Settings.from_env(env).replace(
            pool=TEST_POOL, connect_timeout=max(1.0, min(args.timeout, 5.0))))
    except ConfigurationError as exc:
        message = redact(str(exc))
        if args.json:  # stdout is flushed by each print: the process leaves by os._exit
            print(json.dumps(HealthReport(False, 0.0, error=type(exc).__name__, message=message,
                                          timeout_s=args.timeout).to_dict()), flush=True)
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        report = health_check(engine, timeout=args.timeout)
    finally:
        engine.dispose()
    print(json.dumps(report.to_dict(), sort_keys=True) if args.json else f"ok: PostgreSQL "
          f"{report.server_version} answered in {report.latency_ms:.1f} ms" if report.ok else
          f"not ok after {report.latency_ms:.0f} ms: {report.error}: {report.message}", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    os._exit(main())  # a probe stuck on a hung server is a daemon thread: leave without it
