"""Web services as real processes: an application under uvicorn on a free port.

Notebook 05 and the tests measure what happens *around* a request (when the COMMIT
runs, what a streamed response holds, what a probe answers during an outage), which
only a real server shows: bytes leave a real socket, uvicorn's lifespan opens and
closes the pool, FastAPI's threadpool and event loop are the real ones.

``uvicorn_service`` starts ``python -m uvicorn target`` in a child process, waits until
it serves HTTP (uvicorn accepts connections only once the application's lifespan has
started), and always stops it: SIGTERM first, so the lifespan disposes of its pool,
then SIGKILL if it does not exit in time. A kernel that dies mid-cell still stops it
(``atexit``).

Example:
    ```python
    with uvicorn_service("examples.fastapi_app:app", database_url=database_url()) as svc:
        httpx.get(f"{svc.base_url}/live")
    ```
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy.engine import URL

from labkit.lab.server import free_port

__all__ = ["REPOSITORY_ROOT", "Service", "ServiceError", "uvicorn_service"]

#: The folder holding ``labkit/`` and ``examples/``: uvicorn imports targets from it.
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.05


class ServiceError(RuntimeError):
    """The service exited or did not serve in time; the message ends with its log."""


@dataclass(frozen=True)
class Service:
    """A running service: where it listens, its process, and its log file.

    Attributes:
        target: What uvicorn serves, ``"module:attribute"``.
        base_url: ``http://127.0.0.1:<port>``.
        port: The TCP port it listens on.
        pid: The uvicorn process id.
        log: The file receiving its standard output and error.
        started_in_s: Seconds from launching the process to its first HTTP answer.
    """

    target: str
    base_url: str
    port: int
    pid: int
    log: Path
    started_in_s: float

    def log_text(self) -> str:
        """Return everything the service has logged so far."""
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """Return the log once it contains ``needle``.

        Raises:
            ServiceError: ``needle`` did not appear within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while needle not in (content := self.log_text()):
            if time.monotonic() > deadline:
                raise ServiceError(f"{needle!r} not in the log of {self.target} after "
                                   f"{timeout:g} s:\n{content[-3000:]}")
            time.sleep(_POLL_S)
        return content


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # uvicorn runs the lifespan's shutdown
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def uvicorn_service(target: str, *, database_url: URL | str | None = None,
                    env: Mapping[str, str] | None = None, factory: bool = False,
                    app_dir: Path = REPOSITORY_ROOT, ready_path: str = "/openapi.json",
                    start_timeout: float = START_TIMEOUT_S,
                    stop_timeout: float = STOP_TIMEOUT_S,
                    log: Path | None = None,
                    extra_args: tuple[str, ...] = ()) -> Iterator[Service]:
    """Serve ``target`` with uvicorn in a child process on a free port; stop it on exit.

    The child inherits this process's environment with ``DATABASE_URL`` replaced by
    ``database_url`` (password included: it goes to the child, never to output),
    ``ENVIRONMENT`` removed, then ``env`` applied (e.g. ``{"DB_POOL_SIZE": "2"}``).

    Args:
        target: ``"module:attribute"``, e.g. ``"examples.fastapi_app:app"``.
        database_url: The database the service uses; ``None`` keeps the environment's.
        env: More environment variables for the service.
        factory: ``target`` is a function returning the app (uvicorn ``--factory``).
        app_dir: The folder ``target`` is imported from.
        ready_path: A path answered without the database; the first 2xx means serving.
        start_timeout: Seconds to wait for that first answer.
        stop_timeout: Seconds between SIGTERM and SIGKILL on exit.
        log: Where the service's output goes (default: a temporary file, kept).
        extra_args: More uvicorn arguments (``("--workers", "2")``).

    Yields:
        The running ``Service``.

    Raises:
        ServiceError: The process exited, or did not answer within ``start_timeout``;
            the message carries the end of its log.
    """
    port = free_port()
    child_env = dict(os.environ)
    child_env.pop("ENVIRONMENT", None)
    if database_url is not None:
        child_env["DATABASE_URL"] = (database_url.render_as_string(hide_password=False)
                                     if isinstance(database_url, URL) else str(database_url))
    child_env.update(env or {})
    if log is None:
        handle, name = tempfile.mkstemp(prefix="labkit-uvicorn-", suffix=".log")
        os.close(handle)
        log = Path(name)
    command = [sys.executable, "-m", "uvicorn", target, "--app-dir", str(app_dir),
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
               *(["--factory"] if factory else []), *extra_args]
    base_url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=app_dir, env=child_env, stdout=out,
                                   stderr=subprocess.STDOUT)

    def clean_up() -> None:
        _stop(process, stop_timeout)

    atexit.register(clean_up)
    try:
        with httpx.Client(timeout=1.0) as client:
            while True:
                if process.poll() is not None:
                    raise ServiceError(f"uvicorn {target} exited with {process.returncode}:"
                                       f"\n{log.read_text(errors='replace')[-3000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(base_url + ready_path).is_success:
                        break
                if time.monotonic() - start > start_timeout:
                    raise ServiceError(
                        f"uvicorn {target} did not serve within {start_timeout:g} s:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
                time.sleep(_POLL_S)
        yield Service(target=target, base_url=base_url, port=port, pid=process.pid,
                      log=log, started_in_s=time.monotonic() - start)
    finally:
        clean_up()
        atexit.unregister(clean_up)
