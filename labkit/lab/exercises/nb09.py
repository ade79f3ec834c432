"""Exercises of notebook 09, beyond one process.

09.1: an asyncpg engine behind PgBouncer in transaction mode: connect-time settings
refused, and prepared statements another worker left on the shared server connection
(``labkit.network.pooler`` fixes both).
09.2: pool sizes for several worker processes within a role's connection budget, the
health probe's own connection counted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from labkit import DEVELOPMENT_POOL, TEST_POOL, Settings, create_engine, health_check
from labkit.errors import redact
from labkit.lab.exercises import ExerciseFailed, exercise, require
from labkit.lab.pgbouncer import PgBouncerError, pgbouncer
from labkit.lab.server import ServerInfo

TIMEOUT_MS = 2000          # the statement timeout the exercise asks to keep
TRANSACTIONS = 10
# Statement names another worker process left on the server connection: asyncpg numbers
# its prepared statements per process, so a second worker starts from the same names.
LEFT_BEHIND = 200


def _first_line(exc: BaseException, secrets: list[str | None]) -> str:
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    line = message[0] if message else type(exc).__name__
    return redact(line.split("FATAL:")[-1].strip(), secrets)


def _leave_prepared_statements(bouncer_info: ServerInfo) -> int:
    """Prepare, as another worker would have, the names this process's asyncpg uses next."""
    import asyncpg.connection  # type: ignore[import-untyped]

    start = int(getattr(asyncpg.connection, "_uid", 0))
    names = [f"__asyncpg_stmt_{uid:x}__" for uid in range(start + 1, start + 1 + LEFT_BEHIND)]
    conn = bouncer_info.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("".join(f"PREPARE {name} AS SELECT 1;" for name in names))
    finally:
        conn.close()
    return len(names)


async def _work(engine: AsyncEngine) -> tuple[int, str]:
    """Run transactions on the async engine; return (committed, statement_timeout seen)."""
    try:
        seen = ""
        for i in range(TRANSACTIONS):
            async with engine.begin() as conn:
                await conn.execute(text("SELECT cast(:i AS integer)"), {"i": i})
                seen = (await conn.execute(text("SHOW statement_timeout"))).scalar_one()
        return TRANSACTIONS, str(seen)
    finally:
        await engine.dispose()


@exercise("09.1", title="asyncpg behind PgBouncer in transaction mode",
          hint="Build the engine for a transaction-mode pooler: "
               "labkit.network.pooler.create_async_engine(settings) instead of create_async_engine. "
               "It sends nothing but application_name at connect, sets statement_timeout per "
               "transaction with SET LOCAL, and gives asyncpg's prepared statements unique "
               "names.")
def check_behind_pooler(namespace: Mapping[str, Any], url: URL) -> str:
    """Run asyncpg through a transaction-mode PgBouncer on the learner's engine."""
    make_engine = require(namespace, "make_engine", callable)
    server = ServerInfo(host=str(url.host), port=int(url.port or 5432), user=str(url.username),
                        password=str(url.password or ""), database=str(url.database))
    secrets: list[str | None] = [server.password]
    try:
        with pgbouncer(server, mode="transaction", pool_size=1) as bouncer:
            engine = make_engine(bouncer.info.url())
            if not isinstance(engine, AsyncEngine):
                raise ExerciseFailed("make_engine(url) must return an async engine, got "
                                     f"{type(engine).__name__}")
            if engine.url.port != bouncer.info.port:
                raise ExerciseFailed("the engine does not use the URL given to make_engine "
                                     "(PgBouncer's), so nothing went through the pooler")
            left = _leave_prepared_statements(bouncer.info)
            try:
                committed, seen = asyncio.run(asyncio.wait_for(_work(engine), 15))
            except TimeoutError as exc:
                raise ExerciseFailed("the transactions through PgBouncer did not finish "
                                     "within 15 s") from exc
            except Exception as exc:  # noqa: BLE001 - the lesson is in the message
                line = _first_line(exc, secrets)
                if "already exists" in line:
                    raise ExerciseFailed(
                        f"{line}: another worker process left its prepared statements on the "
                        "server connection PgBouncer handed over (transaction mode resets "
                        "nothing), and asyncpg, counting from 1 in every process, chose the "
                        "same name") from exc
                if "unsupported startup parameter" in line:
                    raise ExerciseFailed(
                        f"PgBouncer refused the connection: {line}. A transaction-mode pooler "
                        "cannot pass session settings sent at connect time") from exc
                raise ExerciseFailed(f"a transaction through PgBouncer failed: {line}") from exc
    except PgBouncerError as exc:
        raise ExerciseFailed(f"PgBouncer could not run here: {exc}") from exc
    if seen != f"{TIMEOUT_MS // 1000}s":
        raise ExerciseFailed(f"inside a transaction, statement_timeout was {seen!r}: every "
                             f"statement must still run under {TIMEOUT_MS} ms")
    return (f"{committed} transactions committed through PgBouncer (transaction mode, one "
            f"server connection holding {left} prepared statements of another worker), "
            f"statement_timeout = {seen} in each")


