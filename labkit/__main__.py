"""Command line: ``python -m labkit db up|down|status|url`` and ``python -m labkit health``.

``db up`` prints the connection URL (password masked) on its last line; ``db url
--reveal`` prints it with the password, for ``export DATABASE_URL=...``. The ``db``
commands drive the local server of ``labkit.lab``; in a copied core without ``lab/``
they say so and exit 2.

``health`` checks ``--url``, else ``DATABASE_URL`` from the environment or from the
``.env`` file of the current directory (the environment wins), else the local server
(without starting it, and only when ``labkit.lab`` is there). With
``ENVIRONMENT=production`` it never falls back to the local server: a missing
``DATABASE_URL`` is a configuration error. It exits 0 when healthy, 1 when not, 2 on a
usage or configuration error (with ``--json``, the report names ``ConfigurationError``).
The health check needs only the core, so it works in a copy of ``labkit/`` without
``lab/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

from sqlalchemy.engine import URL

from labkit.config import TEST_POOL, Settings, mask_url, parse_url, url_as_text
from labkit.errors import ConfigurationError, LabkitError, redact

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2

# Read by `health`, under the environment, like Settings.from_env(env_file=ENV_FILE).
ENV_FILE = ".env"


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
                        "environment or ./.env, else the local server; never the local "
                        "server with ENVIRONMENT=production)")
    health.add_argument("--timeout", type=float, default=5.0,
                        help="give up after this many seconds (default 5)")
    health.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _db(action: str, args: argparse.Namespace) -> int:
    try:
        from labkit.lab.server import ClusterError, default_server
    except ImportError as exc:
        print(f"error: the db commands drive the local server of labkit.lab, which cannot "
              f"be imported here ({exc}); copies of the core without lab/ have only "
              "`health`", file=sys.stderr)
        return EXIT_USAGE

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


def _local_server_url() -> URL:
    """The running local server's URL; only called outside production."""
    try:
        from labkit.lab.server import ClusterError, default_server
    except ImportError:
        raise ConfigurationError(
            "no database to check: DATABASE_URL is not set (environment or .env) and "
            "there is no local server here (labkit.lab cannot be imported: a copied core "
            "has none); pass --url or set DATABASE_URL") from None
    try:
        return default_server().info().url()
    except ClusterError:
        raise ConfigurationError(
            "no database to check: pass --url, set DATABASE_URL, or run "
            "`python -m labkit db up`") from None


def _health_url(args: argparse.Namespace) -> URL:
    if args.url:
        return parse_url(args.url)
    # The production guard lives in Settings.from_env: with ENVIRONMENT=production the
    # local server is never asked for.
    return Settings.from_env(env_file=ENV_FILE, default_url=_local_server_url).url


def _health(args: argparse.Namespace) -> int:
    from labkit.engine import create_engine
    from labkit.health import HealthReport, health_check

    if not math.isfinite(args.timeout) or args.timeout <= 0:
        print("error: --timeout must be > 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    try:
        url = _health_url(args)
        settings = Settings(url=url, pool=TEST_POOL,
                            connect_timeout=max(1.0, min(args.timeout, 5.0)))
        engine = create_engine(settings)
    except ConfigurationError as exc:
        # Messages built by labkit never hold the password; redact() is a second net.
        message = redact(str(exc))
        if args.json:
            print(json.dumps(HealthReport(ok=False, latency_ms=0.0, error=type(exc).__name__,
                                          message=message, timeout_s=args.timeout).to_dict(),
                             sort_keys=True))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
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
