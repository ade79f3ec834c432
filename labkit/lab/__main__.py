"""Command line of the lab: ``python -m labkit.lab db up|down|status|url`` and ``fleet``.

``db up`` starts the local PostgreSQL (or reuses it) and prints its URL, password
masked, on its last line; ``db url --reveal`` prints the URL with its password, for
``export DATABASE_URL=...``. ``db down --destroy`` also deletes the data. Exit codes: 0
ok, 1 not running or failed, 2 usage error. The core's ``python -m labkit health``
checks a database; this module only drives the local server. ``fleet`` runs the fleet
simulator on your own numbers (``labkit.lab.fleet_cli``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sqlalchemy.engine import URL

from labkit.lab import fleet_cli
from labkit.lab.server import ClusterError, default_server

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labkit.lab",
                                     description="labkit's lab: the local PostgreSQL server")
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
    fleet_cli.add_parser(sub)
    return parser


def _text(url: URL, *, reveal: bool = False) -> str:
    return url.render_as_string(hide_password=not reveal)


def _db(args: argparse.Namespace) -> int:
    server = default_server()
    try:
        if args.action == "up":
            print(f"starting the local PostgreSQL under {server.root} ...", file=sys.stderr)
            info = server.ensure_running()
            print(f"running: PostgreSQL on {info.host}:{info.port} "
                  f"(data in {server.data_dir}, log in {server.log_file})", file=sys.stderr)
            print(_text(info.url()))
            return EXIT_OK
        if args.action == "down":
            server.destroy() if args.destroy else server.stop()
            print("stopped" + (" and deleted" if args.destroy else ""))
            return EXIT_OK
        if args.action == "status":
            status = server.status()
            if status == "running":
                print(f"running on port {server.info().port}")
                return EXIT_OK
            print(status)
            return EXIT_FAILED
        if args.action == "url":
            print(_text(server.info().url(), reveal=args.reveal))
            return EXIT_OK
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (argparse exits 2 on a usage error)."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "fleet":
        return fleet_cli.run(args)
    return _db(args)


if __name__ == "__main__":
    sys.exit(main())
