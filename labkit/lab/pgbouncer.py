"""A real PgBouncer in front of a local server, in session or transaction mode.

The binary is Debian's ``pgbouncer`` package (``make system-tools`` installs it as root;
otherwise ``sudo apt-get install -y pgbouncer``). labkit writes a private configuration
into a temporary folder, starts PgBouncer in the foreground on a free port of
``127.0.0.1`` and removes everything on exit, even when the block raises:

```python
with throwaway_server() as server:
    with pgbouncer(server.info(), mode="transaction", pool_size=4) as bouncer:
        settings = Settings(url=bouncer.info.url(), statement_timeout_ms=5000)
        engine = labkit.network.pooler.create_engine(settings)   # nothing session-level at connect
        ...
        bouncer.pools()   # SHOW POOLS: client and server connections
```

PgBouncer refuses to run as root; as root it runs as the ``labkit-pg`` system user, the
one the local PostgreSQL runs as. Clients authenticate to PgBouncer with the server's
own user and password (SCRAM), and PgBouncer logs in to the server with the same.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from labkit.lab.server import (
    HOST,
    SYSTEM_USER,
    ServerInfo,
    _ensure_system_user,
    free_port,
)

__all__ = [
    "INSTALL_COMMAND",
    "PgBouncer",
    "PgBouncerError",
    "find_pgbouncer",
    "pgbouncer",
    "run_async_workers",
]

Mode = Literal["session", "transaction", "statement"]

INSTALL_COMMAND = "apt-get install -y pgbouncer"
"""The one command that installs PgBouncer (Debian / Ubuntu; prefix ``sudo`` unless root)."""

# Where Debian puts the binary; /usr/sbin is not on a non-root user's PATH.
_CANDIDATES: tuple[str, ...] = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class PgBouncerError(Exception):
    """PgBouncer is missing, or did not start; carries the tail of its log."""


def find_pgbouncer() -> str:
    """Return the path of the ``pgbouncer`` binary.

    Raises:
        PgBouncerError: It is not installed; the message names the command to run.
    """
    found = shutil.which("pgbouncer") or next(
        (path for path in _CANDIDATES if Path(path).exists()), None)
    if found is None:
        sudo = "" if os.geteuid() == 0 else "sudo "
        raise PgBouncerError(f"PgBouncer is not installed: run `{sudo}{INSTALL_COMMAND}` "
                             "(or `make system-tools` as root)")
    return found


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@dataclass
class PgBouncer:
    """One running PgBouncer process; use it through ``pgbouncer()``.

    Attributes:
        info: Where clients connect: PgBouncer's port, the server's user, password and
            database. ``info.url()`` is a URL for labkit's ``Settings``.
        server: The PostgreSQL server behind it.
        mode: ``session``, ``transaction`` or ``statement``.
        pool_size: Server connections PgBouncer opens at most per user and database.
        folder: The configuration, log and nothing else; deleted on exit.
    """

    info: ServerInfo
    server: ServerInfo
    mode: Mode
    pool_size: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return (f"PgBouncer(port={self.info.port}, mode={self.mode!r}, "
                f"pool_size={self.pool_size}, server_port={self.server.port})")

    @property
    def log_file(self) -> Path:
        """PgBouncer's log (connections refused, errors)."""
        return self.folder / "pgbouncer.log"

    def log_tail(self, chars: int = 2000) -> str:
        """Return the end of PgBouncer's log."""
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run a ``SHOW`` command on PgBouncer's admin console; return rows as dicts.

        Example: ``bouncer.admin("SHOW POOLS")``. The console speaks the simple query
        protocol only, so it is reached with psycopg2 in autocommit.
        """
        import psycopg2

        conn = psycopg2.connect(host=self.info.host, port=self.info.port,
                                user=self.info.user, password=self.info.password,
                                dbname="pgbouncer", connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(command)
                names = [column.name for column in cur.description or []]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def pools(self) -> dict[str, int]:
        """Return the counts of ``SHOW POOLS`` for the server's database.

        Keys: ``cl_active`` (client connections paired with a server connection or
        idle), ``cl_waiting`` (clients waiting for one), ``sv_active``, ``sv_idle``,
        ``sv_used`` (server connections), summed over users.
        """
        keys = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used")
        totals = dict.fromkeys(keys, 0)
        for row in self.admin("SHOW POOLS"):
            if row.get("database") == self.server.database:
                for key in keys:
                    totals[key] += int(row.get(key) or 0)
        return totals

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL after ``STOP_TIMEOUT``); idempotent."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _write_config(folder: Path, server: ServerInfo, *, port: int, mode: Mode,
                  pool_size: int, max_client_conn: int, extra: dict[str, str],
                  users: dict[str, str]) -> Path:
    logins = {server.user: server.password, **users}
    (folder / "userlist.txt").write_text(
        "".join(f"{_quote(user)} {_quote(password)}\n" for user, password in logins.items()))
    settings = {
        "listen_addr": HOST,
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "scram-sha-256",
        "auth_file": str(folder / "userlist.txt"),
        "admin_users": server.user,
        "pool_mode": mode,
        "default_pool_size": str(pool_size),
        "min_pool_size": "0",
        "reserve_pool_size": "0",
        "max_client_conn": str(max_client_conn),
        "logfile": str(folder / "pgbouncer.log"),
        "log_connections": "0",
        "log_disconnections": "0",
        "server_login_retry": "1",
        **extra,
    }
    text = "[databases]\n"
    text += (f"{server.database} = host={server.host} port={server.port} "
             f"dbname={server.database}\n")
    text += "\n[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    config = folder / "pgbouncer.ini"
    config.write_text(text)
    return config


def _wait_ready(bouncer: PgBouncer, timeout: float) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        proc = bouncer.process
        if proc is None or proc.poll() is not None:
            raise PgBouncerError(
                f"pgbouncer exited with code {proc.returncode if proc else None}:\n"
                f"{bouncer.log_tail()}")
        try:
            bouncer.admin("SHOW VERSION")
            return
        except psycopg2.Error as exc:
            last = exc
            time.sleep(0.1)
    raise PgBouncerError(f"pgbouncer did not accept connections within {timeout:.0f} s: "
                         f"{last}\n{bouncer.log_tail()}")


@contextlib.contextmanager
def pgbouncer(server: ServerInfo, *, mode: Mode = "transaction", pool_size: int = 10,
              max_client_conn: int = 1000, settings: dict[str, str] | None = None,
              users: dict[str, str] | None = None) -> Iterator[PgBouncer]:
    """Run a PgBouncer in front of ``server`` for the duration of the block.

    Args:
        server: The PostgreSQL server (``LocalServer.info()``).
        mode: ``session`` (a client keeps its server connection until it disconnects),
            ``transaction`` (only for the length of a transaction) or ``statement``.
        pool_size: Server connections at most (PgBouncer's ``default_pool_size``).
        max_client_conn: Client connections PgBouncer accepts at most.
        settings: Further ``[pgbouncer]`` settings, e.g.
            ``{"ignore_startup_parameters": "options"}``.
        users: Further logins, ``{user: password}``, beside the server's own user (an
            application role). PgBouncer logs in to the server as the client's user.

    Yields:
        The running ``PgBouncer``; its ``info`` is where clients connect.

    Raises:
        PgBouncerError: The binary is missing (the message names the install command),
            or PgBouncer did not start within 20 s (with the end of its log).
    """
    if mode not in ("session", "transaction", "statement"):
        raise ValueError(f"mode must be 'session', 'transaction' or 'statement', not {mode!r}")
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    binary = find_pgbouncer()
    folder = Path(tempfile.mkdtemp(prefix="labkit-pgbouncer-"))
    port = free_port()
    bouncer = PgBouncer(info=ServerInfo(host=HOST, port=port, user=server.user,
                                        password=server.password, database=server.database),
                        server=server, mode=mode, pool_size=pool_size, folder=folder)

    def clean_up() -> None:
        bouncer.stop()
        shutil.rmtree(folder, ignore_errors=True)

    # A notebook may never reach its last cell: clean up when the kernel exits, too.
    atexit.register(clean_up)
    try:
        config = _write_config(folder, server, port=port, mode=mode, pool_size=pool_size,
                               max_client_conn=max_client_conn, extra=settings or {},
                               users=users or {})
        user: str | None = None
        if os.geteuid() == 0:
            user = SYSTEM_USER
            entry: pwd.struct_passwd = _ensure_system_user(user)
            os.chmod(folder, 0o700)
            for path in (folder, *folder.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as out:
            bouncer.process = subprocess.Popen(
                [binary, str(config)], stdin=stdin, stdout=out, stderr=out, user=user,
                cwd=str(folder), start_new_session=True)
        _wait_ready(bouncer, START_TIMEOUT)
        yield bouncer
    finally:
        clean_up()
        atexit.unregister(clean_up)


# One worker process: an async engine (labkit.network.pooler's or the plain one), ``transactions``
# transactions of a few statements each, then the distinct errors it met (as JSON).
_ASYNC_WORKER = r"""
import asyncio, json, sys
from sqlalchemy import text
from labkit.network import pooler
from labkit.config import Settings, parse_url
from labkit.engine import create_async_engine
from labkit.errors import redact

