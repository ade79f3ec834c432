"""The kit's chart style and the request timeline, drawn from real runs against PostgreSQL."""

from __future__ import annotations

import inspect
import io
from collections.abc import Iterator

import matplotlib
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from labkit import Settings, create_async_engine, create_engine
from labkit.lab import charts
from labkit.lab.load import LoadResult, _Progress, run_async_load, run_sync_load

SITE_WIDTH_PX = 800   # the notebook column of the site at 1280 px, charts shown at most this wide
MIN_PT = 9.0


def _displayed_width_px(fig: Figure) -> int:
    """Width of the PNG a notebook shows (the inline backend saves with a tight bbox)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    buffer.seek(0)
    return imread(buffer).shape[1]


def _visible_texts(fig: Figure) -> list[Text]:
    fig.canvas.draw()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _tick_labels(ax: Axes) -> list[str]:
    ax.figure.canvas.draw()
    return [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]


def _sample_figures(result: LoadResult) -> dict[str, Figure]:
    """One figure per chart function, named by it, with arguments shaped like the notebooks'
    calls and long labels and titles where they could collide."""
    cut_outcomes = {f"{driver} · {how} · {when}": (
        [None, None] if when == "idle, pre-ping" else ["ConnectionLostError", None])
        for how in ("RESET", "FIN") for when in ("idle, no pre-ping", "idle, pre-ping",
                                                 "mid-transaction")
        for driver in ("psycopg2", "asyncpg")}
    return {
        "driver_comparison": charts.driver_comparison(
            [{"client": client, "concurrency": n, "tps": tps * n ** 0.5, "tps_q1": tps * 0.9,
              "tps_q3": tps * n ** 0.5 * 1.1, "cpu_us_per_tx": cpu}
             for client, tps, cpu in (("psycopg2 (threads)", 2500.0, 210.0),
                                      ("psycopg 3 (threads)", 2300.0, 260.0),
                                      ("asyncpg (asyncio)", 1500.0, 430.0),
                                      ("psycopg 3 (asyncio)", 1200.0, 560.0))
             for n in (1, 8)],
            title="A read transaction (SELECT by primary key, COMMIT) on each driver, "
                  "through SQLAlchemy Core"),
        "pool_fairness_chart": charts.pool_fairness_chart(
            {"psycopg_pool, 2 connections": result, "SQLAlchemy QueuePool, pool_size=2": result},
            title="Who waits? 8 threads running 20 ms queries on a pool of 2, one second each"),
        "line_chart": charts.line_chart(
            {"throughput": ([1, 2, 4, 8], [1200.0, 2300.0, 4100.0, 4200.0])},
            models={"model": ([1, 2, 4, 8], [1250.0, 2500.0, 5000.0, 10000.0])},
            hlines={"limit = 4000": 4000}, windows=[(2.0, 3.0, "server restarting")],
            title="Throughput against pool size, a title long enough to need wrapping "
                  "when the figure is 800 px wide",
            xlabel="pool size (connections)", ylabel="throughput (tps)"),
        "step_chart": charts.step_chart(
            {"in use": ([0, 1, 2, 3], [0, 3, 5, 2])}, title="In use", xlabel="time (s)",
            ylabel="connections", hlines={"pool_size = 3": 3}),
        "bar_chart": charts.bar_chart(
            {"psycopg2 (raw driver, no pool at all)": 2100.0,
             "SQLAlchemy Core with a QueuePool": 1500.0, "labkit session_scope": 880.0},
            title="Throughput by layer", ylabel="tps", log=True),
        "box_chart": charts.box_chart(
            {"pool_pre_ping=False": [0.005] * 50 + [0.006] * 50,
             "pool_pre_ping=True": [0.08] * 95 + [0.1, 0.2, 3.0, 6.0, 12.0]},
            title="Checkout time", ylabel="checkout (ms)", unit=" ms", horizontal=True),
        "duration_chart": charts.duration_chart(
            {"database down (connection refused)": 0.004, "hung server (SIGSTOP)": 9.0},
            notes={"database down (connection refused)": "DatabaseUnavailableError"},
            limit=("connect_timeout = 2 s", 2.0), cap=9.0,
            title="Time to fail a checkout", xlabel="seconds until the caller gets an error"),
        "outcome_chart": charts.outcome_chart(
            {"pool_pre_ping=False": [None, "DisconnectionError", None],
             "pool_pre_ping=True": [None, None, None]},
            title="Requests after the backends were killed"),
        "request_timeline": charts.request_timeline(
            result, pool_size=1, max_overflow=0, pool_timeout=0.2,
            title="A small pool under load"),
        "wait_vs_pool_size": charts.wait_vs_pool_size(
            {3: 26.3, 4: 2.13, 5: 2.15, 6: 0.28}, {3: 23.3, 4: 2.36, 5: 1.2, 6: 0.22},
            model_label="Erlang C (M/M/c) from the measured rate and hold time",
            title="Mean checkout wait, 100 requests/s arriving at random, about 24 ms held"),
        "server_connections_chart": charts.server_connections_chart(
            {"FIFO + idle_session_timeout 1 s": ([0.0, 0.5, 1.2, 3.0], [5, 5, 5, 5]),
             "LIFO + pool_recycle 1 s": ([0.0, 0.5, 1.2, 3.0], [5, 5, 5, 5]),
             "LIFO + idle_session_timeout 1 s": ([0.0, 0.5, 1.2, 3.0], [5, 5, 1, 1])},
            pool_size=5, vlines={"idle 1 s": 1.0},
            title="Connections the server counts after a burst: one request every 50 ms"),
        "connection_budget_chart": charts.connection_budget_chart(
            [1, 2, 3, 4, 5, 6, 7], [5, 10, 15, 20, 21, 21, 21], per_process=5,
            max_connections=24, usable=21,
            title="Server connections held by N worker processes, each pool_size 2 "
                  "+ max_overflow 2 + 1 probe"),
        "points_chart": charts.points_chart(
            {"/live → 200": ([0.1, 0.5, 1.0, 1.5, 2.0], [2.0, 2.1, 1.9, 2.2, 2.0]),
             "/ready → 200": ([0.1, 0.5, 1.8, 2.0], [3.0, 3.1, 3.2, 2.9]),
             "/ready → 503": ([1.0, 1.5], [500.0, 501.0])},
            failed=["/ready → 503"], legend="center right",
            hlines={"READY_TIMEOUT = 500 ms": 500.0},
            windows=[(0.8, 1.2, "database stopped"), (1.3, 1.7, "database hung")],
            title="Probes during an outage: /live stays 200 and fast, /ready turns 503 "
                  "within its timeout",
            xlabel="time the probe was sent (s)", ylabel="response time (ms)"),
        "failures_over_time": charts.failures_over_time(
            {"pool_pre_ping=False": (result, (0.05, 0.3)),
             "pool_pre_ping=True": (result, (0.1, 0.45))},
            title="Failed requests, 4 threads; each run's own server restart shaded"),
        "lost_commit_chart": charts.lost_commit_chart(
            {"retry everything": {"rows stored": 20, "duplicates": 10, "caller told unknown": 0},
             "labkit default": {"rows stored": 10, "duplicates": 0, "caller told unknown": 10},
             "idempotency key\n+ ON CONFLICT": {"rows stored": 10, "duplicates": 0,
                                                "caller told unknown": 0}},
            payments=10, title="10 payments, the answer to each one's first COMMIT lost"),
        "backend_after_client_chart": charts.backend_after_client_chart(
            {"asyncio cancels the task (asyncpg)": 0.02,
             "anyio cancel scope (Starlette stream)": 1.23,
             "asyncpg closes its socket, no cancel": 1.22,
             "the same, check_interval = 100 ms": 0.03,
             "asyncio.wait_for, psycopg2 in a thread": 1.21,
             "psycopg2 cancel() from a thread": 0.03,
             "psycopg2 socket cut (labkit.deadline)": 1.2},
            stopped={"asyncio cancels the task (asyncpg)": "CancelRequest sent",
                     "anyio cancel scope (Starlette stream)": "closed before the CancelRequest",
                     "asyncpg closes its socket, no cancel": "socket closed, nothing sent",
                     "the same, check_interval = 100 ms": "server checks the socket",
                     "asyncio.wait_for, psycopg2 in a thread": "nothing sent: the thread runs on",
                     "psycopg2 cancel() from a thread": "CancelRequest sent → QueryTimeoutError",
                     "psycopg2 socket cut (labkit.deadline)":
                         "socket shut down → QueryTimeoutError"},
            remaining=1.2,
            title="The client acts 0.3 s into a 1.5 s statement: how long does the server "
                  "run on?"),
        "statement_steps": charts.statement_steps(
            {"autoflush=True (SQLAlchemy's default)": [
                ("add() 3 new items", []), ("query for them", ["INSERT", "INSERT", "SELECT"]),
                ("commit()", ["COMMIT"])],
             "autoflush=False (labkit's sessions)": [
                ("add() 3 new items", []), ("query for them", ["SELECT"]),
                ("commit()", ["INSERT", "INSERT", "INSERT", "COMMIT"])]},
            title="autoflush moves the INSERT before the query: same statements, sent earlier",
            highlight="INSERT"),
        "lost_update_chart": charts.lost_update_chart(
            {"read, add in Python, write back (READ COMMITTED)": 1234,
             "UPDATE ... SET n = n + 1 (atomic)": 2000,
             "SELECT ... FOR UPDATE, then write": 2000,
             "SERIALIZABLE, retried on serialization failure": 2000},
            expected=2000,
            notes={"read, add in Python, write back (READ COMMITTED)": "0.85 s",
                   "SERIALIZABLE, retried on serialization failure": "1.93 s · 412 retries"},
            expected_label="expected: 8 × 250 = 2000",
            title="Lost updates: 8 threads × 250 increments of one row"),
        "pool_size_chart": charts.pool_size_chart(
            [1, 2, 4, 8, 16, 32],
            {"measured (median of rounds; bars: IQR)": [95.0, 190.0, 370.0, 700.0, 720.0, 715.0]},
            spread={"measured (median of rounds; bars: IQR)": (
                [90.0, 180.0, 350.0, 650.0, 690.0, 680.0],
                [99.0, 199.0, 390.0, 740.0, 760.0, 750.0])},
            models={"model: pool ÷ 10.4 ms hold, at most 8 ÷ 10 ms": [96.0, 192.0, 385.0,
                                                                     770.0, 800.0, 800.0]},
            vlines={"server runs 8 at once": 8}, ylabel="transactions per second",
            title="Throughput vs pool size: 64 tasks, the server runs 8 at a time"),
        "spread_bar_chart": charts.spread_bar_chart(
            {"pgbench\n(C)": (10056.0, 9154.0, 10949.0),
             "psycopg2\n(raw)": (10072.0, 9833.0, 10966.0),
             "SQLAlchemy\nCore": (3414.0, 2534.0, 3927.0),
             "ORM\nsync": (1728.0, 1388.0, 1911.0), "labkit\nsync": (1620.0, 1569.0, 1968.0),
             "asyncpg\n(raw)": (3922.0, 3513.0, 4215.0), "ORM\nasync": (1122.0, 1018.0, 1344.0),
             "labkit\nasync": (1155.0, 895.0, 1404.0)},
            colors={"labkit\nsync": "#CC79A7", "labkit\nasync": "#CC79A7"},
            ylabel="transactions per second",
            xlabel="client: C, then sync (threads), then async (one event loop)",
            title="Same read transaction, 8 workers: median of 12 rounds (bars: IQR)"),
        "ratio_chart": charts.ratio_chart(
            {"labkit sync / ORM sync\n(throughput)": (1.03, 0.85, 1.18),
             "labkit async / ORM async\n(throughput)": (1.03, 0.82, 1.40),
             "ORM sync / SQLAlchemy Core sync\n(throughput)": (0.52, 0.42, 0.63),
             "asyncpg raw / ORM async\n(throughput)": (3.24, 2.78, 4.79),
             "labkit sync / ORM sync\n(transactions per CPU-second)": (1.0, 0.93, 1.08)},
            xlabel="ratio (log scale; 1 = equal; < 1 = numerator slower or costlier)",
            title="Layer ratios, 8 workers: median with 99 % interval"),
        "scaling_chart": charts.scaling_chart(
            [1, 2, 4, 8, 16],
            {"server wait": {"sync (psycopg2, threads)": [10.0, 18.0, 37.0, 70.0, 147.0],
                             "async (asyncpg, tasks)": [9.0, 19.0, 33.0, 68.0, 132.0]},
             "Python work": {"sync (psycopg2, threads)": [313.0, 516.0, 384.0, 443.0, 356.0],
                             "async (asyncpg, tasks)": [215.0, 153.0, 171.0, 296.0, 257.0]}},
            title="Throughput relative to one worker: waits overlap, Python work does not"),
        "points_with_model": charts.points_with_model(
            {"measured: the second writer's wait": ([0.1, 0.2, 0.4, 0.8, 1.2],
                                                    [0.128, 0.21, 0.403, 0.806, 1.214])},
            models={"model: wait = hold": ([0, 1.2], [0, 1.2])},
            title="A session idle in transaction blocks writers as long as it stays open",
            xlabel="time the first session kept its transaction open (s)",
            ylabel="second writer blocked (s)"),
        "wait_chart": charts.wait_chart(
            {"psycopg2: no client deadline": (6.0, "still waiting"),
             "psycopg2: statement_timeout 600 ms": (6.0, "still waiting"),
             "psycopg2: keepalives 1 s × 2 probes": (2.81, "ConnectionLostError"),
             "psycopg2: labkit.deadline 1.5 s": (1.2, "QueryTimeoutError"),
             "psycopg2: tcp_user_timeout 1 s, sent into it": (1.73, "ConnectionLostError"),
             "health check, timeout 1 s": (1.05, "DatabaseUnavailableError"),
             "asyncpg: command_timeout 1.5 s": (2.71, "QueryTimeoutError"),
             "asyncpg: keepalives 1 s × 2 probes": (4.82, "ConnectionLostError"),
             "pool_recycle 1 s (< 2 s limit)": (0.01, None)},
            cap=6.0, title="A partition while the query runs: when does the caller get "
                           "control back?",
            xlabel="seconds from the start of the partition"),
        "wait_matrix_chart": charts.wait_matrix_chart(
            {"checkout from a warm pool (pre-ping)": {
                "psycopg2": (2.0, "DatabaseUnavailableError"),
                "psycopg 3 sync": (2.0, "DatabaseUnavailableError"),
                "asyncpg": (2.0, "DatabaseUnavailableError"),
                "psycopg 3 async": (2.0, "DatabaseUnavailableError")},
             "statement, statement_timeout 500 ms": {
                "psycopg2": (12.0, "still waiting"), "psycopg 3 sync": (12.0, "still waiting"),
                "asyncpg": (12.0, "still waiting"), "psycopg 3 async": (12.0, "still waiting")},
             "statement, asyncio.wait_for 1 s": {"asyncpg": (3.0, "QueryTimeoutError"),
                                                 "psycopg 3 async": (11.0, "QueryTimeoutError")},
             "statement after resume": {"psycopg2": (0.004, None)}},
            cap=12.0, title="A hung server: what ends each wait, per driver"),
        "request_outcomes_chart": charts.request_outcomes_chart(
            {"no pre-ping": ["still waiting", None, None],
             "labkit pre-ping (connect_timeout 2 s)": ["DatabaseUnavailableError", None, None],
             **cut_outcomes},
            title="Requests after the connection was reset or closed"),
        "session_reuse_chart": charts.session_reuse_chart(
            {"one session: a duplicate key at flush (job 3)":
                [None, None, "UniqueViolation"] + ["PendingRollbackError"] * 7,
             "one session: a duplicate key in a statement (job 3)":
                [None, None, "UniqueViolation"] + ["InFailedSqlTransaction"] * 7,
             "one session: its backend killed (job 3)":
                [None, None, "OperationalError"] + ["PendingRollbackError"] * 7,
             "one session + session.rollback() in the except (jobs 3, 5, 7)":
                [None, None, "UniqueViolation", None, "UniqueViolation", None,
                 "OperationalError", None, None, None],
             "session_scope per job (jobs 3, 5, 7)":
                [None, None, "UniqueViolation", None, "UniqueViolation", None,
                 "OperationalError", None, None, None]},
            refused=["PendingRollbackError", "InFailedSqlTransaction"],
            title="One failed job, then every later job on the same session refused"),
        "lock_timeline_chart": charts.lock_timeline_chart(
            {"opposite order · transfer 1→2": [(0.0, 20.0, "open"), (20.0, 121.0, "wait"),
                                               (0.0, 122.0, "open"),
                                               (122.0, 122.0, "committed")],
             "opposite order · transfer 2→1": [(1.0, 20.0, "open"), (20.0, 120.0, "wait"),
                                               (1.0, 121.0, "open"),
                                               (121.0, 121.0, "deadlock detected")],
             "one lock order · transfer 1→2": [(0.0, 24.0, "open"), (24.0, 24.0, "committed")],
             "one lock order · transfer 2→1": [(1.0, 24.0, "wait"), (1.0, 47.0, "open"),
                                               (47.0, 47.0, "committed")],
             "opposite order + run_in_transaction · transfer 1→2": [
                 (0.0, 20.0, "open"), (20.0, 120.0, "wait"), (0.0, 121.0, "open"),
                 (121.0, 121.0, "deadlock detected"), (121.0, 131.0, "backoff"),
                 (131.0, 133.0, "open"), (133.0, 133.0, "committed")],
             "opposite order + run_in_transaction · transfer 2→1": [
                 (1.0, 20.0, "open"), (20.0, 121.0, "wait"), (1.0, 122.0, "open"),
                 (122.0, 122.0, "committed")]},
            title="Opposite lock orders: both wait, one is aborted after deadlock_timeout "
                  "(the last round)"),
        "fleet_chart": charts.fleet_chart(
            [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
            {"STARTUP_RETRY (±10 % jitter)": [0, 0, 900, 2400, 300, 0, 0],
             "STARTUP_RETRY, full jitter": [0, 0, 700, 900, 800, 100, 0]},
            {"STARTUP_RETRY (±10 % jitter)": [480, 480, 0, 0, 420, 480, 480],
             "STARTUP_RETRY, full jitter": [480, 480, 0, 0, 300, 470, 480]},
            hlines={"usable slots = 497": 497}, windows=[(1.0, 2.0, "server restarting")],
            top_label="connection attempts per second", bottom_label="server connections",
            title="A restart under 200 instances: the reconnect storm with each retry policy, "
                  "a title long enough to wrap"),
    }


@pytest.fixture(scope="module")
def tiny_pool(db_url: URL) -> Iterator[Engine]:
    """One connection, no overflow, a short pool_timeout: the third caller gives up."""
    settings = Settings(url=db_url)
    eng = create_engine(settings, pool=settings.pool.replace(
        pool_size=1, max_overflow=0, pool_timeout=0.2, pool_pre_ping=False))
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def starved_run(tiny_pool: Engine) -> LoadResult:
    """Three workers at once on one connection held for 0.5 s: one served, two time out."""
    return run_sync_load(tiny_pool, lambda conn: conn.execute(text("SELECT pg_sleep(0.5)")),
                         workers=3, count=1, progress=False)


@pytest.fixture(scope="module")
def samples(starved_run: LoadResult) -> dict[str, Figure]:
    """The style tests' figures, drawn once for the module (drawing them takes seconds)."""
    return _sample_figures(starved_run)


