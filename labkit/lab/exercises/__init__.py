"""Exercises: broken code the learner fixes in a notebook, checked against the real server.

Every notebook ends with a section "Exercises". Each exercise is a Markdown cell (the
task), a code cell with the broken starting code (tagged in its metadata with
``{"labkit": {"exercise": "NN.k"}}``) and a check cell:

```python
from labkit.lab.exercises import check
check("01.1", globals())
```

``check`` runs the exercise's check function on the names the learner's cell defined,
against the real PostgreSQL server, and prints ``PASS 01.1 - ...`` or
``NOT YET 01.1 - ...`` with a hint. It never raises for a failed check, so a notebook
still runs top to bottom with the broken starting code.

A check lives in a module ``labkit.lab.exercises.nbNN`` (NN: the notebook's number)
and is registered with the ``exercise`` decorator:

```python
from labkit.lab.exercises import ExerciseFailed, exercise, require

@exercise("01.1", title="A dependency that leaks", hint="Close the session in finally.")
def leaky_dependency(namespace, url):
    get_db = require(namespace, "get_db", callable)
    ...
    if leaked:
        raise ExerciseFailed(f"{leaked} of 10 sessions were never closed")
    return "10 requests, 0 connections left checked out"
```

A check function takes the learner's namespace and the server's URL, returns a short
success detail or raises ``ExerciseFailed``. It leaves nothing behind (unique table
names from ``unique_name``, dropped; engines disposed) and is bounded in time even on
broken code (short pool timeouts, ``statement_timeout``, timeouts on threads):
``scratch_schema``, ``scratch_engine`` and ``scratch_async_engine`` give a fresh schema
and engines with short timeouts whose ``search_path`` is that schema, so the learner's
SQL can name plain tables (``accounts``) without meeting anyone else's;
``check`` also gives up on a check after ``timeout`` seconds. The reference solution of
exercise NN.k is ``solutions/NN_k.py`` at the repository root; the test suite runs every
registered check on the starting cell (must fail) and on the solution (must pass).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from labkit.config import to_async_url, to_sync_url
from labkit.errors import redact

__all__ = [
    "CheckResult",
    "Exercise",
    "ExerciseFailed",
    "check",
    "exercise",
    "is_number",
    "registry",
    "require",
    "scratch_async_engine",
    "scratch_engine",
    "scratch_schema",
    "unique_name",
]

CheckFunction = Callable[[Mapping[str, Any], URL], str]

# Seconds a check may take before ``check`` gives up on it (a safety net: each check
# bounds its own waits far below this).
DEFAULT_TIMEOUT = 20.0

_ID = re.compile(r"^(\d\d)\.(\d+)$")
_MODULE = re.compile(r"^nb\d\d$")
_REGISTRY: dict[str, Exercise] = {}


class ExerciseFailed(Exception):
    """The learner's code does not do what the exercise asks; the message says why."""


