"""Real partitions: a private network namespace where nftables rules drop packets.

``NetworkNamespace`` is a network namespace with its own loopback, where a throwaway
server listens and where nftables rules drop packets *in the kernel*: a real
``partition`` (nothing ACKed, so TCP's own timers run), replies lost on the way back
(``partition(port, "replies")``), and an idle reaper (``reaping_idle``) that forgets
idle flows the way a NAT or stateful firewall does, silently or with a RST. The host's
network and firewall are never touched.

**No root needed.** A helper process holds the namespace. For an ordinary user it is
started with ``unshare --user --map-current-user --net --keep-caps``: a user namespace
in which the user keeps its own uid (PostgreSQL refuses to run as root, even a root
mapped in a user namespace) and holds ``CAP_NET_ADMIN`` over its own network
namespace, enough for nftables and the conntrack settings. As root, plain
``unshare --net``. The kernel must allow unprivileged user namespaces (most
distributions do; some restrict them: ``namespace_unavailable`` says why not).

**Code runs inside the helper.** Linux lets a process join a user namespace only while
it has a single thread, and a socket belongs for its whole life to the namespace it
was created in; so a client of the namespace's server must *run* in the helper.
``call(fn, *args)`` sends ``fn`` (by reference: a module-level function) and its
arguments to the helper, which runs it in a thread of its own and sends back the
result or the exception (pickled). Processes it starts (``pg_ctl``, ``nft``) are born
inside, so ``LocalServer(netns=ns)`` listens on the namespace's own ``127.0.0.1``.
Inside the helper, the namespace object arrives as a handle whose ``call`` runs at
once and whose faults (``partition``, ``reaping_idle``) work the same.

```python
with NetworkNamespace() as ns, throwaway_server(netns=ns) as server:
    ns.call(experiment, ns, server.info().url())   # a module-level function, run inside
```

Leaving the block ends the helper: the namespace and every rule in it disappear once
its last process (the server) and socket are gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import itertools
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

__all__ = ["NetworkNamespace", "NftTable", "namespace_unavailable"]

T = TypeVar("T")

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: the interface name, then the flags (40 bytes)
_CONNTRACK = "/proc/sys/net/netfilter"
_FD_ENV = "LABKIT_NETNS_FD"
_START_TIMEOUT = 30.0
_HEADER = struct.Struct("!I")


def _unshare_command() -> list[str] | None:
    """The command that starts a process in a new network namespace, or None."""
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None)
    if unshare is None:
        return None
    if os.geteuid() == 0:
        return [unshare, "--net"]
    return [unshare, "--user", "--map-current-user", "--net", "--keep-caps"]


def _nft() -> str | None:
    """Path of the ``nft`` command (``/usr/sbin`` may be missing from a user's PATH)."""
    found = shutil.which("nft")
    if found is None:
        found = next((path for path in ("/usr/sbin/nft", "/sbin/nft") if os.access(path, os.X_OK)),
                     None)
    return found


@functools.cache
def namespace_unavailable() -> str | None:
    """Return why ``NetworkNamespace`` cannot work here, or ``None`` when it can.

    It needs Linux, the ``unshare`` command (util-linux), the ``nft`` command (Debian
    package ``nftables``; installing it needs root once: ``make system-tools``) and,
    for an ordinary user, a kernel that allows unprivileged user namespaces. The check
    lists the ruleset of a fresh, empty namespace (about 10 ms); its answer is kept.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux-only (this is {sys.platform})"
    unshare = _unshare_command()
    if unshare is None:
        return "the unshare command is missing (Debian package util-linux)"
    nft = _nft()
    if nft is None:
        return "the nft command is missing: sudo apt-get install nftables (make system-tools)"
    try:
        proc = subprocess.run([*unshare, nft, "list", "ruleset"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace here: {exc}"
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        hint = "" if os.geteuid() == 0 else (
            " (this kernel does not let an ordinary user create a user namespace with "
            "nftables rules: sysctl kernel.unprivileged_userns_clone, or an AppArmor "
            "restriction, e.g. kernel.apparmor_restrict_unprivileged_userns on Ubuntu)")
        return f"cannot create a network namespace here: {why}{hint}"
    return None


@dataclass(frozen=True)
class NftTable:
    """An nftables table a fault installed in a namespace; ``dropped()`` reads its counters."""

    namespace: NetworkNamespace
    name: str

    def dropped(self) -> int:
        """Return how many packets the table's rules have dropped or rejected so far."""
        out = self.namespace.nft(f"list table inet {self.name}", json_output=True)
        total = 0
        for item in json.loads(out).get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total


class NetworkNamespace:
    """A private network namespace (its own loopback), held by a helper process.

    Works for root and, where the kernel allows unprivileged user namespaces, for an
    ordinary user (``namespace_unavailable`` says whether it works here). Everything
    runs on the namespace's ``127.0.0.1``; the host's network and firewall are never
    touched. Use it as a context manager:

    ```python
    with NetworkNamespace() as ns, throwaway_server(netns=ns) as server:
        port = server.info().port
        with ns.partition(port) as table:    # every packet to or from the server dropped
            ...
        table.dropped()                      # packets the rules dropped
    ```

    Code that must reach the server runs inside with ``call`` (a module-level function
    and picklable arguments) or ``run_async`` (an ``async`` function).
    """

    def __init__(self) -> None:
        self._inode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None
        self._tables = itertools.count(1)
        self._stderr: Any = None  # the helper's stderr, a temporary file

    def __repr__(self) -> str:
        state = f"net:[{self._inode}]" if self._inode is not None else "closed"
        return f"<NetworkNamespace {state}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to the helper: there, a handle on the namespace it is in.
        return (_handle, (self._inode,))

    def __enter__(self) -> NetworkNamespace:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> NetworkNamespace:
        """Start the helper process in a new namespace and bring its loopback up."""
        if self._proc is not None:
            raise RuntimeError("NetworkNamespace already open")
        command = _unshare_command()
        if command is None:
            raise OSError("the unshare command is missing (Debian package util-linux)")
        ours, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, _FD_ENV: str(theirs.fileno()),
               # Functions are sent by reference: the helper imports what the caller can.
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                              *[p for p in sys.path if p]])}
        try:
            self._proc = subprocess.Popen(
                [*command, sys.executable, "-m", "labkit.lab.netns"], env=env,
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._stderr, cwd="/")
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(_START_TIMEOUT)
        try:
            hello = _receive(ours)
        except (OSError, EOFError) as exc:
            self._stderr.seek(0)
            error = self._stderr.read().decode(errors="replace")
            self.close()
            raise OSError(f"the namespace helper did not start: {error.strip() or exc}") from exc
        ours.settimeout(None)
        self._inode = int(hello)
        self._reader = threading.Thread(target=self._read_replies, name="labkit-netns-replies",
                                        daemon=True)
        self._reader.start()
        return self

    def close(self) -> None:
        """End the helper (the namespace ends with its last process and socket); idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        for future in list(self._pending.values()):
            future.set_exception(OSError("the namespace helper ended"))
        self._pending.clear()

    def inside(self) -> bool:
        """Return True when the calling code runs in this namespace (in the helper)."""
        return self._inode is not None and \
            os.stat("/proc/thread-self/ns/net").st_ino == self._inode

    # --- running code inside ----------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` inside, in a thread of the helper; return its result.

        ``fn`` travels by reference (a function defined at module level) and its
        arguments and result by pickle; an exception it raises is raised here. Sockets
        it creates stay inside; processes it starts are born inside.
        """
        if self.inside():
            return fn(*args, **kwargs)
        sock = self._sock
        if sock is None:
            raise RuntimeError("NetworkNamespace is not open: use it as a context manager")
        request_id = next(self._ids)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._pending[request_id] = future
        payload = pickle.dumps((request_id, pickle.dumps((fn, args, kwargs))))
        with self._send_lock:
            sock.sendall(_HEADER.pack(len(payload)) + payload)
        ok, value = future.result()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def run_async(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``asyncio.run(fn(*args))`` inside (in a thread of the helper); return its result."""
        return self.call(_run_async, fn, args)

    def run(self, args: list[str], *, input: str | None = None) -> str:
        """Run a command inside (e.g. ``["ss", "-tn"]``); return its output, raise on failure."""
        proc = self.call(subprocess.run, args, input=input, capture_output=True, text=True,
                         check=False)
        if proc.returncode != 0:
            raise OSError(f"{' '.join(args)} failed in the namespace ({proc.returncode}): "
                          f"{proc.stderr.strip()}")
        return str(proc.stdout)

    def _read_replies(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                request_id, ok, value = pickle.loads(_receive(sock))
            except (OSError, EOFError, pickle.UnpicklingError):
                break
            future = self._pending.pop(request_id, None)
            if future is not None:
                future.set_result((ok, value))
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(OSError("the namespace helper ended"))

    # --- rules -----------------------------------------------------------------------

    def nft(self, script: str, *, json_output: bool = False) -> str:
        """Run an ``nft`` script inside (e.g. ``"list ruleset"``); return its output.

        ``json_output`` asks for JSON (``nft -j``), for listing commands.
        """
        nft = _nft()
        if nft is None:
            raise OSError("the nft command is missing: sudo apt-get install nftables")
        if json_output:
            return self.run([nft, "-j", *script.split()])
        return self.run([nft, "-f", "-"], input=script + "\n")

    @contextlib.contextmanager
    def _table(self, kind: str, chain: str) -> Iterator[NftTable]:
        # Unique per helper and handle: a process id and a counter.
        name = f"labkit_{kind}_{os.getpid()}_{next(self._tables)}"
        self.nft(f"table inet {name} {{\n{chain}\n}}")
        try:
            yield NftTable(self, name)
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                self.nft(f"delete table inet {name}")

    @contextlib.contextmanager
    def partition(self, port: int, direction: Literal["both", "replies"] = "both",
                  ) -> Iterator[NftTable]:
        """Drop TCP packets to and from ``port`` inside, for the duration of the block.

        A real partition: the kernel drops the packets (nothing is ACKed), so the
        sender's TCP retransmits, keepalive probes go unanswered and
        ``tcp_user_timeout`` runs; new connections hang in SYN. Packets are dropped on
        arrival (the ``input`` hook). ``direction="replies"`` drops only what the
        server sends (its answers and its ACKs): requests still arrive and run, their
        answers are lost. The rule is removed when the block ends, even when it raised;
        packets in retransmission then get through.
        """
        if direction not in ("both", "replies"):
            raise ValueError(f"direction must be 'both' or 'replies', got {direction!r}")
        rules = [f"    tcp sport {int(port)} counter drop"]
        if direction == "both":
            rules.insert(0, f"    tcp dport {int(port)} counter drop")
        chain = ("  chain input { type filter hook input priority 0; policy accept;\n"
                 + "\n".join(rules) + "\n  }")
        with self._table("partition", chain) as table:
            yield table

    @contextlib.contextmanager
    def reaping_idle(self, port: int, after: int, how: Literal["drop", "reset"] = "drop",
                     ) -> Iterator[NftTable]:
        """Forget TCP flows to ``port`` idle for ``after`` seconds, as a NAT or firewall does.

        Connection tracking inside the namespace is set to forget an established flow
        after ``after`` seconds without a packet and to refuse to pick up a flow it
        does not know mid-stream; a packet of a forgotten flow is then dropped
        (``how="drop"``, silent: the sender retransmits into the void) or answered with
        a RST (``"reset"``). Any packet keeps a flow alive, TCP keepalive probes
        included. Arm it *before* opening the connections it should watch: flows
        opened earlier are unknown to it and would be cut at their next packet.
        The settings and the rule are restored when the block ends.
        """
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"after must be a whole number of seconds >= 1, got {after!r}")
        if how not in ("drop", "reset"):
            raise ValueError(f"how must be 'drop' or 'reset', got {how!r}")
        verdict = "drop" if how == "drop" else "reject with tcp reset"
        chain = ("  chain output { type filter hook output priority 0; policy accept;\n"
                 f"    tcp dport {int(port)} ct state invalid counter {verdict}\n"
                 f"    tcp sport {int(port)} ct state invalid counter {verdict}\n  }}")
        # The table first: its ct rules switch connection tracking on in the namespace.
        with self._table("reaper", chain) as table:
            saved = self.call(_set_conntrack, {"nf_conntrack_tcp_timeout_established":
                                               str(after), "nf_conntrack_tcp_loose": "0"})
            try:
                yield table
            finally:
                self.call(_set_conntrack, saved)


# --- the helper side ---------------------------------------------------------------------

def _handle(inode: int | None) -> NetworkNamespace:
    """Rebuild a namespace sent to the helper: a handle whose ``call`` runs at once."""
    handle = NetworkNamespace()
    handle._inode = inode
    return handle


def _run_async(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    return asyncio.run(fn(*args))  # type: ignore[arg-type]


def _receive(sock: socket.socket) -> bytes:
    header = _read_exactly(sock, _HEADER.size)
    return _read_exactly(sock, _HEADER.unpack(header)[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _loopback_up() -> None:
    """Bring ``lo`` up in the calling process's namespace (``ip link set lo up``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def _set_conntrack(values: dict[str, str]) -> dict[str, str]:
    """Write conntrack settings of the calling process's namespace; return the old ones."""
    old: dict[str, str] = {}
    for name, value in values.items():
        path = f"{_CONNTRACK}/{name}"
        with open(path) as fh:
            old[name] = fh.read().strip()
        with open(path, "w") as fh:
            fh.write(value)
    return old


def _serve(sock: socket.socket) -> None:
    """The helper: run each request in a thread, answer it; end when the caller hangs up."""
    send_lock = threading.Lock()

    def answer(request_id: int, ok: bool, value: Any) -> None:
        try:
            payload = pickle.dumps((request_id, ok, value))
        except Exception as exc:  # noqa: BLE001 - an unpicklable result or exception
            payload = pickle.dumps((request_id, False, RuntimeError(
                f"{type(value).__name__}: {value} (could not be sent back: {exc})")))
        with send_lock, contextlib.suppress(OSError):
            sock.sendall(_HEADER.pack(len(payload)) + payload)

    def run(request_id: int, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - sent back to the caller
            answer(request_id, False, exc)
        else:
            answer(request_id, True, value)

    _loopback_up()
    inode = os.stat("/proc/self/ns/net").st_ino
    payload = str(inode).encode()
    sock.sendall(_HEADER.pack(len(payload)) + payload)
    while True:
        try:
            data = _receive(sock)
        except (OSError, EOFError):
            return
        request_id, call = pickle.loads(data)
        try:
            fn, args, kwargs = pickle.loads(call)
        except Exception as exc:  # noqa: BLE001 - e.g. a function the helper cannot import
            answer(request_id, False, exc)
            continue
        threading.Thread(target=run, args=(request_id, fn, args, kwargs), daemon=True).start()


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(os.environ.pop(_FD_ENV))))