# -- the style --------------------------------------------------------------------------


def test_every_helper_draws_text_readable_at_the_site_width(samples):
    too_small = {}
    for name, fig in samples.items():
        # a wider PNG is shrunk to the column; a narrower one is shown as it is, not enlarged
        scale = min(1.0, SITE_WIDTH_PX / _displayed_width_px(fig))
        small = [(t.get_text()[:30], round(t.get_fontsize() * scale, 1))
                 for t in _visible_texts(fig) if t.get_fontsize() * scale < MIN_PT]
        if small:
            too_small[name] = small
    assert not too_small, f"text below {MIN_PT} pt at {SITE_WIDTH_PX} px: {too_small}"


def test_every_helper_has_a_title_and_fits_the_site_width(samples):
    untitled = [name for name, fig in samples.items() if not fig.get_suptitle().strip()]
    assert not untitled, f"charts without a title: {untitled}"
    # tight bbox grows past the figure when text sticks out of it
    widths = {name: _displayed_width_px(fig) for name, fig in samples.items()}
    too_wide = {name: px for name, px in widths.items() if px > SITE_WIDTH_PX * 1.05}
    assert not too_wide, f"wider than the site's {SITE_WIDTH_PX} px column: {too_wide}"


def _chart_functions() -> set[str]:
    """Every public function of the module but ``style``: the charts a notebook calls."""
    return {name for name, obj in vars(charts).items()
            if inspect.isfunction(obj) and obj.__module__ == charts.__name__
            and not name.startswith("_") and name != "style"}