@dataclass(frozen=True)
class Exercise:
    """A registered exercise: its id ("NN.k"), title, hint and check function.

    Attributes:
        id: "NN.k": the notebook's number and the exercise's number in it.
        title: A short title, shown in the docs' list of exercises.
        hint: One or two sentences that point towards the fix, shown with NOT YET.
        function: The check: ``function(namespace, url) -> detail``, raising
            ``ExerciseFailed`` when the code is not fixed yet.
        timeout: Seconds after which ``check`` stops waiting for the check.
    """

    id: str
    title: str
    hint: str
    function: CheckFunction
    timeout: float = DEFAULT_TIMEOUT

    @property
    def notebook(self) -> str:
        """The notebook's two-digit number, e.g. "01"."""
        return self.id.split(".")[0]

    @property
    def solution_name(self) -> str:
        """The reference solution's file name in ``solutions/``, e.g. "01_1.py"."""
        return self.id.replace(".", "_") + ".py"


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` found: passed or not, with the detail or the reason and hint.

    Attributes:
        id: The exercise's id.
        passed: True when the check passed.
        message: The success detail, or the reason it failed followed by the hint.
    """

    id: str
    passed: bool
    message: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'NOT YET'} {self.id} - {self.message}"

    def _ipython_display_(self) -> None:
        # ``check`` has printed the result already; a check cell's last expression
        # would otherwise show it a second time as a repr.
        return None


def exercise(id: str, *, title: str, hint: str,
             timeout: float = DEFAULT_TIMEOUT) -> Callable[[CheckFunction], CheckFunction]:
    """Register a check function as exercise ``id``.

    Args:
        id: "NN.k" (notebook number, exercise number), e.g. "02.1".
        title: A short title for the list of exercises.
        hint: What to look at when the check fails.
        timeout: Seconds ``check`` waits for the function before giving up.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        ValueError: The id is malformed or already registered.
    """
    if not _ID.match(id):
        raise ValueError(f"exercise id must look like '02.1', got {id!r}")

    def register(function: CheckFunction) -> CheckFunction:
        known = _REGISTRY.get(id)
        if known is not None and known.function.__qualname__ != function.__qualname__:
            raise ValueError(f"exercise {id} is registered twice")
        _REGISTRY[id] = Exercise(id=id, title=title, hint=hint, function=function,
                                 timeout=timeout)
        return function

    return register


def registry() -> dict[str, Exercise]:
    """Import every ``labkit.lab.exercises.nbNN`` module and return the exercises by id.

    Returns:
        The registered exercises, sorted by notebook and number.
    """
    for module in pkgutil.iter_modules(__path__):
        if _MODULE.match(module.name):
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda item: _sort_key(item[0])))


def _sort_key(id: str) -> tuple[int, int]:
    notebook, number = id.split(".")
    return int(notebook), int(number)


def require(namespace: Mapping[str, Any], name: str,
            kind: Callable[[Any], bool] | type | None = None, *,
            what: str | None = None) -> Any:
    """Return ``namespace[name]``, or fail the check with a message naming it.

    Args:
        namespace: The learner's names (a notebook's ``globals()``).
        name: The name the exercise's cell defines.
        kind: A type the value must be an instance of, or a predicate such as
            ``callable``; None accepts anything.
        what: How to name the expected kind in the message, e.g. "an async function".

    Returns:
        The value.

    Raises:
        ExerciseFailed: The name is missing or of the wrong kind.
    """
    if name not in namespace:
        raise ExerciseFailed(f"`{name}` is not defined: run the exercise's code cell "
                             "first (and keep the name)")
    value = namespace[name]
    if isinstance(kind, type):
        ok = isinstance(value, kind)
        what = what or f"a {kind.__name__}"
    else:
        ok = kind is None or bool(kind(value))
        what = what or getattr(kind, "__name__", "what the exercise expects")
    if not ok:
        raise ExerciseFailed(f"`{name}` should be {what}, not {type(value).__name__}")
    return value


def is_number(value: Any) -> bool:
    """True for an int or a float, not a bool: a ``require`` predicate for numbers."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unique_name(prefix: str = "ex") -> str:
    """Return a fresh SQL identifier such as ``ex_3f2a9c1b0d4e`` for a scratch table."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# Server-side bounds of every scratch connection (milliseconds).
STATEMENT_TIMEOUT_MS = 5000
LOCK_TIMEOUT_MS = 2000


@contextlib.contextmanager
def scratch_schema(url: URL) -> Iterator[str]:
    """Create a fresh schema for one check and drop it (with everything in it) afterwards.

    Args:
        url: The server.

    Yields:
        The schema's name; pass it to ``scratch_engine`` or ``scratch_async_engine``.
    """
    schema = unique_name("ex")
    admin = scratch_engine(url, application_name="labkit-exercise-admin", pool_size=1)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        yield schema
    finally:
        try:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        finally:
            admin.dispose()


def scratch_engine(url: URL, *, schema: str | None = None,
                   application_name: str = "labkit-exercise", pool_size: int = 5,
                   max_overflow: int = 0, pool_timeout: float = 2.0,
                   **kwargs: Any) -> Engine:
    """Return a psycopg2 engine whose every wait is short: for a check, not for an app.

    Connect timeout 3 s, ``pool_timeout`` 2 s, ``statement_timeout`` 5 s and
    ``lock_timeout`` 2 s on the server; ``search_path`` set to ``schema`` when given.

    Args:
        url: The server.
        schema: The schema the connections' unqualified table names resolve to.
        application_name: Shown in ``pg_stat_activity``: count a check's connections by it.
        pool_size: Connections kept.
        max_overflow: Connections opened beyond ``pool_size`` under load.
        pool_timeout: Seconds a checkout waits for a free connection.
        **kwargs: Passed on to ``sqlalchemy.create_engine``.

    Returns:
        The engine; dispose of it when done.
    """
    options = f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}"
    if schema is not None:
        options += f" -c search_path={schema}"
    sync_url = to_sync_url(url)
    if "options" in sync_url.query:
        options = f"{sync_url.query['options']} {options}"
    connect_args = {"connect_timeout": 3, "application_name": application_name,
                    "options": options, **kwargs.pop("connect_args", {})}
    return sqlalchemy.create_engine(sync_url, pool_size=pool_size, max_overflow=max_overflow,
                                    pool_timeout=pool_timeout, connect_args=connect_args,
                                    **kwargs)


def scratch_async_engine(url: URL, *, schema: str | None = None,
                         application_name: str = "labkit-exercise", pool_size: int = 5,
                         max_overflow: int = 0, pool_timeout: float = 2.0,
                         **kwargs: Any) -> AsyncEngine:
    """Async twin of ``scratch_engine`` (asyncpg), with ``command_timeout`` 5 s as well.

    Create, use and dispose of it inside one event loop.

    Args:
        url: The server.
        schema: The schema the connections' unqualified table names resolve to.
        application_name: Shown in ``pg_stat_activity``.
        pool_size: Connections kept.
        max_overflow: Connections opened beyond ``pool_size`` under load.
        pool_timeout: Seconds a checkout waits for a free connection.
        **kwargs: Passed on to ``sqlalchemy.ext.asyncio.create_async_engine``.

    Returns:
        The engine; ``await engine.dispose()`` when done.
    """
    settings = {"statement_timeout": str(STATEMENT_TIMEOUT_MS),
                "lock_timeout": str(LOCK_TIMEOUT_MS), "application_name": application_name}
    if schema is not None:
        settings["search_path"] = schema
    async_url = to_async_url(url).difference_update_query(["options"])
    connect_args = {"timeout": 3, "command_timeout": STATEMENT_TIMEOUT_MS / 1000,
                    "server_settings": settings, **kwargs.pop("connect_args", {})}
    return _create_async_engine(async_url, pool_size=pool_size, max_overflow=max_overflow,
                                pool_timeout=pool_timeout, connect_args=connect_args,
                                **kwargs)


def check(id: str, namespace: Mapping[str, Any], url: URL | None = None) -> CheckResult:
    """Run exercise ``id``'s check on the learner's names; print and return the result.

    Never raises for a failed check: a missing name, a wrong result, an exception from
    the learner's code and a check that takes longer than its timeout are all a NOT YET
    with the reason and the hint. The check runs in a thread of its own, so an async
    check can start an event loop even inside Jupyter, whose loop is running.

    Args:
        id: The exercise's id, e.g. "01.1".
        namespace: The learner's names, usually ``globals()``.
        url: The server; defaults to ``labkit.lab.database_url()``.

    Returns:
        The result (also printed as ``PASS id - detail`` or ``NOT YET id - reason``).

    Raises:
        KeyError: No exercise has that id (a mistake in the notebook, not the learner's).
    """
    exercises = registry()
    if id not in exercises:
        raise KeyError(f"no exercise {id!r}; known: {', '.join(exercises)}")
    found = exercises[id]
    if url is None:
        from labkit.lab.database import database_url

        url = database_url()
    password = url.password if isinstance(url.password, str) else None
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["detail"] = found.function(namespace, url)
        except BaseException as exc:  # noqa: BLE001 - reported, never raised
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"labkit-exercise-{id}", daemon=True)
    worker.start()
    worker.join(found.timeout)
    if worker.is_alive():
        reason = (f"the check did not finish within {found.timeout:g} s: "
                  "something waits without a timeout")
        result = CheckResult(id, False, f"{reason}\nHint: {found.hint}")
    elif "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, ExerciseFailed):
            reason = str(exc)
        else:
            reason = f"your code raised {type(exc).__name__}: {exc}"
        reason = redact(reason, [password])
        result = CheckResult(id, False, f"{reason}\nHint: {found.hint}")
    else:
        result = CheckResult(id, True, redact(str(outcome["detail"]), [password]))
    print(result)
    return result
