"""A TCP fault proxy between a client and PostgreSQL: latency, cuts, lost answers.

``FaultProxy`` (no root needed) relays TCP connections to the server through
``127.0.0.1`` and breaks them on demand: added latency, a reset (RST) or a close (FIN)
of every open connection, an idle reaper that cuts flows idle longer than N seconds
(as a cloud load balancer does), "forward the request, then drop the reply" (a COMMIT
whose answer is lost), and a black hole (every flow stops, nobody is told). It is a
userspace program: its kernel ACKs every byte the client sends and answers its
keepalive probes, so a flow it stops relaying looks *alive* to the client's TCP stack
(keepalives and ``tcp_user_timeout`` see nothing wrong). For packets dropped in the
kernel, see ``labkit.lab.netns``.

```python
with FaultProxy(info.host, info.port) as proxy:
    engine = create_engine(Settings(url=proxy.url(info.url())))
    with proxy.added_latency(0.005):      # 5 ms more per round trip
        ...
    proxy.drop_commit_reply(times=1)      # the next COMMIT is run, its answer lost
    proxy.cut_all("reset")                # RST every relayed connection now
    with proxy.black_hole():              # every flow goes silent
        ...
    proxy.get_stats()                     # {"connections": 2, "commits": 1, ...}
```

What goes over the wire for ``COMMIT`` (checked with this proxy):

- psycopg2 (``connection.commit()``): a simple query, ``Q`` ``COMMIT``.
- asyncpg through SQLAlchemy: asyncpg's ``Transaction.commit()`` calls
  ``Connection.execute("COMMIT;")`` without arguments, also a simple query,
  ``Q`` ``COMMIT;``.
- A driver that sends ``COMMIT`` through the extended protocol
  (``Parse`` / ``Bind`` / ``Execute``) is matched at its ``Execute``.

Everything the proxy does runs on one asyncio event loop in a daemon thread, so it
works the same under sync and async clients. Leaving the ``with`` block closes the
listener and every relayed connection, even when the block raised. An SSL or
GSS-encrypted session cannot be read: it is relayed as it is, with no fault and no
latency (the local server has no SSL; libpq and asyncpg fall back to plain TCP).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import URL

__all__ = [
    "COMMITS",
    "CONNECTIONS",
    "CUTS",
    "OPEN_CONNECTIONS",
    "REAPED",
    "REPLIES_DROPPED",
    "REQUESTS",
    "Cut",
    "FaultProxy",
    "Reap",
]

T = TypeVar("T")

Cut = Literal["reset", "close"]
"""How a fault breaks the client's connection: ``reset`` (RST) or ``close`` (FIN)."""

Reap = Literal["reset", "close", "silent"]
"""How a fault ends a flow: RST, FIN, or by forgetting it silently (nobody is told)."""

# Keys of get_stats().
CONNECTIONS = "connections"            # client connections accepted
REQUESTS = "requests"                  # client messages that wait for an answer (Q, Sync)
COMMITS = "commits"                    # COMMIT statements relayed to the server
REPLIES_DROPPED = "replies_dropped"    # server answers thrown away by a fault
CUTS = "cuts"                          # client connections broken by a fault
REAPED = "reaped"                      # flows ended by the idle reaper
OPEN_CONNECTIONS = "open_connections"  # gauge: relayed connections open now

# Untyped first messages of the protocol (a 4-byte request code after the length).
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_KEYWORD = re.compile(r"\s*([A-Za-z]+)")
_BUFFER = 64 * 1024
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_REAPER_TICK = 0.05  # seconds between two looks for idle flows


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
    how: Reap


