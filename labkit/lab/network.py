"""A TCP fault proxy between a client and PostgreSQL: lose the answer to a COMMIT.

The proxy listens on ``127.0.0.1`` and relays every connection to the real server,
reading the PostgreSQL wire protocol just enough to know which statement a client
runs. Armed, it lets a chosen statement reach the server, waits until the server has
answered it (so the server really ran it), throws that answer away and breaks the
client's connection: the client knows it sent ``COMMIT`` and cannot know whether the
server committed. That is the one failure a retry loop must not paper over:

```python
with FaultProxy(info.host, info.port) as proxy:
    engine = create_engine(Settings(url=proxy.url(info.url())))
    proxy.drop_commit_reply(times=1)      # the next COMMIT is run, its answer lost
    ...
    proxy.get_stats()                      # {"connections": 2, "commits": 1, ...}
```

What goes over the wire for ``COMMIT`` (checked with this proxy):

- psycopg2 (``connection.commit()``): a simple query, ``Q`` ``COMMIT``.
- asyncpg through SQLAlchemy: asyncpg's ``Transaction.commit()`` calls
  ``Connection.execute("COMMIT;")`` without arguments, also a simple query,
  ``Q`` ``COMMIT;``.
- A driver that sends ``COMMIT`` through the extended protocol
  (``Parse`` / ``Bind`` / ``Execute``) is matched at its ``Execute``.

Everything runs on one asyncio event loop in a daemon thread, so the proxy works the
same under sync and async clients. Leaving the ``with`` block closes the listener and
every relayed connection, even when the block raised. An SSL or GSS-encrypted
session cannot be read: it is relayed as it is, and no fault applies to it (the local
server has no SSL; libpq and asyncpg fall back to plain TCP).

Faults are rules matched against the statement a client message runs, counted down
per arming, and each connection is a ``_Link`` that can be cut with a FIN
(``how="close"``) or a RST (``how="reset"``); latency, idle reaping or cuts at other
points are meant to be added as further rules and link actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from sqlalchemy.engine import URL

__all__ = [
    "COMMITS",
    "CONNECTIONS",
    "CUTS",
    "OPEN_CONNECTIONS",
    "REPLIES_DROPPED",
    "Cut",
    "FaultProxy",
]

Cut = Literal["reset", "close"]
"""How a fault breaks the client's connection: ``reset`` (RST) or ``close`` (FIN)."""

# Keys of get_stats().
CONNECTIONS = "connections"            # client connections accepted
COMMITS = "commits"                    # COMMIT statements relayed to the server
REPLIES_DROPPED = "replies_dropped"    # server answers thrown away by a fault
CUTS = "cuts"                          # client connections broken by a fault
OPEN_CONNECTIONS = "open_connections"  # gauge: relayed connections open now

# Untyped first messages of the protocol (a 4-byte request code after the length).
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_KEYWORD = re.compile(r"\s*([A-Za-z]+)")
_BUFFER = 64 * 1024
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def _first_keyword(query: bytes) -> str | None:
    """Return the upper-cased first word of a statement (``END`` counts as ``COMMIT``)."""
    match = _KEYWORD.match(query.decode("utf-8", "replace"))
    if match is None:
        return None
    word = match.group(1).upper()
    return "COMMIT" if word == "END" else word


def _cstring(body: bytes, start: int = 0) -> tuple[bytes, int]:
    """Return the NUL-terminated string at ``start`` and the offset after it."""
    end = body.index(b"\0", start)
    return body[start:end], end + 1


@dataclass
class _Rule:
    """An armed fault: drop the answer to the next ``remaining`` statements ``keyword``."""

    keyword: str
    remaining: int
    how: Cut