def test_every_chart_function_is_exported_in_a_sorted_all():
    assert _chart_functions() <= set(charts.__all__)
    assert charts.__all__ == sorted(charts.__all__)


def test_the_style_samples_cover_every_chart_function(samples):
    exported = {name for name in charts.__all__ if inspect.isfunction(getattr(charts, name))}
    exported.discard("style")
    sampled = set(samples)
    assert exported - sampled == set(), "chart functions without a sample in _sample_figures"
    assert sampled <= exported


def test_style_is_applied_inside_helpers_only():
    default = matplotlib.rcParams["font.size"]
    fig = charts.line_chart({"a": ([0, 1], [1, 2])}, title="t", xlabel="x (s)", ylabel="y (ms)")
    ax = fig.axes[0]
    assert ax.xaxis.label.get_fontsize() == charts.KIT_STYLE["axes.labelsize"]
    # ticks are re-created when the figure is drawn, after the helper returned
    assert all(t.get_fontsize() == charts.KIT_STYLE["xtick.labelsize"]
               for t in ax.get_xticklabels())
    assert matplotlib.rcParams["font.size"] == default


def test_plain_axes_have_no_offset_or_scientific_ticks():
    # matplotlib's defaults label these ticks "0.5, 1.0..." with "+1e6" written aside
    fig = charts.line_chart({"a": ([0, 1, 2], [1_000_000.0, 1_000_001.0, 1_000_002.0])},
                            title="t", xlabel="x (s)", ylabel="y (ms)", ymin=None)
    ax = fig.axes[0]
    labels = [t.get_text() for t in (ax.figure.canvas.draw(), ax.get_yticklabels())[1]]
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    assert not [s for s in labels if "e+" in s or "×" in s or "$" in s], labels
    assert any(s.replace(",", "").startswith("1000001") for s in labels), labels