class _Pipe:
    """One direction of a link: writes now, or after the proxy's one-way delay.

    Delayed data waits in a queue with its due time and a pump task writes it then, so
    a reply of many messages is delayed once, not once per message, and order is kept.
    """

    def __init__(self, writer: asyncio.StreamWriter, proxy: FaultProxy) -> None:
        self.writer = writer
        self.proxy = proxy
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.pump: asyncio.Task[None] | None = None
        self.last_due = 0.0

    async def send(self, data: bytes) -> None:
        delay = self.proxy._one_way_delay
        if delay <= 0 and self.queue.empty():
            self.writer.write(data)
            await self.writer.drain()
            return
        loop = asyncio.get_running_loop()
        self.last_due = max(loop.time() + delay, self.last_due)
        self.queue.put_nowait((self.last_due, data))
        if self.pump is None or self.pump.done():
            self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            while not self.queue.empty():
                due, data = self.queue.get_nowait()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                # The rest of the same burst (an answer is several messages) goes with it:
                # one wake-up per answer, not one per message.
                chunks = [data]
                while not self.queue.empty() and self.queue._queue[0][0] <= loop.time():  # type: ignore[attr-defined]
                    chunks.append(self.queue.get_nowait()[1])
                self.writer.write(b"".join(chunks))
                await self.writer.drain()

    async def flushed(self) -> None:
        """Wait until every delayed message is written (or the pipe is stopped)."""
        pump = self.pump
        if pump is not None and not pump.done():
            await asyncio.wait({pump})

    def stop(self) -> None:
        if self.pump is not None:
            self.pump.cancel()