args = json.loads(sys.stdin.read())
settings = Settings(url=parse_url(args["url"]), application_name="labkit-worker")
if args["use_pooler"]:
    create_async_engine = pooler.create_async_engine

async def main():
    engine = create_async_engine(settings)
    ok, errors = 0, {}
    for i in range(args["transactions"]):
        try:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT cast(:i AS integer)"), {"i": i})
                await conn.execute(text("SELECT count(*) FROM pg_class WHERE relpages >= :i"),
                                   {"i": i % 3})
            ok += 1
        except Exception as exc:
            message = str(getattr(exc, "orig", exc)).splitlines()[0]
            message = redact(message, [settings.url.password])
            errors[message] = errors.get(message, 0) + 1
    await engine.dispose()
    print(json.dumps({"ok": ok, "errors": errors}))

asyncio.run(main())
"""


def run_async_workers(url: Any, *, processes: int = 2, transactions: int = 50,
                      use_pooler: bool, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run ``processes`` separate Python processes, each an asyncpg engine on ``url``.

    The processes start one after the other (each finishes before the next starts), so
    the result does not depend on how the machine schedules them: every process begins
    with asyncpg's statement counter at zero, as every worker of a service does.

    Args:
        url: Where to connect (a SQLAlchemy ``URL`` or string, password included).
        processes: How many worker processes.
        transactions: Transactions each runs (two statements each).
        use_pooler: the workers' engine comes from ``labkit.network.pooler.create_async_engine``
            (True) or ``labkit.create_async_engine`` (False).
        timeout: Seconds each process may take.

    Returns:
        One dict per process: ``ok`` (transactions committed) and ``errors`` (distinct
        error message → count).
    """
    import json
    import sys

    from sqlalchemy.engine import URL

    text_url = (url.render_as_string(hide_password=False) if isinstance(url, URL)
                else str(url))
    payload = json.dumps({"url": text_url, "use_pooler": use_pooler,
                          "transactions": transactions})
    results: list[dict[str, Any]] = []
    for _ in range(processes):
        proc = subprocess.run([sys.executable, "-c", _ASYNC_WORKER], input=payload,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise PgBouncerError(f"worker failed (exit code {proc.returncode}):\n"
                                 f"{proc.stderr[-2000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results