# --- 09.2: the connection budget --------------------------------------------------------

BUDGET_WORKERS = 4   # worker processes, each with its own pool and health probe
BUDGET = 16          # connections the role may open (CONNECTION LIMIT)
BUSIEST = 3          # requests one worker serves at once at its busiest
PROBE = 1            # labkit's health probe keeps one connection of its own per engine


def _hold_all(engine: Engine, size: int, held: list[Connection],
              secrets: list[str | None]) -> str | None:
    """Check out ``size`` connections of one worker's pool and keep them; None or the error."""
    try:
        for _ in range(size):
            held.append(engine.connect())
    except Exception as exc:  # noqa: BLE001 - the refusal is the lesson
        return _first_line(exc, secrets)
    return None


@exercise("09.2", title="A connection budget across worker processes",
          hint="Every worker may open pool_size + max_overflow connections, all busy at "
               "once, plus one its health probe keeps: workers × (pool_size + max_overflow "
               "+ 1) must stay within the budget, and each worker's pool still needs enough "
               "for its busiest moment.")
def check_budget(namespace: Mapping[str, Any], url: URL) -> str:
    """Probe, then open every worker's pool to the full, as a role with a connection limit."""
    pool_size = require(namespace, "POOL_SIZE", int)
    max_overflow = require(namespace, "MAX_OVERFLOW", int)
    if pool_size < 1 or max_overflow < 0:
        raise ExerciseFailed(f"POOL_SIZE must be >= 1 and MAX_OVERFLOW >= 0, got {pool_size} "
                             f"and {max_overflow}")
    per_worker = pool_size + max_overflow
    if per_worker < BUSIEST:
        raise ExerciseFailed(f"a worker can hold only {per_worker} connections, but serves "
                             f"{BUSIEST} requests at once at its busiest: the others would "
                             "wait for a connection and time out")
    role, password = f"labkit_ex09_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    secrets: list[str | None] = [password, url.password if isinstance(url.password, str) else None]
    admin = create_engine(Settings(url=url, application_name="labkit-exercise-09-2-admin",
                                   statement_timeout_ms=5000), pool=TEST_POOL)
    role_url = url.set(username=role, password=password)
    workers: list[tuple[Engine, list[Connection]]] = []
    errors: list[str | None] = []
    probes: list[bool] = []
    try:
        try:
            with admin.begin() as conn:
                conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' "
                                  f"CONNECTION LIMIT {BUDGET}"))
        except Exception as exc:  # noqa: BLE001 - e.g. no right to create a role
            raise ExerciseFailed("the check could not create its role (it needs a user "
                                 f"allowed to CREATE ROLE): {_first_line(exc, secrets)}") from exc
        for n in range(1, BUDGET_WORKERS + 1):
            # One engine per worker process, each with its own pool: the server counts
            # them the same whichever process opened them.
            engine = create_engine(
                Settings(url=role_url, application_name=f"labkit-exercise-09-2-worker-{n}",
                         connect_timeout=3),
                pool=DEVELOPMENT_POOL.replace(pool_size=pool_size, max_overflow=max_overflow,
                                              pool_timeout=1.0))
            workers.append((engine, []))
            # Readiness first, as a worker starts: the probe keeps a connection of its own.
            report = health_check(engine, timeout=3.0)
            probes.append(report.ok)
            if not report.ok:
                refusal = str(report.message).split("FATAL:")[-1].strip().rstrip("]").strip()
                errors.append(redact(refusal, secrets))
                continue
            errors.append(_hold_all(engine, per_worker, workers[-1][1], secrets))
        with admin.connect() as conn:
            on_server = conn.execute(text("SELECT count(*) FROM pg_stat_activity "
                                          "WHERE usename = :role"), {"role": role}).scalar_one()
    finally:
        for engine, held in workers:
            for conn in held:
                conn.close()
            engine.dispose()
        with admin.begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE usename = :role"), {"role": role})
            conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()
    refused = [(n, error) for n, error in enumerate(errors, 1) if error]
    if refused:
        n, error = refused[0]
        got = len(workers[n - 1][1])
        where = (f"worker {n}'s health probe was refused: {error!r}" if not probes[n - 1]
                 else f"worker {n} got its probe and {got} of its {per_worker} pooled "
                 f"connections, then the server refused: {error!r}")
        raise ExerciseFailed(f"{where}. {BUDGET_WORKERS} workers × "
                             f"({per_worker} + {PROBE} probe) = "
                             f"{BUDGET_WORKERS * (per_worker + PROBE)} > {BUDGET}")
    return (f"{BUDGET_WORKERS} workers, each with its probe's connection and all "
            f"{per_worker} its pool allows: {on_server} on the server, within the budget "
            f"of {BUDGET}; each worker can serve its {BUSIEST} requests at once")