class _Link:
    """One relayed connection: the two streams and what the client has prepared."""

    def __init__(self, proxy: FaultProxy,
                 client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.to_server = _Pipe(self.server_writer, proxy)
        self.to_client = _Pipe(self.client_writer, proxy)
        # Extended protocol: the statement behind each prepared name and portal.
        self.statements: dict[bytes, str | None] = {}
        self.portals: dict[bytes, str | None] = {}
        # Set by the client side before an SSL/GSS request is relayed, so that the
        # server side reads the one-byte answer as such.
        self.encryption_answer: asyncio.Future[bytes] | None = None
        self.opaque = False            # encrypted or cancel: relay bytes blindly
        self.dropping: _Rule | None = None
        self.silenced = False          # reaped silently: the client is never told
        self.last_active = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []

    def touch(self) -> None:
        self.last_active = time.monotonic()

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
        self.to_client.stop()
        self.to_server.stop()
        if how == "reset":
            sock = self.client_writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.client_writer.transport.abort()
        else:
            self.client_writer.close()
        self.server_writer.close()

    def silence(self) -> None:
        """Forget the flow: stop relaying both ways, close the server side, tell nobody.

        The client's socket stays open and what it sends is read and thrown away, so
        its kernel keeps getting ACKs: to the client the connection looks alive.
        """
        self.silenced = True
        self.to_client.stop()
        self.to_server.stop()
        self.server_writer.close()


class FaultProxy:
    """Relay TCP connections to a PostgreSQL server and break them on demand.

    Args:
        server_host: the real server's address.
        server_port: the real server's port.
        host: where the proxy listens; ``127.0.0.1`` by default.
        port: the proxy's port; ``0`` (default) picks a free one, read it from
            ``port`` once started.

    Use it as a context manager; ``start`` and ``close`` do the same by hand. Each
    fault is undone when its own ``with`` block ends (``added_latency``,
    ``reaping_idle``), counted down as it fires (``drop_reply``), or instantaneous
    (``cut_all``); leaving the proxy's block undoes them all.
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
        self._one_way_delay = 0.0
        self._reap: tuple[float, Reap] | None = None
        self._black_hole = False
        self._swallowed: set[asyncio.StreamWriter] = set()  # accepted inside a black hole
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._port}" if self._port else "not started"
        return (f"<FaultProxy {where} -> {self.server_host}:{self.server_port} "
                f"armed={self.armed} latency={self.latency * 1000:g} ms>")

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
        with self._lock:
            self._rules.clear()
        self._one_way_delay = 0.0
        self._reap = None
        self._black_hole = False

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started: use it as a context manager")
        return self._port

    def url(self, url: URL) -> URL:
        """Return ``url`` pointed at the proxy instead of the server (password kept)."""
        return url.set(host=self.host, port=self.port)

    # --- latency ---------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """The round-trip time the proxy adds now, in seconds."""
        return 2 * self._one_way_delay

    @contextlib.contextmanager
    def added_latency(self, rtt: float) -> Iterator[FaultProxy]:
        """Add ``rtt`` seconds to every round trip for the duration of the block.

        Half is added each way, to every message of every relayed connection, in order:
        a statement and its answer together take ``rtt`` longer, as over a longer cable.
        The previous latency comes back when the block ends, even when it raised.
        """
        if not rtt >= 0:
            raise ValueError(f"rtt must be >= 0 seconds, got {rtt}")
        previous = self._one_way_delay
        self._one_way_delay = rtt / 2
        try:
            yield self
        finally:
            self._one_way_delay = previous

    # --- cuts and the idle reaper ------------------------------------------------------

    def cut_all(self, how: Cut = "reset") -> int:
        """Break every relayed connection now, RST or FIN; return how many were cut.

        Whatever each connection was doing (idle in a pool, inside a transaction), its
        client sees the connection end; the server side is closed, so the server rolls
        back any open transaction.
        """
        if how not in ("reset", "close"):
            raise ValueError(f"how must be 'reset' or 'close', got {how!r}")

        async def cut() -> int:
            links = [link for link in self._links if not link.silenced]
            for link in links:
                link.cut(how)
            return len(links)

        cut_count = self._on_loop(cut())
        with self._lock:
            self._stats[CUTS] += cut_count
        return cut_count

    @contextlib.contextmanager
    def reaping_idle(self, after: float, how: Reap = "silent") -> Iterator[FaultProxy]:
        """Cut flows idle (no byte either way) for ``after`` seconds, during the block.

        ``how``: ``"reset"`` (RST to the client), ``"close"`` (FIN), or ``"silent"``: the
        flow is forgotten, the server side closed, the client never told — and, this
        being a userspace proxy, its kernel still ACKs what the client sends, so the
        client waits for an answer that never comes and TCP keepalives see nothing.
        For a silent reaper that drops packets in the kernel, use
        ``NetworkNamespace.reaping_idle``. Flows are checked every 50 ms.
        """
        if not after > 0:
            raise ValueError(f"after must be > 0 seconds, got {after}")
        if how not in ("reset", "close", "silent"):
            raise ValueError(f"how must be 'reset', 'close' or 'silent', got {how!r}")
        previous = self._reap
        self._reap = (float(after), how)
        try:
            yield self
        finally:
            self._reap = previous

    @contextlib.contextmanager
    def black_hole(self) -> Iterator[FaultProxy]:
        """Stop every flow for the duration of the block, and tell nobody.

        The proxy's imitation of a partition: each relayed connection is forgotten
        (its server side closed, the client never told), and connections opened during
        the block are accepted and never relayed. Unlike a partition in the kernel
        (``labkit.lab.netns``), the proxy's kernel still ACKs what the client sends
        and answers its keepalive probes, so ``tcp_user_timeout`` and TCP keepalives
        see a healthy connection; only client-side deadlines end the wait. Flows caught
        in the block stay dead after it; new connections are relayed again.
        """
        async def silence_all() -> int:
            links = [link for link in self._links if not link.silenced]
            for link in links:
                link.silence()
            return len(links)

        self._black_hole = True
        try:
            self._on_loop(silence_all())
            yield self
        finally:
            self._black_hole = False

    # --- dropped replies ---------------------------------------------------------------

    def drop_commit_reply(self, times: int = 1, *, how: Reap = "reset") -> None:
        """Arm: relay the next ``times`` COMMITs, drop the server's answers, end the flow.

        The server runs each COMMIT and answers; the proxy waits for that answer
        (``ReadyForQuery``), discards it, then resets (``how="reset"``) or closes
        (``"close"``) the client's connection and closes the server's; or, with
        ``"silent"``, forgets the flow: the server's side is closed, the client is told
        nothing and waits. The transaction *is* committed.
        """
        self.drop_reply("COMMIT", times, how=how)

    def drop_reply(self, keyword: str, times: int = 1, *, how: Reap = "reset") -> None:
        """Arm the same fault for the next ``times`` statements starting with ``keyword``.

        ``keyword`` is a statement's first word, e.g. ``"INSERT"``: the server runs
        the statement inside the client's open transaction, its answer is lost and the
        connection cut, so the server rolls the transaction back. Rules armed earlier
        match first.
        """
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        if how not in ("reset", "close", "silent"):
            raise ValueError(f"how must be 'reset', 'close' or 'silent', got {how!r}")
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

    # --- statistics --------------------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Return the counters (see the module's key constants) and open connections."""
        with self._lock:
            stats = {key: self._stats[key] for key in (CONNECTIONS, REQUESTS, COMMITS,
                                                       REPLIES_DROPPED, CUTS, REAPED)}
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

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the proxy's event loop and wait for its result."""
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            raise RuntimeError("FaultProxy is not running")
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(_STOP_TIMEOUT)

    # --- the event loop thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            # select() sleeps to the microsecond; epoll, asyncio's default, rounds every
            # timeout up to a whole millisecond, which would add up to 1 ms to each
            # delayed message. The proxy has few sockets: select's limit is no concern.
            with asyncio.Runner(loop_factory=_precise_loop) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, self.host, self._requested_port)
        self._port = int(server.sockets[0].getsockname()[1])
        reaper = asyncio.create_task(self._reaper())
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            reaper.cancel()
            server.close()
            for swallowed in list(self._swallowed):
                swallowed.close()
            for link in list(self._links):
                link.cut("close")
                for task in link.tasks:
                    task.cancel()
            tasks = [task for link in list(self._links) for task in link.tasks]
            await asyncio.gather(reaper, *tasks, return_exceptions=True)
            await server.wait_closed()

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(_REAPER_TICK)
            reap = self._reap
            if reap is None:
                continue
            after, how = reap
            now = time.monotonic()
            for link in list(self._links):
                if link.silenced or link.opaque or now - link.last_active < after:
                    continue
                self._count(REAPED)
                if how == "silent":
                    link.silence()
                else:
                    link.cut(how)

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self._count(CONNECTIONS)
        if self._black_hole:  # accepted, then read and thrown away: the client waits
            self._swallowed.add(client_writer)
            try:
                with contextlib.suppress(ConnectionError, OSError):
                    while await client_reader.read(_BUFFER):
                        pass
            finally:
                self._swallowed.discard(client_writer)
                client_writer.close()
            return
        try:
            server = await asyncio.open_connection(self.server_host, self.server_port)
        except OSError:
            client_writer.close()  # the client sees the server as down, as it is
            return
        link = _Link(self, (client_reader, client_writer), server)
        with self._lock:
            self._links.add(link)
        link.tasks = [asyncio.create_task(self._client_to_server(link)),
                      asyncio.create_task(self._server_to_client(link))]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            link.to_client.stop()
            link.to_server.stop()
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
                await link.to_server.send(message)
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
                if link.silenced:
                    continue  # forgotten: read (so the kernel ACKs) and thrown away
                link.touch()
                if kind in (b"Q", b"S"):
                    self._count(REQUESTS)
                rule = self._take(link.runs(kind, body))
                if rule is not None and link.dropping is None:
                    link.dropping = rule  # before relaying: the answer may come at once
                await link.to_server.send(kind + size + body)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if link.dropping is None and not link.silenced:
                await link.to_server.flushed()
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
                if link.silenced:
                    return
                link.touch()
                rule = link.dropping
                if rule is None:
                    await link.to_client.send(kind + size + body)
                elif kind == b"Z":  # ReadyForQuery: the server has finished the statement
                    self._count(REPLIES_DROPPED)
                    if rule.how == "silent":
                        link.silence()
                        return
                    self._count(CUTS)
                    link.cut(rule.how)
                    return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if not link.silenced:
                await link.to_client.flushed()  # delayed answers first, then the FIN
                with contextlib.suppress(OSError, RuntimeError):
                    link.client_writer.close()
            link.server_writer.close()

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy bytes one way until end of stream, reading nothing into them."""
        while chunk := await reader.read(_BUFFER):
            writer.write(chunk)
            await writer.drain()


def _precise_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.SelectSelector())