def test_log_axes_read_as_plain_numbers():
    fig = charts.bar_chart({"a": 4.0, "b": 6.0}, log=True, title="t", ylabel="ms")
    labels = _tick_labels(fig.axes[0])
    assert not [s for s in labels if "$" in s or "×" in s or "e+" in s], labels
    assert {"4", "6"} <= {t.get_text() for t in fig.axes[0].texts}  # the bars' values


def test_sparse_series_get_markers_and_dense_ones_do_not():
    fig = charts.line_chart({"sparse": (range(5), range(5)), "dense": (range(100), range(100))},
                            title="t", xlabel="x (s)", ylabel="y (ms)")
    sparse, dense = fig.axes[0].get_lines()[:2]
    assert sparse.get_marker() not in (None, "None", "")
    assert dense.get_marker() in (None, "None", "")


def test_counts_start_at_zero_unless_the_data_go_below():
    counts = charts.step_chart({"in use": ([0, 1, 2], [3, 5, 4])}, title="t",
                               xlabel="time (s)", ylabel="connections")
    assert counts.axes[0].get_ylim()[0] == 0
    signed = charts.line_chart({"overflow": ([0, 1], [-3, 2])}, title="t",
                               xlabel="time (s)", ylabel="connections")
    assert signed.axes[0].get_ylim()[0] < -3 + 0.01