class _Link:
    """One relayed connection: the two streams and what the client has prepared."""

    def __init__(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        # Extended protocol: the statement behind each prepared name and portal.
        self.statements: dict[bytes, str | None] = {}
        self.portals: dict[bytes, str | None] = {}
        # Set by the client side before an SSL/GSS request is relayed, so that the
        # server side reads the one-byte answer as such.
        self.encryption_answer: asyncio.Future[bytes] | None = None
        self.opaque = False            # encrypted or cancel: relay bytes blindly
        self.dropping: _Rule | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def runs(self, kind: bytes, body: bytes) -> str | None:
        """Return the keyword of the statement a client message makes the server run."""
        if kind == b"Q":
            return _first_keyword(_cstring(body)[0])
        if kind == b"P":
            name, offset = _cstring(body)
            self.statements[name] = _first_keyword(_cstring(body, offset)[0])
        elif kind == b"B":
            portal, offset = _cstring(body)
            self.portals[portal] = self.statements.get(_cstring(body, offset)[0])
        elif kind == b"E":
            return self.portals.get(_cstring(body)[0])
        elif kind == b"C" and body[:1] in (b"S", b"P"):
            names = self.statements if body[:1] == b"S" else self.portals
            names.pop(_cstring(body, 1)[0], None)
        return None

    def cut(self, how: Cut) -> None:
        """Break the client's connection (RST or FIN) and close the server's."""
        if how == "reset":
            sock = self.client_writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.client_writer.transport.abort()
        else:
            self.client_writer.close()
        self.server_writer.close()


class FaultProxy:
    """Relay TCP connections to a PostgreSQL server and break them on demand.

    Args:
        server_host: the real server's address.
        server_port: the real server's port.
        host: where the proxy listens; ``127.0.0.1`` by default.
        port: the proxy's port; ``0`` (default) picks a free one, read it from
            ``port`` once started.

    Use it as a context manager; ``start`` and ``close`` do the same by hand.
    """

    def __init__(self, server_host: str, server_port: int, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._stats: Counter[str] = Counter()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._port}" if self._port else "not started"
        return (f"<FaultProxy {where} -> {self.server_host}:{self.server_port} "
                f"armed={self.armed}>")

    # --- life cycle ------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> FaultProxy:
        """Start listening (in a daemon thread); return once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name="labkit-fault-proxy",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT):
            raise RuntimeError(f"FaultProxy did not start within {_START_TIMEOUT:g} s")
        if self._startup_error is not None:
            self._thread.join()
            raise RuntimeError("FaultProxy could not start") from self._startup_error
        return self

    def close(self) -> None:
        """Stop listening and close every relayed connection; safe to call twice."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(_STOP_TIMEOUT)

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started: use it as a context manager")
        return self._port

    def url(self, url: URL) -> URL:
        """Return ``url`` pointed at the proxy instead of the server (password kept)."""
        return url.set(host=self.host, port=self.port)

    # --- faults ----------------------------------------------------------------------

    def drop_commit_reply(self, times: int = 1, *, how: Cut = "reset") -> None:
        """Arm: relay the next ``times`` COMMITs, drop the server's answers, cut the client.

        The server runs each COMMIT and answers; the proxy waits for that answer
        (``ReadyForQuery``), discards it, then resets (``how="reset"``) or closes
        (``"close"``) the client's connection and closes the server's. The client sees
        a connection lost during COMMIT; the transaction *is* committed.
        """
        self.drop_reply("COMMIT", times, how=how)

    def drop_reply(self, keyword: str, times: int = 1, *, how: Cut = "reset") -> None:
        """Arm the same fault for the next ``times`` statements starting with ``keyword``.

        ``keyword`` is a statement's first word, e.g. ``"INSERT"``: the server runs
        the statement inside the client's open transaction, its answer is lost and the
        connection cut, so the server rolls the transaction back. Rules armed earlier
        match first.
        """
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        if how not in ("reset", "close"):
            raise ValueError(f"how must be 'reset' or 'close', got {how!r}")
        with self._lock:
            self._rules.append(_Rule(keyword.upper(), times, how))

    def disarm(self) -> None:
        """Forget every armed fault that has not fired yet."""
        with self._lock:
            self._rules.clear()

    @property
    def armed(self) -> int:
        """How many statements armed faults will still catch."""
        with self._lock:
            return sum(rule.remaining for rule in self._rules)

    def get_stats(self) -> dict[str, int]:
        """Return the counters (see the module's key constants) and open connections."""
        with self._lock:
            stats = {key: self._stats[key] for key in (CONNECTIONS, COMMITS, REPLIES_DROPPED,
                                                       CUTS)}
            stats[OPEN_CONNECTIONS] = len(self._links)
        return stats

    def pop_stats(self) -> dict[str, int]:
        """Return the counters like ``get_stats`` and reset them to zero."""
        stats = self.get_stats()
        with self._lock:
            self._stats.clear()
        return stats

    def _take(self, keyword: str | None) -> _Rule | None:
        """Count a statement; return (and count down) the armed rule it triggers."""
        if keyword is None:
            return None
        with self._lock:
            if keyword == "COMMIT":
                self._stats[COMMITS] += 1
            for rule in self._rules:
                if rule.keyword == keyword:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    return rule
        return None

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    # --- the event loop thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, self.host, self._requested_port)
        self._port = int(server.sockets[0].getsockname()[1])
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for link in list(self._links):
                link.cut("close")
                for task in link.tasks:
                    task.cancel()
            tasks = [task for link in list(self._links) for task in link.tasks]
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self._count(CONNECTIONS)
        try:
            server = await asyncio.open_connection(self.server_host, self.server_port)
        except OSError:
            client_writer.close()  # the client sees the server as down, as it is
            return
        link = _Link((client_reader, client_writer), server)
        with self._lock:
            self._links.add(link)
        link.tasks = [asyncio.create_task(self._client_to_server(link)),
                      asyncio.create_task(self._server_to_client(link))]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            link.client_writer.close()
            link.server_writer.close()
            with self._lock:
                self._links.discard(link)

    async def _client_to_server(self, link: _Link) -> None:
        reader, writer = link.client_reader, link.server_writer
        try:
            # Startup: untyped messages (length, request code) until the StartupMessage.
            while True:
                header = await reader.readexactly(8)
                length, code = struct.unpack("!ii", header)
                message = header + await reader.readexactly(length - 8)
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    link.encryption_answer = asyncio.get_running_loop().create_future()
                    writer.write(message)
                    await writer.drain()
                    if await link.encryption_answer in (b"S", b"G"):
                        link.opaque = True  # TLS/GSS from here on: unreadable
                        await self._relay(reader, writer)
                        return
                    continue
                writer.write(message)
                await writer.drain()
                if code == _CANCEL_REQUEST:
                    link.opaque = True
                    await self._relay(reader, writer)
                    return
                break
            # Then typed messages: kind (1 byte), length (4 bytes, itself included), body.
            while True:
                kind = await reader.readexactly(1)
                size = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack("!i", size)[0] - 4)
                rule = self._take(link.runs(kind, body))
                if rule is not None and link.dropping is None:
                    link.dropping = rule  # before relaying: the answer may come at once
                writer.write(kind + size + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if link.dropping is None:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()  # the client hung up: pass its FIN on

    async def _server_to_client(self, link: _Link) -> None:
        reader, writer = link.server_reader, link.client_writer
        try:
            while True:
                kind = await reader.readexactly(1)
                answer = link.encryption_answer
                if answer is not None and not answer.done():
                    writer.write(kind)  # the one-byte answer to an SSL/GSS request
                    await writer.drain()
                    answer.set_result(kind)
                    if kind in (b"S", b"G"):
                        await self._relay(reader, writer)
                        return
                    continue
                if link.opaque:
                    writer.write(kind)
                    await self._relay(reader, writer)
                    return
                size = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack("!i", size)[0] - 4)
                rule = link.dropping
                if rule is None:
                    writer.write(kind + size + body)
                    await writer.drain()
                elif kind == b"Z":  # ReadyForQuery: the server has finished the statement
                    self._count(REPLIES_DROPPED)
                    self._count(CUTS)
                    link.cut(rule.how)
                    return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                link.client_writer.close()
            link.server_writer.close()

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy bytes one way until end of stream, reading nothing into them."""
        while chunk := await reader.read(_BUFFER):
            writer.write(chunk)
            await writer.drain()
