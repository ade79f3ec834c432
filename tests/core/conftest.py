"""Fixtures for the core's behaviour tests, which also run against a renamed copy.

These tests import the core by name: ``LABKIT_CORE`` (default ``labkit``; the copy test
sets ``myapp.db``). They need only SQLAlchemy, the drivers, pytest and pytest-asyncio,
and a real PostgreSQL: ``LABKIT_CORE_DATABASE_URL``, else the kit's shared server.
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy.engine import URL, make_url

ROOT = os.environ.get("LABKIT_CORE", "labkit")


class Core:
    """The core under test: ``core.Settings``, ``core.errors.ProgrammingError``, ..."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.package = importlib.import_module(root)

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self.package, name)
        except AttributeError:
            return importlib.import_module(f"{self.root}.{name}")


@pytest.fixture(scope="session")
def core() -> Core:
    return Core(ROOT)


@pytest.fixture(scope="session")
def core_url() -> URL:
    raw = os.environ.get("LABKIT_CORE_DATABASE_URL")
    if raw:
        return make_url(raw)
    from labkit.lab import database_url  # in the kit's own suite only

    return database_url()


class FaultProxy:
    """A TCP proxy to the server that can freeze (accept, ACK, never answer) or drop the
    server's answer to a COMMIT (the client's connection closes after the server got it)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = threading.Event()
        self.drop_commit_answer = threading.Event()
        self.commits_dropped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            state = {"dropping": False}
            threading.Thread(target=self._pipe, args=(client, server, state, True),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, state, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict[str, bool],
              upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.01)
                if upstream and self.drop_commit_answer.is_set() and data[:1] == b"Q" \
                        and b"COMMIT" in data.upper():
                    state["dropping"] = True
                if not upstream and state["dropping"]:
                    self.commits_dropped += 1
                    return  # the server committed; the client never hears it (finally)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def url(self, base: URL) -> URL:
        return base.set(host="127.0.0.1", port=self.port)

    def close(self) -> None:
        self.frozen.clear()
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def proxy(core_url: URL) -> Iterator[FaultProxy]:
    fault = FaultProxy(core_url.host or "127.0.0.1", core_url.port or 5432)
    yield fault
    fault.close()


def module(core: Core, name: str) -> ModuleType:
    return importlib.import_module(f"{core.root}.{name}")