def test_fault_windows_are_shaded_and_named():
    fig = charts.step_chart({"errors": ([0, 1, 2, 3], [0, 4, 1, 0])},
                            windows=[(1.0, 1.5, "server restarting")], title="t",
                            xlabel="time (s)", ylabel="errors")
    ax = fig.axes[0]
    shaded = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert shaded and shaded[0].get_x() == 1.0
    assert "server restarting" in [t.get_text() for t in ax.texts]


# -- the helpers notebook 07 uses ---------------------------------------------------------


def test_duration_chart_labels_each_bar_and_greys_out_capped_ones():
    fig = charts.duration_chart({"refused": 0.004, "hung": 9.0}, notes={"refused": "Unavailable"},
                                limit=("connect_timeout = 2 s", 2.0), cap=9.0,
                                colors={"refused": "tab:blue"}, title="t", xlabel="seconds")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(ax.patches) == 2
    assert "4 ms  Unavailable" in texts and any("still waiting at 9 s" in t for t in texts)
    assert "connect_timeout = 2 s" in texts
    assert ax.patches[1].get_hatch() == "//"   # capped: not a measured failure time


def test_outcome_chart_marks_each_failure_with_a_red_cross():
    fig = charts.outcome_chart({"a": [None, "DisconnectionError", "DisconnectionError"],
                                "b": [None, None, None]}, title="t")
    ax = fig.axes[0]
    crosses = sum(len(c.get_offsets()) for c in ax.collections
                  if len(c.get_offsets()) and c.get_facecolor()[0][0] > 0.7)  # red
    assert crosses == 2
    assert "DisconnectionError" in [t.get_text() for t in ax.texts]


