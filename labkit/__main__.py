"""Command line: ``python -m labkit db up|down|status|url`` and ``python -m labkit health``.

``db up`` prints the connection URL (password masked) on its last line; ``db url
--reveal`` prints it with the password, for ``export DATABASE_URL=...``. ``health``
checks ``--url``, else ``DATABASE_URL``, else the local server (without starting it),
and exits 0 when healthy, 1 when not, 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from labkit.config import Settings, TEST_POOL, mask_url, parse_url, url_as_text
from labkit.errors import ConfigurationError, LabkitError, redact

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labkit",
                                     description="labkit: the local database and health checks")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="control the local PostgreSQL server")
    db_sub = db.add_subparsers(dest="action", required=True)
    db_sub.add_parser("up", help="start the local server (or reuse it); print its URL")
    down = db_sub.add_parser("down", help="stop the local server")
    down.add_argument("--destroy", action="store_true", help="also delete its data")
    db_sub.add_parser("status", help="exit 0 when running, 1 otherwise")
    url = db_sub.add_parser("url", help="print the local server's URL (password masked)")
    url.add_argument("--reveal", action="store_true",
                     help="print the password too, e.g. for export DATABASE_URL=...")

    health = sub.add_parser("health", help="check that a database answers")
    health.add_argument("--url", help="database URL (default: DATABASE_URL from the "
                        "environment or .env, else the local server)")
    health.add_argument("--timeout", type=float, default=5.0,
                        help="give up after this many seconds (default 5)")
    health.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _db(action: str, args: argparse.Namespace) -> int:
    from labkit.lab.server import ClusterError, default_server

    server = default_server()
    try:
        if action == "up":
            print(f"starting the local PostgreSQL under {server.root} ...", file=sys.stderr)
            info = server.ensure_running()
            print(f"running: PostgreSQL on {info.host}:{info.port} "
                  f"(data in {server.data_dir}, log in {server.log_file})", file=sys.stderr)
            print(mask_url(info.url()))
            return EXIT_OK
        if action == "down":
            server.destroy() if args.destroy else server.stop()
            print("stopped" + (" and deleted" if args.destroy else ""))
            return EXIT_OK
        if action == "status":
            status = server.status()
            if status == "running":
                print(f"running on port {server.info().port}")
                return EXIT_OK
            print(status)
            return EXIT_UNHEALTHY
        if action == "url":
            info = server.info()
            print(url_as_text(info.url()) if args.reveal else mask_url(info.url()))
            return EXIT_OK
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return EXIT_USAGE


def _health_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    from labkit.lab.database import environment
    from labkit.lab.server import ClusterError, default_server

    env = environment()
    if env.get("DATABASE_URL", "").strip():
        return env["DATABASE_URL"]

    try:
        return url_as_text(default_server().info().url())
    except ClusterError:
        raise ConfigurationError(
            "no database to check: pass --url, set DATABASE_URL, or run "
            "`python -m labkit db up`") from None


def _health(args: argparse.Namespace) -> int:
    from labkit.engine import create_engine
    from labkit.health import HealthReport, health_check

    if args.timeout <= 0:
        print("error: --timeout must be > 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    secrets: list[str | None] = []
    try:
        raw = _health_url(args)
        url = parse_url(raw)
        secrets.append(url.password)  # type: ignore[arg-type]
        settings = Settings(url=url, pool=TEST_POOL,
                            connect_timeout=max(1.0, min(args.timeout, 5.0)))
        engine = create_engine(settings)
    except ConfigurationError as exc:
        report = HealthReport(ok=False, latency_ms=0.0, error=type(exc).__name__,
                              message=redact(str(exc), secrets), timeout_s=args.timeout)
    else:
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
    return EXIT_OK if report.ok else EXIT_UNHEALTHY


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "db":
            return _db(args.action, args)
        return _health(args)
    except LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # A health probe stuck on a hung server is a daemon thread: leave without it.
    code = main()
    sys.stdout.flush()
    os._exit(code)
