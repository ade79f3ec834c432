"""The kit's chart style and the request timeline, drawn from real runs against PostgreSQL."""

from __future__ import annotations

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
    """One figure per helper, with long labels and titles where they could collide."""
    return {
        "line": charts.line_chart(
            {"throughput": ([1, 2, 4, 8], [1200.0, 2300.0, 4100.0, 4200.0])},
            models={"model": ([1, 2, 4, 8], [1250.0, 2500.0, 5000.0, 10000.0])},
            hlines={"limit = 4000": 4000}, windows=[(2.0, 3.0, "server restarting")],
            title="Throughput against pool size, a title long enough to need wrapping "
                  "when the figure is 800 px wide",
            xlabel="pool size (connections)", ylabel="throughput (tps)"),
        "step": charts.step_chart({"in use": ([0, 1, 2, 3], [0, 3, 5, 2])}, title="In use",
                                  xlabel="time (s)", ylabel="connections",
                                  hlines={"pool_size = 3": 3}),
        "bar": charts.bar_chart({"psycopg2 (raw driver, no pool at all)": 2100.0,
                                 "SQLAlchemy Core with a QueuePool": 1500.0,
                                 "labkit session_scope": 880.0},
                                title="Throughput by layer", ylabel="tps", log=True),
        "box": charts.box_chart({"pool_pre_ping=False": [0.005] * 50 + [0.006] * 50,
                                 "pool_pre_ping=True": [0.08] * 95 + [0.1, 0.2, 3.0, 6.0, 12.0]},
                                title="Checkout time", ylabel="checkout (ms)", unit=" ms",
                                horizontal=True),
        "duration": charts.duration_chart(
            {"database down (connection refused)": 0.004, "hung server (SIGSTOP)": 9.0},
            notes={"database down (connection refused)": "DatabaseUnavailableError"},
            limit=("connect_timeout = 2 s", 2.0), cap=9.0,
            title="Time to fail a checkout", xlabel="seconds until the caller gets an error"),
        "outcome": charts.outcome_chart({"pool_pre_ping=False": [None, "DisconnectionError", None],
                                         "pool_pre_ping=True": [None, None, None]},
                                        title="Requests after the backends were killed"),
        "timeline": charts.request_timeline(result, pool_size=1, max_overflow=0,
                                            pool_timeout=0.2, title="A small pool under load"),
    }


@pytest.fixture
def tiny_pool(settings: Settings) -> Iterator[Engine]:
    """One connection, no overflow, a short pool_timeout: the third caller gives up."""
    eng = create_engine(settings, pool=settings.pool.replace(
        pool_size=1, max_overflow=0, pool_timeout=0.2, pool_pre_ping=False))
    yield eng
    eng.dispose()


@pytest.fixture
def starved_run(tiny_pool: Engine) -> LoadResult:
    """Three workers at once on one connection held for 0.5 s: one served, two time out."""
    return run_sync_load(tiny_pool, lambda conn: conn.execute(text("SELECT pg_sleep(0.5)")),
                         workers=3, count=1, progress=False)


# -- the style --------------------------------------------------------------------------


def test_every_helper_draws_text_readable_at_the_site_width(starved_run):
    for name, fig in _sample_figures(starved_run).items():
        scale = SITE_WIDTH_PX / _displayed_width_px(fig)
        small = [(t.get_text()[:30], round(t.get_fontsize() * scale, 1))
                 for t in _visible_texts(fig) if t.get_fontsize() * scale < MIN_PT]
        assert not small, f"{name}: text below {MIN_PT} pt at {SITE_WIDTH_PX} px: {small}"


def test_every_helper_has_a_title_and_fits_the_site_width(starved_run):
    for name, fig in _sample_figures(starved_run).items():
        assert fig.get_suptitle(), f"{name} has no title"
        # tight bbox grows past the figure when text sticks out of it
        assert _displayed_width_px(fig) <= SITE_WIDTH_PX * 1.05, f"{name} is too wide"


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