# -- the load generator's records and the timeline -------------------------------------------


def test_load_records_checkout_and_release_and_pool_timeouts(starved_run):
    ops = starved_run.ops
    assert len(ops) == 3 and starved_run.errors == {"PoolTimeoutError": 2}
    served = [op for op in ops if op.ok]
    assert len(served) == 1 and served[0].got is not None
    assert served[0].start <= served[0].got < served[0].released <= served[0].end
    assert served[0].released - served[0].got >= 0.45            # held it for the query
    for op in ops:
        if not op.ok:
            assert op.got is None and op.released is None and op.checkout_failed
            assert 180 <= op.wait_ms < 1000                       # about pool_timeout
    times, in_use, waiting = starved_run.concurrency()
    assert max(in_use) == 1 and max(waiting) >= 2 and in_use[-1] == waiting[-1] == 0


async def test_async_load_records_connection_use_without_overlap(settings: Settings):
    engine = create_async_engine(settings, pool=settings.pool.replace(
        pool_size=1, max_overflow=0, pool_timeout=5, pool_pre_ping=False))
    try:
        result = await run_async_load(
            engine, lambda conn: conn.execute(text("SELECT pg_sleep(0.05)")),
            workers=3, count=2, progress=False)
    finally:
        await engine.dispose()
    assert len(result.ops) == 6 and all(op.ok for op in result.ops)
    held = sorted((op.got, op.released) for op in result.ops
                  if op.got is not None and op.released is not None)
    assert len(held) == 6
    # one connection: each use starts after the previous one released it
    assert all(a[1] <= b[0] for a, b in zip(held, held[1:]))
    assert max(result.concurrency()[1]) == 1
    assert sum(op.wait_ms > 40 for op in result.ops) >= 3         # the others queued


def test_timeline_draws_one_lane_per_worker_and_marks_failures(starved_run):
    fig = charts.request_timeline(starved_run, pool_size=1, max_overflow=0, pool_timeout=0.2,
                                  title="Three requests, one connection")
    top, lanes = fig.axes[:2]
    bars = [c for c in lanes.collections if isinstance(c, PolyCollection) and c.get_paths()]
    rows = {round(p.get_extents().y0 + p.get_extents().height / 2)
            for c in bars for p in c.get_paths()}
    assert rows == {1, 2, 3}
    assert [t.get_text() for t in lanes.get_yticklabels()] == ["1", "2", "3"]
    failed = [c for c in bars if c.get_hatch()]
    assert sum(len(c.get_paths()) for c in failed) == 2            # the two timeouts
    crosses = [line for line in lanes.get_lines() if line.get_marker() == "X"]
    assert sum(len(line.get_xdata()) for line in crosses) == 2
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "PoolTimeoutError after pool_timeout = 0.2 s" in legend
    # above: in use never over the limit line, which is drawn
    in_use = [line for line in top.get_lines() if line.get_label() == "connections in use"][0]
    assert max(in_use.get_ydata()) == 1
    assert "pool_size = 1" in [t.get_text() for t in top.texts]


def test_progress_goes_to_stdout_not_stderr(capsys):
    meter = _Progress("run", 3.0, every=0.0)
    meter.tick(12)
    out, err = capsys.readouterr()
    assert "run:" in out and "12 ops" in out and err == ""


def test_a_model_band_is_shaded_behind_the_measurement_and_named():
    xs = [3, 4, 5, 6]
    model = [8.0, 1.5, 0.5, 0.1]
    fig = charts.line_chart({"measured": (xs, [9.0, 2.0, 0.8, 0.3])},
                            models={"Erlang C": (xs, model)},
                            bands={"asserted band": (xs, [m / 3 for m in model],
                                                     [3 * m + 1 for m in model])},
                            title="t", xlabel="pool size", ylabel="wait (ms)")
    ax = fig.axes[0]
    shaded = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(shaded) == 1 and shaded[0].get_label() == "asserted band"
    assert shaded[0].get_zorder() < ax.get_lines()[0].get_zorder()   # behind the points
    assert "asserted band" in [t.get_text() for t in ax.get_legend().get_texts()]
    plain = charts.line_chart({"measured": (xs, model)}, title="t", xlabel="x", ylabel="y")
    assert not [c for c in plain.axes[0].collections if isinstance(c, PolyCollection)]
    with pytest.raises(ValueError, match="differ in length"):
        charts.line_chart({"m": (xs, model)}, bands={"b": (xs, [1.0], [2.0])},
                          title="t", xlabel="x", ylabel="y")


def test_wait_matrix_chart_fills_each_cell_by_its_wait_and_leaves_missing_ones_blank():
    fig = charts.wait_matrix_chart(
        {"deadline": {"sync": (1.0, "QueryTimeoutError"), "async": (12.0, "still waiting")},
         "asyncio": {"async": (3.0, None)}}, cap=12.0, title="t")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "1.00 s\nQueryTimeout\nError" in texts and "still waiting\nat 12 s" in texts
    assert "3.00 s\nok" in texts
    fills = [p for p in ax.patches if p.get_facecolor()[:3] != matplotlib.colors.to_rgb("#F7F7F7")]
    assert len(ax.patches) == 4 + 3                      # a background per cell, a fill per wait
    assert sorted(round(p.get_width() / 0.94, 2) for p in fills) == [0.08, 0.25, 1.0]
    assert [p.get_hatch() for p in fills].count("//") == 1   # still waiting: never a measured time
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sync", "async"]
