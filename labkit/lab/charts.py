"""Chart helpers in one kit style: titled figures, labelled axes with units, readable at
the site's width.

Every helper draws inside ``style()`` (the ``KIT_STYLE`` rcParams) and returns the
``Figure``, so a notebook cell shows it and a test can inspect it. The style's rules:

- Drawn 8 inches wide at 100 dpi (800 px, the width of the site's notebook column), with
  no text below 10 pt, so labels stay readable where the page shows the chart.
- Plain numbers on the axes (``2000``, ``0.5``), never ``2×10³`` or an offset, unless a
  helper is asked for a log scale, and even then ticks read ``1``, ``10``, ``100``.
- Counts and times start at 0; series with fewer than 30 points get markers; lines that
  coincide stay visible (each later series is drawn thinner, on top).
- Limits are dashed lines labelled where they are drawn (``hlines``); fault windows are
  shaded and named (``windows=[(start, end, "server restarting")]``).
- Colour carries meaning: waiting is warm (``COLORS["waiting"]``), using a connection
  is cool (``COLORS["using"]``), failed is red (``COLORS["failed"]``).
- Constrained layout, long titles and category labels wrapped: no text overlaps.

``request_timeline`` draws a load run (``labkit.lab.load``) as swimlanes: one lane per
worker, each request first waiting for a connection, then using it, with the pool's
in-use count and its limits above. matplotlib is imported here only, never by the core.

Example:
    ```python
    result = run_sync_load(engine, work, workers=10, duration=3.0)
    charts.request_timeline(result, pool_size=3, max_overflow=2, pool_timeout=0.5,
                            title="10 threads, pool_size=3, max_overflow=2")
    ```
"""

from __future__ import annotations

import functools
import math
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

if TYPE_CHECKING:
    from labkit.lab.load import LoadResult

__all__ = [
    "COLORS",
    "KIT_STYLE",
    "backend_after_client_chart",
    "bar_chart",
    "box_chart",
    "connection_budget_chart",
    "driver_comparison",
    "duration_chart",
    "failures_over_time",
    "fleet_chart",
    "line_chart",
    "lock_timeline_chart",
    "lost_commit_chart",
    "lost_update_chart",
    "outcome_chart",
    "points_chart",
    "points_with_model",
    "pool_fairness_chart",
    "pool_size_chart",
    "ratio_chart",
    "request_outcomes_chart",
    "request_timeline",
    "scaling_chart",
    "server_connections_chart",
    "session_reuse_chart",
    "spread_bar_chart",
    "statement_steps",
    "step_chart",
    "style",
    "wait_chart",
    "wait_matrix_chart",
    "wait_vs_pool_size",
]

WIDTH = 8.0            # inches; at 100 dpi the 800 px of the site's notebook column
_SIZE = (WIDTH, 4.0)
TEXT_PT = 11.0         # axis labels, the base size
SMALL_PT = 10.0        # ticks, legends, annotations: the smallest text the kit draws
TITLE_PT = 13.0
SPARSE = 30            # series with fewer points than this get markers
_TITLE_CHARS = 74      # a bold 13 pt title wraps before it leaves an 800 px figure
_FAILED_FILL = "#F6C9C9"

#: What colours mean across the kit's charts.
COLORS: dict[str, str] = {
    "waiting": "#E69F00",   # warm: waiting for a connection
    "using": "#0072B2",     # cool: holding a connection, doing work
    "failed": "#D62728",    # red: an error
    "ok": "#009E73",        # green: succeeded
    "limit": "#444444",     # configured limits, drawn dashed
    "model": "#666666",     # a model (Little's law...), drawn dashed beside measurements
    "window": "#D62728",    # a fault window, shaded
    "muted": "#B0B0B0",     # "still waiting", "not measured"
}

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
_CYCLE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]

#: The kit's matplotlib rcParams; ``style()`` applies them.
KIT_STYLE: dict[str, Any] = {
    "figure.figsize": _SIZE,
    "figure.dpi": 100,
    "figure.facecolor": "white",       # readable on the site's dark theme too
    "savefig.facecolor": "white",
    "figure.constrained_layout.use": True,
    "font.size": TEXT_PT,
    "axes.titlesize": TITLE_PT,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlepad": 8.0,
    "figure.titlesize": TITLE_PT,
    "figure.titleweight": "bold",
    "axes.labelsize": TEXT_PT,
    "xtick.labelsize": SMALL_PT,
    "ytick.labelsize": SMALL_PT,
    "legend.fontsize": SMALL_PT,
    "legend.title_fontsize": SMALL_PT,
    "legend.framealpha": 0.9,
    "legend.edgecolor": "#DDDDDD",
    "axes.prop_cycle": plt.cycler(color=_CYCLE),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.8,
    "lines.linewidth": 2.0,
    "lines.markersize": 6.0,
    "axes.formatter.useoffset": False,
    "axes.formatter.limits": (-9, 12),  # no scientific notation for the kit's magnitudes
    "axes.formatter.use_mathtext": False,
    "hatch.linewidth": 1.0,
}

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextmanager
def style() -> Iterator[None]:
    """Apply ``KIT_STYLE`` inside a ``with`` block (every helper does this itself).

    Use it to draw your own figure in the kit's style, or to add to a helper's figure
    text that should match (sizes of text added outside follow matplotlib's defaults).
    """
    with plt.style.context(KIT_STYLE):
        yield


def _styled(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with style():
            return fn(*args, **kwargs)
    return wrapper


# -- numbers -------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    """A plain number, 2-3 significant digits: ``2,130``, ``148``, ``17.6``, ``0.0052``."""
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    if a >= 10:
        text = f"{value:.1f}"
    elif a >= 1:
        text = f"{value:.2f}"
    else:  # two significant digits, never "5e-05"
        text = f"{value:.{min(12, 1 - math.floor(math.log10(a)))}f}"
    return text.rstrip("0").rstrip(".")


def _fmt_seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _plain_axis(ax: Axes, which: Literal["x", "y"]) -> None:
    """Plain tick labels on one axis, whatever its scale (no ``4×10⁰``, no offset)."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    scale = axis.get_scale()
    if scale == "linear":
        ax.ticklabel_format(axis=which, style="plain", useOffset=False)
        return
    if scale == "log":
        axis.set_major_locator(LogLocator(base=10))
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))

        def minor(value: float, _pos: int | None) -> str:
            # label 2 and 5 only when the axis spans few decades (else they crowd)
            lo, hi = sorted(axis.get_view_interval())
            return _fmt(value) if lo > 0 and hi / lo <= 200 else ""

        axis.set_minor_formatter(FuncFormatter(minor))
    else:  # symlog and the like: labelled major ticks only
        axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: _fmt(value)))


def _integer_ticks(ax: Axes, which: str) -> None:
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(MaxNLocator(integer=True))


def _all_integers(values: Sequence[float]) -> bool:
    return bool(values) and all(float(v).is_integer() for v in values)


# -- shared decorations ------------------------------------------------------------------


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.fill(line, width, break_long_words=False,
                                   break_on_hyphens=False) if len(line) > width else line
                     for line in text.split("\n"))


def _hlines(ax: Axes, hlines: Mapping[str, float] | None, color: str | None = None, *,
            in_legend: bool = False) -> None:
    """Dashed limits, each named at the right end, just above its line.

    With ``in_legend`` each is named in the legend instead (bar charts: their value labels
    would collide with a name written at the line).
    """
    for name, value in (hlines or {}).items():
        c = color or COLORS["limit"]
        ax.axhline(value, linestyle="--", color=c, linewidth=1.2, zorder=1.5,
                   label=name if in_legend else None)
        if in_legend:
            continue
        ax.annotate(name, (1.0, value), xycoords=("axes fraction", "data"),
                    xytext=(-4, 2), textcoords="offset points", ha="right", va="bottom",
                    fontsize=SMALL_PT, color=c, zorder=5,
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                          "edgecolor": "none", "alpha": 0.75})


def _bar_labels(ax: Axes, bars: Any, labels: list[str]) -> None:
    """Each bar's value at its end, on a white backing that limit lines pass behind."""
    for text in ax.bar_label(bars, labels=labels, padding=2, fontsize=SMALL_PT):
        text.set_bbox({"boxstyle": "square,pad=0.1", "facecolor": "white",
                       "edgecolor": "none", "alpha": 0.8})
        text.set_zorder(5)


def _vlines(ax: Axes, vlines: Mapping[str, float] | None) -> None:
    """Dotted moments (e.g. ``{"server starts": 2.5}``), named at the top."""
    for i, (name, at) in enumerate((vlines or {}).items()):
        ax.axvline(at, linestyle=":", color=COLORS["limit"], linewidth=1.4, zorder=1.5)
        ax.annotate(name, (at, 1.0 - 0.09 * (i % 2)), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", ha="left", va="top",
                    fontsize=SMALL_PT, color=COLORS["limit"], zorder=5)


def _windows(ax: Axes, windows: Sequence[tuple[float, float, str]] | None, *,
             label: bool = True) -> None:
    """Shade fault windows; name each at the top of the axes, left-aligned to its start."""
    for i, (start, end, name) in enumerate(windows or ()):
        ax.axvspan(start, end, color=COLORS["window"], alpha=0.12, linewidth=0, zorder=0.5)
        if label and name:
            ax.annotate(name, (start, 1.0 - 0.09 * (i % 2)),
                        xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", ha="left", va="top",
                        fontsize=SMALL_PT, color="#A01818", zorder=5,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                              "edgecolor": "none", "alpha": 0.8})


def _title(fig: Figure, title: str) -> None:
    """The figure's title, left-aligned with the figure (not the axes, which long tick
    labels push right) and wrapped to stay inside it."""
    fig.suptitle(_wrap(title, _TITLE_CHARS), x=0.01, ha="left")


def _finish(fig: Figure, ax: Axes, title: str, xlabel: str, ylabel: str,
            legend: bool = True) -> Figure:
    _title(fig, title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for axis in (ax.xaxis, ax.yaxis):
        if not isinstance(axis.get_major_formatter(), FuncFormatter):
            try:
                _plain_axis(ax, "x" if axis is ax.xaxis else "y")
            except AttributeError:  # a categorical axis: its labels are the categories
                pass
    # Pin the tick size on the axes: ticks are re-created when the figure is drawn,
    # after the style context has ended.
    ax.tick_params(which="both", labelsize=SMALL_PT)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    plt.close(fig)  # the notebook shows the returned figure once, not twice
    return fig


def _from_zero(ax: Axes, values: Sequence[float], which: str = "y",
               start: float | None = 0.0) -> None:
    """Start a count/time axis at ``start`` unless the data go below it."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if start is None or not finite or min(finite) < start:
        return
    if which == "y":
        ax.set_ylim(bottom=start)
    else:
        ax.set_xlim(left=start)


# -- line and step charts ---------------------------------------------------------------


def _series(ax: Axes, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
            step: bool, markers: bool | None) -> list[float]:
    ys_all: list[float] = []
    for i, (name, (x, y)) in enumerate(series.items()):
        xs, ys = list(x), [float(v) for v in y]
        ys_all += ys
        sparse = len(xs) < SPARSE if markers is None else markers
        # Later series thinner and on top, so a series hidden under another still shows.
        lw = max(1.2, 3.0 - 0.6 * i)
        kw: dict[str, Any] = {"label": name, "linewidth": lw, "zorder": 2 + i}
        if sparse:
            kw.update(marker=_MARKERS[i % len(_MARKERS)], markersize=max(4.0, 8.0 - 1.2 * i))
        if step:
            ax.step(xs, ys, where="post", **kw)
        else:
            ax.plot(xs, ys, **kw)
    return ys_all


def _models(ax: Axes, models: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None
            ) -> list[float]:
    ys_all: list[float] = []
    for name, (x, y) in (models or {}).items():
        ys = [float(v) for v in y]
        ys_all += ys
        ax.plot(list(x), ys, linestyle="--", color=COLORS["model"], linewidth=1.6,
                label=name, zorder=1.8)
    return ys_all


def _bands(ax: Axes, bands: Mapping[str, tuple[Sequence[float], Sequence[float],
                                              Sequence[float]]] | None) -> None:
    """Shade what a model allows: ``{name: (xs, lows, highs)}``, light grey, labelled."""
    for name, (x, low, high) in (bands or {}).items():
        xs, lows, highs = list(x), [float(v) for v in low], [float(v) for v in high]
        if not len(lows) == len(highs) == len(xs):
            raise ValueError(f"band {name!r}: xs, lows and highs differ in length")
        ax.fill_between(xs, lows, highs, color=COLORS["model"], alpha=0.15,
                        linewidth=0, label=name, zorder=1.2)


def _line_or_step(step: bool, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  title: str, xlabel: str, ylabel: str,
                  hlines: Mapping[str, float] | None,
                  windows: Sequence[tuple[float, float, str]] | None,
                  vlines: Mapping[str, float] | None,
                  models: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None,
                  markers: bool | None, log: bool, ymin: float | None,
                  bands: Mapping[str, tuple[Sequence[float], Sequence[float],
                                            Sequence[float]]] | None = None) -> Figure:
    fig, ax = plt.subplots(figsize=_SIZE)
    ys = _series(ax, series, step=step, markers=markers)
    ys += _models(ax, models)
    _bands(ax, bands)
    _hlines(ax, hlines)
    _vlines(ax, vlines)
    _windows(ax, windows)
    if log:
        ax.set_yscale("log")
    else:
        _from_zero(ax, ys + list((hlines or {}).values()), "y", ymin)
        if _all_integers(ys):
            _integer_ticks(ax, "y")
    return _finish(fig, ax, title, xlabel, ylabel)


@_styled
def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None,
               windows: Sequence[tuple[float, float, str]] | None = None,
               vlines: Mapping[str, float] | None = None,
               models: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
               markers: bool | None = None, log: bool = False,
               ymin: float | None = 0.0,
               bands: Mapping[str, tuple[Sequence[float], Sequence[float],
                                         Sequence[float]]] | None = None) -> Figure:
    """Plot named ``(x, y)`` series as lines.

    Args:
        series: ``{name: (xs, ys)}``; a series of fewer than 30 points gets markers.
        title: The question the chart answers.
        xlabel: x-axis label, with its unit.
        ylabel: y-axis label, with its unit.
        hlines: Limits to judge the series against, ``{"pool_size = 3": 3}``: dashed,
            named at the right end.
        windows: Fault windows ``[(start, end, "server restarting")]``, shaded and named.
        vlines: Moments, ``{"server starts": 2.5}``, dotted and named.
        models: What a model predicts, ``{"Little's law": (xs, ys)}``, dashed grey beside
            the measurements.
        markers: Force markers on or off (default: on for sparse series).
        log: A log y axis, for when ratios are the lesson (ticks still read ``1, 10``).
        ymin: Where the y axis starts (default 0: counts and times); ``None`` lets
            matplotlib choose. Ignored when the data go below it.
        bands: Ranges a model allows, ``{"asserted band": (xs, lows, highs)}``, shaded
            light grey behind the series (e.g. around a ``models`` line: the band the
            measurement is asserted to stay in). On a log axis give lows above 0.

    Returns:
        The figure (closed to pyplot, so a notebook shows it once).
    """
    return _line_or_step(False, series, title, xlabel, ylabel, hlines, windows, vlines,
                         models, markers, log, ymin, bands)


@_styled
def step_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None,
               windows: Sequence[tuple[float, float, str]] | None = None,
               vlines: Mapping[str, float] | None = None,
               models: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
               markers: bool | None = None, log: bool = False,
               ymin: float | None = 0.0) -> Figure:
    """Like ``line_chart``, drawn as steps (for counts sampled over time).

    Each value holds until the next sample (``where="post"``). Arguments as for
    ``line_chart``.
    """
    return _line_or_step(True, series, title, xlabel, ylabel, hlines, windows, vlines,
                         models, markers, log, ymin)


# -- bars and boxes ----------------------------------------------------------------------


@_styled
def bar_chart(values: Mapping[str, float] | Mapping[str, Mapping[str, float]], *, title: str,
              xlabel: str = "", ylabel: str, log: bool = False, annotate: bool = True,
              unit: str = "", horizontal: bool = False,
              colors: Mapping[str, str] | None = None,
              hlines: Mapping[str, float] | None = None) -> Figure:
    """Bars for ``{label: value}``, or grouped bars for ``{group: {series: value}}``.

    Bars start at 0 (on a linear axis) and carry their value as a plain number.

    Args:
        values: ``{label: value}`` or ``{group: {series: value}}``.
        title: The question the chart answers.
        xlabel: Label of the category axis (of the value axis when ``horizontal``).
        ylabel: Label of the value axis, with its unit (of the category axis when
            ``horizontal``).
        log: A log value axis, for when ratios are the lesson (ticks read ``1, 10``).
        annotate: Write each bar's value at its end.
        unit: Appended to the written values (``" ms"``).
        horizontal: Horizontal bars: room for long category names.
        colors: A colour per label (simple bars) or per series (grouped bars).
        hlines: Limits on the value axis, dashed and named (vertical bars only).

    Returns:
        The figure; its axes' ``containers`` hold the bars, one container per series.
    """
    labels = list(values)
    first = next(iter(values.values()), None)
    grouped = isinstance(first, Mapping)
    rows = len(labels) * (len(first) if grouped else 1)  # type: ignore[arg-type]
    height = 1.5 + 0.5 * rows if horizontal else _SIZE[1]
    fig, ax = plt.subplots(figsize=(WIDTH, height))
    shown = [_wrap(label, 28 if horizontal else max(10, int(60 / max(len(labels), 1))))
             for label in labels]
    positions = list(range(len(labels)))
    if horizontal:
        positions = positions[::-1]          # first label on top
    draw = ax.barh if horizontal else ax.bar
    all_values: list[float] = []
    if grouped:
        names = list(first)  # type: ignore[call-overload]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            offset = (i - (len(names) - 1) / 2) * width
            xs = [p + (-offset if horizontal else offset) for p in positions]
            ys = [float(values[label][name]) for label in labels]  # type: ignore[index]
            all_values += ys
            color = (colors or {}).get(name, _CYCLE[i % len(_CYCLE)])
            bars = draw(xs, ys, width, label=name, color=color)
            if annotate:
                _bar_labels(ax, bars, [_fmt(v) + unit for v in ys])
    else:
        ys = [float(v) for v in values.values()]  # type: ignore[arg-type]
        all_values += ys
        color_list = [(colors or {}).get(label, _CYCLE[0]) for label in labels]
        bars = draw(positions, ys, 0.6, color=color_list)
        if annotate:
            _bar_labels(ax, bars, [_fmt(v) + unit for v in ys])
    if horizontal:
        ax.set_yticks(positions, shown)
        ax.grid(False, axis="y")
    else:
        ax.set_xticks(positions, shown)
        ax.grid(False, axis="x")
        _hlines(ax, hlines, in_legend=True)
    value_axis = "x" if horizontal else "y"
    if log:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    else:
        # room for the value labels at the bar ends
        if horizontal:
            ax.margins(x=0.15)
        else:
            ax.margins(y=0.15)
        _from_zero(ax, all_values, value_axis)
        if _all_integers(all_values):
            _integer_ticks(ax, value_axis)
    handles, names = ax.get_legend_handles_labels()
    if handles:  # below the bars: inside the axes it would cover some of them
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 2),
                   frameon=False)
    return _finish(fig, ax, title, ylabel if horizontal else xlabel,
                   xlabel if horizontal else ylabel, legend=False)


@_styled
def box_chart(groups: Mapping[str, Sequence[float]], *, title: str, xlabel: str = "",
              ylabel: str, log: bool = False, unit: str = "", horizontal: bool = False,
              annotate: bool = True) -> Figure:
    """Box plots of distributions (box: quartiles, whiskers: 1st-99th percentile).

    Values beyond the whiskers are drawn as dots. When the tail reaches far beyond the
    boxes (a busy machine), the value axis ends at three times the widest box's upper
    quartile, so the boxes stay readable, and each group says how many values lie beyond
    the axis and the largest one (the outlier is the point: it is never silently dropped).

    Args:
        groups: ``{name: values}``, one box per name.
        title: The question the chart answers.
        xlabel: Label of the category axis (of the value axis when ``horizontal``).
        ylabel: Label of the value axis, with its unit (category axis when ``horizontal``).
        log: A symmetric-log value axis, for distributions spanning decades.
        unit: Appended to the written medians (``" ms"``).
        horizontal: Horizontal boxes, first group on top.
        annotate: Write each group's median beside its box.

    Returns:
        The figure.
    """
    from labkit.lab.stats import percentile

    names = list(groups)
    data = [sorted(float(v) for v in groups[name]) for name in names]
    height = 1.5 + 0.95 * len(names) if horizontal else _SIZE[1]
    fig, ax = plt.subplots(figsize=(WIDTH, height))
    positions = list(range(1, len(names) + 1))
    if horizontal:
        positions = positions[::-1]
    ax.boxplot(data, positions=positions, whis=(1, 99), showfliers=True,
               orientation="horizontal" if horizontal else "vertical", widths=0.42,
               patch_artist=True,
               boxprops={"facecolor": "#CFE3F2", "edgecolor": COLORS["using"]},
               medianprops={"color": COLORS["using"], "linewidth": 2.5},
               whiskerprops={"color": COLORS["using"]}, capprops={"color": COLORS["using"]},
               flierprops={"marker": ".", "markersize": 4, "markerfacecolor": "#777777",
                           "markeredgecolor": "none", "alpha": 0.6})
    (ax.set_yticks if horizontal else ax.set_xticks)(
        positions, [_wrap(n, 24 if horizontal else 20) for n in names])
    ax.grid(False, axis="y" if horizontal else "x")
    # A long tail (a busy machine) would squash the boxes into a line: then the axis ends
    # at three times the widest box's upper quartile, and each group says what lies beyond.
    core = max((percentile(d, 75) for d in data if d), default=1.0)
    largest = max((d[-1] for d in data if d), default=1.0)
    clip = None if log or core <= 0 or largest <= 4 * core else core * 3
    for pos, d in zip(positions, data):
        if not d or not annotate:
            continue
        text = f"median {_fmt(percentile(d, 50))}{unit}"
        beyond = [v for v in d if clip is not None and v > clip]
        if beyond:
            text += (f"; {len(beyond)} of {len(d)} beyond the axis, "
                     f"up to {_fmt(beyond[-1])}{unit}")
        if horizontal:  # above the box, from the left edge
            ax.annotate(text, (0.0, pos + 0.27), xycoords=("axes fraction", "data"),
                        xytext=(4, 0), textcoords="offset points", fontsize=SMALL_PT,
                        ha="left", va="bottom")
        else:  # beside the box, at its median
            ax.annotate(text.replace("; ", "\n"), (pos + 0.21, percentile(d, 50)),
                        xytext=(6, 0), textcoords="offset points", fontsize=SMALL_PT,
                        ha="left", va="center")
    if log:
        (ax.set_xscale if horizontal else ax.set_yscale)("symlog", linthresh=0.1)
    else:
        top = clip if clip is not None else largest * 1.05
        bottom = 0.0 if min((d[0] for d in data if d), default=0) >= 0 else None
        if horizontal:
            ax.set_xlim(bottom, top)
            ax.set_ylim(0.4, len(names) + 0.75)   # room above the top box for its label
        else:
            ax.set_ylim(bottom, top)
    return _finish(fig, ax, title, ylabel if horizontal else xlabel,
                   xlabel if horizontal else ylabel, legend=False)


# -- outcomes and durations --------------------------------------------------------------


@_styled
def duration_chart(values: Mapping[str, float], *, title: str, xlabel: str,
                   notes: Mapping[str, str] | None = None,
                   colors: Mapping[str, str] | None = None,
                   limit: tuple[str, float] | None = None,
                   cap: float | None = None,
                   windows: Sequence[tuple[float, float, str]] | None = None) -> Figure:
    """Horizontal bars, one per case, each labelled with its value and a note.

    For "how long until X" comparisons.

    Args:
        values: ``{case: seconds}``, first case on top.
        title: The question the chart answers.
        xlabel: Label of the time axis, with its unit.
        notes: The outcome written beside each bar (e.g. ``"QueryTimeoutError"``).
        colors: A colour per case (default: the kit's blue).
        limit: ``(name, seconds)``: a labelled vertical line, e.g. the configured timeout.
        cap: Bars that reached ``cap`` are drawn hatched in grey, so "still waiting when
            we stopped looking" never reads as a measured failure time.
        windows: Shaded, named spans of the time axis.

    Returns:
        The figure.
    """
    labels = list(values)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.3 + 0.55 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        value = float(values[label])
        capped = cap is not None and value >= cap
        color = COLORS["muted"] if capped else (colors or {}).get(label, COLORS["using"])
        ax.barh(y, value, color="#EEEEEE" if capped else color,
                hatch="//" if capped else None,
                edgecolor=COLORS["muted"] if capped else color, height=0.6)
        note = (notes or {}).get(label, "")
        text = f"still waiting at {cap:g} s (we stopped looking)" if capped else (
            f"{_fmt_seconds(value)}  {note}".rstrip())
        ax.annotate(text, (value, y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=SMALL_PT)
    ax.set_yticks(ys, [_wrap(label, 30) for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(False, axis="y")
    if limit is not None:
        name, at = limit
        ax.axvline(at, color=COLORS["failed"], linestyle="--", linewidth=1.2)
        ax.annotate(name, (at, 1.0), xycoords=("data", "axes fraction"), xytext=(3, 2),
                    textcoords="offset points", color=COLORS["failed"], fontsize=SMALL_PT,
                    va="bottom")
    _windows(ax, windows)
    right = max([float(v) for v in values.values()] + [limit[1] if limit else 0.0])
    reached_cap = cap is not None and any(float(v) >= cap for v in values.values())
    ax.set_xlim(0, right * (2.0 if reached_cap else 1.6) if right > 0 else 1)  # room for labels
    return _finish(fig, ax, title, xlabel, "", legend=False)


@_styled
def outcome_chart(rows: Mapping[str, Sequence[str | None]], *, title: str,
                  xlabel: str = "request number") -> Figure:
    """One row of markers per case: a green dot for success, a red cross for a failure.

    Args:
        rows: A case's outcomes in order (``None``: succeeded, else the error name,
            written beside the first failure of a row).
        title: The question the chart answers.
        xlabel: What the x positions count.

    Returns:
        The figure.
    """
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.6 + 0.6 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        outcomes = list(rows[label])
        xs = list(range(1, len(outcomes) + 1))
        ok = [x for x, o in zip(xs, outcomes) if o is None]
        bad = [(x, o) for x, o in zip(xs, outcomes) if o is not None]
        ax.scatter(ok, [y] * len(ok), marker="o", s=90, color=COLORS["ok"], zorder=3)
        ax.scatter([x for x, _ in bad], [y] * len(bad), marker="X", s=120,
                   color=COLORS["failed"], zorder=3)
        if bad:
            ax.annotate(bad[0][1], (bad[0][0], y), xytext=(0, 10), textcoords="offset points",
                        ha="center", va="bottom", fontsize=SMALL_PT, color=COLORS["failed"])
    longest = max((len(v) for v in rows.values()), default=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_yticks(ys, [_wrap(label, 30) for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.2)
    ax.grid(False, axis="y")
    handles = [Line2D([], [], marker="o", color=COLORS["ok"], linestyle="", markersize=9,
                      label="succeeded"),
               Line2D([], [], marker="X", color=COLORS["failed"], linestyle="", markersize=9,
                      label="failed")]
    ax.legend(handles=handles, loc="lower right", ncol=2, bbox_to_anchor=(1.0, 1.0),
              frameon=False, borderaxespad=0.2)
    return _finish(fig, ax, title, xlabel, "", legend=False)


# -- pools over time, budgets, waits (notebooks 02 and 09) -------------------------------


@_styled
def wait_vs_pool_size(measured: Mapping[int, float], model: Mapping[int, float], *,
                      model_label: str, title: str,
                      xlabel: str = "pool size (connections, max_overflow=0)") -> Figure:
    """Mean checkout wait per pool size, measured (solid) beside a model (dashed grey).

    Args:
        measured: ``{pool_size: mean wait in ms}``.
        model: ``{pool_size: the model's mean wait in ms}``.
        model_label: The model's name and formula, shown in the legend.
        title: The question the chart answers.
        xlabel: Label of the pool-size axis.

    Returns:
        The figure.
    """
    sizes = list(measured)
    fig = _line_or_step(False, {"measured mean wait": (sizes, [measured[k] for k in sizes])},
                        title, xlabel, "mean wait for a connection (ms)", None, None, None,
                        {model_label: (list(model), list(model.values()))}, True, False, 0.0)
    fig.axes[0].set_xticks(sizes)
    return fig


@_styled
def server_connections_chart(series: Mapping[str, tuple[Sequence[float], Sequence[int]]], *,
                             title: str, pool_size: int,
                             vlines: Mapping[str, float] | None = None) -> Figure:
    """Connections the server counts over time, one panel per case (steps), so that
    cases with equal counts never hide one another.

    Args:
        series: ``{case: (seconds, connections counted in pg_stat_activity)}``.
        title: The question the chart answers.
        pool_size: Drawn in every panel as a dashed limit, named.
        vlines: Moments on the time axis (e.g. when an idle timeout first can fire).

    Returns:
        The figure.
    """
    cases = list(series)
    fig, axes = plt.subplots(len(cases), 1, sharex=True, squeeze=False,
                             figsize=(WIDTH, 1.2 + 1.5 * len(cases)))
    top = max([pool_size] + [max(ys, default=0) for _, ys in series.values()]) + 1
    for i, (ax, case) in enumerate(zip(axes[:, 0], cases)):
        xs, ys = series[case]
        ax.step(list(xs), list(ys), where="post", color=_CYCLE[i % len(_CYCLE)], linewidth=2.4)
        ax.set_title(case, fontsize=SMALL_PT, fontweight="normal", loc="left", pad=3)
        _hlines(ax, {f"pool_size = {pool_size}": pool_size})
        if vlines:
            for at in vlines.values():
                ax.axvline(at, linestyle=":", color=COLORS["limit"], linewidth=1.4, zorder=1.5)
        ax.set_ylim(0, top)
        ax.set_xlim(left=0)
        _integer_ticks(ax, "y")
        ax.tick_params(which="both", labelsize=SMALL_PT)
    if vlines:
        for name, at in vlines.items():
            axes[-1, 0].annotate(name, (at, 0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                                 textcoords="offset points", ha="left", va="bottom",
                                 fontsize=SMALL_PT, color=COLORS["limit"])
    fig.supylabel("server connections", fontsize=TEXT_PT)
    return _finish(fig, axes[-1, 0], title, "seconds since the burst", "", legend=False)


@_styled
def connection_budget_chart(processes: Sequence[int], measured: Sequence[int], *,
                            per_process: int, max_connections: int, usable: int,
                            title: str) -> Figure:
    """Server connections held by N processes: measured, the calculator, and the limits.

    The measurement is solid with markers; the calculator (``N × per_process``) dashed
    grey; ``max_connections`` and the slots usable without superuser rights are two
    horizontal lines of their own styles. All are named in a legend under the axes, so
    no line crosses a name.

    Args:
        processes: The process counts measured (x).
        measured: Connections the server counted at each.
        per_process: Connections one process can hold (its pool's limit and its probe).
        max_connections: The server's ``max_connections``.
        usable: ``max_connections`` minus the superuser-reserved slots.
        title: The question the chart answers.

    Returns:
        The figure.
    """
    xs = list(processes)
    fig, ax = plt.subplots(figsize=(WIDTH, 4.6))
    ax.plot(xs, list(measured), marker="o", color=COLORS["using"], linewidth=2.4, zorder=3,
            label="measured: the server's count (pg_stat_activity)")
    ax.plot(xs, [n * per_process for n in xs], linestyle="--", color=COLORS["model"],
            linewidth=1.6, zorder=4, label=f"calculator: processes × {per_process}")
    ax.axhline(max_connections, color=COLORS["failed"], linestyle="-.", linewidth=1.4,
               zorder=1.5, label=f"max_connections = {max_connections}")
    ax.axhline(usable, color=COLORS["limit"], linestyle=":", linewidth=1.8, zorder=1.5,
               label=f"usable without superuser rights = {usable}")
    ax.set_ylim(0, max(max_connections, xs[-1] * per_process) * 1.08)
    ax.set_xticks(xs)
    _integer_ticks(ax, "y")
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, frameon=False)
    return _finish(fig, ax, title, "worker processes", "server connections", legend=False)


# -- the request timeline ----------------------------------------------------------------


def _resample(times: list[float], values: list[int], end: float, points: int = 1200
              ) -> tuple[list[float], list[int]]:
    """The step function's value on a regular grid: changes shorter than a pixel (a
    connection handed from one request to the next) would otherwise draw as spikes."""
    out_t, out_v, j = [], [], 0
    for k in range(points + 1):
        t = end * k / points
        while j + 1 < len(times) and times[j + 1] <= t:
            j += 1
        out_t.append(t)
        out_v.append(values[j])
    return out_t, out_v


@_styled
def request_timeline(result: LoadResult, *, title: str,
                     pool_size: int | None = None, max_overflow: int | None = None,
                     pool_timeout: float | None = None,
                     in_use: tuple[Sequence[float], Sequence[float]] | None = None,
                     windows: Sequence[tuple[float, float, str]] | None = None,
                     waiting: bool | None = None, max_lanes: int = 16,
                     xlabel: str = "time since the run started (s)") -> Figure:
    """Draw a load run as swimlanes: per worker, each request waiting, then using a connection.

    Below, one lane per worker (thread or task): each request is an orange bar while it
    waits for a connection (opening a new one included) and a blue bar while it holds
    one. A request that never got a connection (pool timeout, failed connect) is a red
    hatched bar ending in a cross; one that failed while using its connection ends in a
    red cross. Above, on the same time axis: how many connections are in use, with
    ``pool_size`` and ``pool_size + max_overflow`` drawn as the limits they are.

    Args:
        result: A run of ``run_sync_load`` / ``run_async_load`` (its ops carry ``got``
            and ``released``).
        title: The question the chart answers.
        pool_size: Drawn as a dashed limit on the in-use count.
        max_overflow: With ``pool_size``, drawn as the pool's ceiling.
        pool_timeout: Named in the legend entry of requests that gave up waiting.
        in_use: The pool's own in-use gauge ``(times, values)`` on the run's clock (e.g.
            ``sampler.series("in_use", origin=result.t0)``); by default the count is
            computed exactly from the run's records (``LoadResult.concurrency``).
        windows: Fault windows ``[(start, end, "server restarting")]``, shaded on both
            panels and named on the top one.
        waiting: Also draw the number of requests waiting above (default: only when
            there are more workers than lanes).
        max_lanes: Draw at most this many workers' lanes (the counts above cover all).
        xlabel: Label of the time axis.

    Returns:
        The figure: ``axes[0]`` the counts, ``axes[1]`` the lanes (y = worker number,
        from 1 at the top).
    """
    lanes = min(result.workers, max_lanes)
    show_waiting = result.workers > lanes if waiting is None else waiting
    fig, (top, ax) = plt.subplots(
        2, 1, sharex=True, figsize=(WIDTH, 3.2 + 0.28 * lanes),
        gridspec_kw={"height_ratios": [1.0, max(1.5, 0.28 * lanes)]})
    end_time = max([result.elapsed] + [op.end for op in result.ops])

    # -- above: connections in use against the pool's limits ---------------------------
    times, using, queued = result.concurrency()
    if len(times) > 100:  # many hand-overs: sample at the figure's resolution
        _, queued = _resample(times, queued, end_time)
        times, using = _resample(times, using, end_time)
    else:
        times, using, queued = times + [end_time], using + [using[-1]], queued + [queued[-1]]
    peak = 0.0
    if show_waiting:
        top.step(times, queued, where="post", color=COLORS["waiting"], linewidth=1.4,
                 label="requests waiting")
        top.fill_between(times, queued, step="post", color=COLORS["waiting"], alpha=0.2,
                         linewidth=0)
        peak = max(queued)
    if in_use is None:
        top.step(times, using, where="post", color=COLORS["using"], linewidth=2.2,
                 label="connections in use")
        peak = max([peak, *using])
    else:
        top.step(list(in_use[0]), list(in_use[1]), where="post", color=COLORS["using"],
                 linewidth=2.2, label="connections in use (pool gauge)")
        peak = max([peak] + [float(v) for v in in_use[1]])
    limits: dict[str, float] = {}
    if pool_size is not None:
        limits[f"pool_size = {pool_size}"] = pool_size
        if max_overflow:
            limits[f"pool_size + max_overflow = {pool_size + max_overflow}"] = (
                pool_size + max_overflow)
    _hlines(top, limits)
    if pool_size is not None and max_overflow:  # the overflow connections' band
        top.axhspan(pool_size, pool_size + max_overflow, color=COLORS["muted"], alpha=0.15,
                    linewidth=0, zorder=0.5)
    top.set_ylim(0, max([peak] + list(limits.values())) * 1.3 + 0.5)
    top.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    top.set_ylabel("requests waiting\nand connections\nin use" if show_waiting
                   else "connections\nin use")
    if show_waiting:
        top.legend(loc="upper left", ncol=2)
    _windows(top, windows)
    _title(fig, title)

    # -- below: one lane per worker -----------------------------------------------------
    bar = 0.64
    failed_checkout = failed_work = False
    errors: list[str] = []
    for worker in range(lanes):
        y = lanes - worker   # worker 0 on top, labelled 1
        ops = [op for op in result.ops if op.worker == worker]
        waits = [(op.start, op.got - op.start) for op in ops if op.got is not None]
        uses = [(op.got, (op.released if op.released is not None else op.end) - op.got)
                for op in ops if op.got is not None]
        gave_up = [(op.start, op.end - op.start) for op in ops if op.got is None]
        broke = [op.end for op in ops if not op.ok and op.got is not None]
        ax.broken_barh(waits, (y - bar / 2, bar), facecolors=COLORS["waiting"],
                       edgecolor="white", linewidth=0.4)
        ax.broken_barh(uses, (y - bar / 2, bar), facecolors=COLORS["using"],
                       edgecolor="white", linewidth=0.4)
        if gave_up:
            failed_checkout = True
            ax.broken_barh(gave_up, (y - bar / 2, bar), facecolors=_FAILED_FILL,
                           edgecolor=COLORS["failed"], linewidth=0.8, hatch="////")
            ax.plot([s + w for s, w in gave_up], [y] * len(gave_up), linestyle="",
                    marker="X", markersize=9, color=COLORS["failed"], zorder=4)
        if broke:
            failed_work = True
            ax.plot(broke, [y] * len(broke), linestyle="", marker="X", markersize=9,
                    color=COLORS["failed"], zorder=4)
        errors += [op.error or "error" for op in ops if not op.ok]
    _windows(ax, windows, label=False)
    ax.set_ylim(0.4, lanes + 0.6)
    step = max(1, math.ceil(lanes / 12))
    ax.set_yticks(range(lanes, 0, -step), [str(i + 1) for i in range(0, lanes, step)])
    ax.grid(False, axis="y")
    ax.set_xlim(0, end_time * 1.01)
    ax.set_ylabel("worker" if lanes == result.workers
                  else f"worker (first {lanes} of {result.workers})")

    handles: list[Any] = [Patch(facecolor=COLORS["waiting"], label="waiting for a connection"),
                          Patch(facecolor=COLORS["using"], label="using it")]
    names = sorted(set(errors))
    if failed_checkout:
        what = ", ".join(names[:2]) + ("..." if len(names) > 2 else "") or "gave up"
        after = f" after pool_timeout = {pool_timeout:g} s" if pool_timeout is not None else ""
        handles.append(Patch(facecolor=_FAILED_FILL, edgecolor=COLORS["failed"],
                             hatch="////", label=f"{what}{after}"))
    if failed_work:
        handles.append(Line2D([], [], marker="X", color=COLORS["failed"], linestyle="",
                              markersize=9, label="failed while using it"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2),
               frameon=False)
    for axes in (top, ax):
        axes.tick_params(which="both", labelsize=SMALL_PT)
    _plain_axis(ax, "x")
    ax.set_xlabel(xlabel)
    plt.close(fig)
    return fig


# -- failure cases and a request's life (notebooks 01, 07, 05) ---------------------------


@_styled
def points_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
                 xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None,
                 windows: Sequence[tuple[float, float, str]] | None = None,
                 vlines: Mapping[str, float] | None = None,
                 failed: Sequence[str] = (), legend: str = "best") -> Figure:
    """Separate measurements as points, one marker per series, no lines between them.

    For probes and requests sent one after another: each point is its own event, not a
    sample of a trend.

    Args:
        series: ``{name: (xs, ys)}``.
        title: The question the chart answers.
        xlabel: Label of the x axis, with its unit.
        ylabel: Label of the y axis, with its unit.
        hlines: Limits or medians, dashed and named.
        windows: Fault windows, shaded and named.
        vlines: Moments, dotted and named.
        failed: Names of series drawn in the kit's red (failures).
        legend: Where the legend goes (matplotlib's ``loc``).

    Returns:
        The figure.
    """
    fig, ax = plt.subplots(figsize=_SIZE)
    ys: list[float] = []
    for i, (name, (x, y)) in enumerate(series.items()):
        values = [float(v) for v in y]
        ys += values
        kw: dict[str, Any] = {"label": name, "linestyle": "", "zorder": 2 + i,
                              "marker": _MARKERS[i % len(_MARKERS)],
                              "markersize": max(4.0, 7.0 - 1.0 * i)}
        if name in failed:
            kw["color"] = COLORS["failed"]
        ax.plot(list(x), values, **kw)
    _hlines(ax, hlines)
    _vlines(ax, vlines)
    _windows(ax, windows)
    if windows or vlines:
        ax.margins(y=0.18)          # room above the points for the windows' names
    _from_zero(ax, ys + list((hlines or {}).values()), "y")
    fig = _finish(fig, ax, title, xlabel, ylabel, legend=False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=legend)  # type: ignore[call-overload]  # any of matplotlib's loc names
    return fig


@_styled
def failures_over_time(runs: Mapping[str, tuple[LoadResult, tuple[float, float]]], *,
                       title: str, window: str = "server restarting",
                       bucket: float = 0.1) -> Figure:
    """Failed operations per time bucket, one panel per run, each with its own fault window.

    Runs whose faults lasted differently are not drawn against one shared window: each
    panel shades the span its own fault took.

    Args:
        runs: ``{name: (result, (fault_start, fault_end))}``, times in seconds since the
            run's start.
        title: The question the chart answers.
        window: The name of the shaded span.
        bucket: Width of a time bucket, in seconds.

    Returns:
        The figure.
    """
    fig, axes = plt.subplots(len(runs), 1, figsize=(WIDTH, 1.4 + 1.7 * len(runs)),
                             sharex=True, squeeze=False)
    end = max(max((op.end for op in r.ops), default=0.0) for r, _ in runs.values())
    n = max(1, math.ceil(end / bucket))
    top = 1
    for ax, (name, (result, (down, up))) in zip(axes[:, 0], runs.items()):
        counts = [0] * n
        for op in result.ops:
            if not op.ok:
                counts[min(int(op.start / bucket), n - 1)] += 1
        top = max(top, *counts)
        ax.step([i * bucket for i in range(n)], counts, where="post",
                color=COLORS["failed"], linewidth=1.8)
        _windows(ax, [(down, up, f"{window} ({up - down:.2f} s)")])
        ax.set_ylabel(f"failed per\n{bucket * 1000:.0f} ms")
        ax.set_title(name, loc="left", fontsize=TEXT_PT, fontweight="normal")
        ax.tick_params(which="both", labelsize=SMALL_PT)
    for ax in axes[:, 0]:
        ax.set_ylim(0, top * 1.3)
        _integer_ticks(ax, "y")
    axes[-1, 0].set_xlabel("time (s)")
    _plain_axis(axes[-1, 0], "x")
    _title(fig, title)
    plt.close(fig)
    return fig


def lost_commit_chart(outcomes: Mapping[str, Mapping[str, float]], *, payments: int,
                      title: str) -> Figure:
    """Grouped bars per retry policy: rows stored, duplicates, callers told "unknown".

    Colours carry the meaning (stored: cool, a duplicate: red, a warning: warm) and the
    legend shows exactly the bars' colours; the payments made are the dashed line.

    Args:
        outcomes: ``{policy: {"rows stored": n, "duplicates": n, "caller told unknown": n}}``.
        payments: How many payments were made.
        title: The question the chart answers.

    Returns:
        The figure.
    """
    series = {"rows stored": COLORS["using"], "duplicates": COLORS["failed"],
              "caller told unknown": COLORS["waiting"]}
    return bar_chart({policy: {name: r[name] for name in series}
                      for policy, r in outcomes.items()},
                     title=title, ylabel="count", colors=series,
                     hlines={f"payments made ({payments})": payments})


def backend_after_client_chart(seconds: Mapping[str, float], *, stopped: Mapping[str, str],
                               remaining: float, title: str) -> Figure:
    """How long a backend kept running its statement after the client acted, per case.

    Args:
        seconds: ``{case: seconds the backend stayed active after the client's action}``.
        stopped: ``{case: what ended the statement}`` (written beside each bar); a case
            whose statement was stopped early is drawn cool, one that ran on warm.
        remaining: Seconds the statement still had to run when the client acted: a run
            that lasted this long was never stopped.
        title: The question the chart answers.

    Returns:
        The figure.
    """
    colors = {case: COLORS["waiting"] if s > 0.5 * remaining else COLORS["using"]
              for case, s in seconds.items()}
    return duration_chart(seconds, notes=stopped, colors=colors,
                          limit=(f"the statement's remaining {remaining:g} s", remaining),
                          title=title, xlabel="seconds the backend kept running after the client acted")


# -- sessions, lost updates, pool sizes and scaling (notebooks 04, 06, 03) ------------------


def _statements_text(statements: Sequence[str]) -> str:
    """``["INSERT", "SELECT", "SELECT"]`` → ``"INSERT\\nSELECT ×2"``: kinds in order sent."""
    counts: dict[str, int] = {}
    for statement in statements:
        counts[statement] = counts.get(statement, 0) + 1
    return "\n".join(f"{kind} ×{n}" if n > 1 else kind for kind, n in counts.items())


@_styled
def statement_steps(rows: Mapping[str, Sequence[tuple[str, Sequence[str]]]], *, title: str,
                    highlight: str | None = None) -> Figure:
    """What a session sent to the server at each step of the same code, one row per setting.

    Args:
        rows: ``{setting: [(step, statements sent during it), ...]}``, the same steps in
            every row (e.g. ``("query", ["INSERT", "SELECT"])``, from a
            ``before_cursor_execute`` listener).
        title: The question the chart answers.
        highlight: A statement kind (``"INSERT"``) whose cells are drawn warm, so the
            eye finds where it went out.

    Returns:
        The figure; each row ends with its total count of statements.
    """
    names = list(rows)
    steps = [step for step, _ in rows[names[0]]]
    fig, ax = plt.subplots(figsize=(WIDTH, 1.5 + 0.95 * len(names)))
    ys = list(range(len(names)))[::-1]
    for y, name in zip(ys, names):
        cells = list(rows[name])
        for x, (_, statements) in enumerate(cells):
            marked = highlight is not None and highlight in statements
            face = ("#FBE3B3" if marked else "#CFE3F2") if statements else "#F2F2F2"
            edge = (COLORS["waiting"] if marked else COLORS["using"]) if statements else "#DDDDDD"
            ax.add_patch(Rectangle((x + 0.06, y - 0.36), 0.88, 0.72, facecolor=face,
                                   edgecolor=edge, linewidth=1.2))
            ax.text(x + 0.5, y, _statements_text(statements) or "nothing sent", ha="center",
                    va="center", fontsize=SMALL_PT,
                    color="#222222" if statements else "#888888",
                    fontweight="bold" if marked else "normal")
        total = sum(len(statements) for _, statements in cells)
        ax.text(len(steps) + 0.1, y, f"{total} statement{'s' if total != 1 else ''}",
                ha="left", va="center", fontsize=SMALL_PT)
    ax.set_xlim(0, len(steps) + 1.1)
    ax.set_ylim(-0.6, len(names) - 0.25)
    ax.set_xticks([x + 0.5 for x in range(len(steps))], [_wrap(s, 22) for s in steps])
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", length=0)
    ax.set_yticks(ys, [_wrap(name, 26) for name in names])
    ax.tick_params(axis="y", length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _title(fig, title)
    ax.tick_params(which="both", labelsize=SMALL_PT)
    plt.close(fig)
    return fig


@_styled
def lost_update_chart(stored: Mapping[str, int], *, expected: int, title: str,
                      notes: Mapping[str, str] | None = None,
                      expected_label: str | None = None) -> Figure:
    """Horizontal bars of increments stored, the lost ones in red, one bar per approach.

    Args:
        stored: ``{approach: increments the row holds at the end}``, first on top.
        expected: Increments made; the gap up to it is what was lost.
        title: The question the chart answers.
        notes: Written after each bar's count (e.g. ``"12 retries"``).
        expected_label: Names the dashed line at ``expected``.

    Returns:
        The figure.
    """
    labels = list(stored)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.5 + 0.6 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        kept = int(stored[label])
        lost = max(0, expected - kept)
        ax.barh(y, kept, height=0.6, color=COLORS["ok"] if not lost else COLORS["using"])
        if lost:
            ax.barh(y, lost, left=kept, height=0.6, color=_FAILED_FILL,
                    edgecolor=COLORS["failed"], hatch="////", linewidth=0.8)
        text = f"{lost} lost" if lost else "none lost"
        note = (notes or {}).get(label)
        ax.annotate(text + (f" · {note}" if note else ""), (max(kept, expected), y),
                    xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=SMALL_PT, color=COLORS["failed"] if lost else "#222222")
    ax.axvline(expected, linestyle="--", color=COLORS["limit"], linewidth=1.2)
    ax.annotate(expected_label or f"expected: {expected}", (expected, 1.0),
                xycoords=("data", "axes fraction"), xytext=(-3, 2), textcoords="offset points",
                ha="right", va="bottom", fontsize=SMALL_PT, color=COLORS["limit"])
    ax.set_yticks(ys, [_wrap(label, 30) for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.3)
    ax.set_xlim(0, expected * 1.6)       # room for the notes; no ticks past the expected
    ax.set_xticks([round(expected * k / 4) for k in range(5)])
    ax.grid(False, axis="y")
    return _finish(fig, ax, title, "increments stored in the row", "", legend=False)


@_styled
def pool_size_chart(sizes: Sequence[int], series: Mapping[str, Sequence[float]], *,
                    title: str, ylabel: str,
                    spread: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                    models: Mapping[str, Sequence[float]] | None = None,
                    hlines: Mapping[str, float] | None = None,
                    vlines: Mapping[str, float] | None = None,
                    xlabel: str = "pool size (connections)") -> Figure:
    """Measurements per pool size beside a model, each pool size a labelled tick.

    Sizes spanning a factor of 8 or more are drawn on a base-2 log axis (1, 2, 4 ... 32
    evenly spaced).

    Args:
        sizes: The pool sizes measured, ascending.
        series: ``{name: one value per size}``, measured.
        title: The question the chart answers.
        ylabel: Label of the value axis, with its unit.
        spread: ``{name: (lows, highs)}``: a range around a series (e.g. the quartiles of
            repeated rounds), drawn as error bars.
        models: ``{name: one value per size}``, dashed grey.
        hlines: Limits, dashed and named (``{"target: 10 ms": 10}``).
        vlines: Pool sizes to mark, dotted and named (``{"server runs 4 at once": 4}``).
        xlabel: Label of the pool-size axis.

    Returns:
        The figure.
    """
    xs = list(sizes)
    fig = _line_or_step(False, {name: (xs, ys) for name, ys in series.items()}, title, xlabel,
                        ylabel, hlines, None, vlines,
                        {name: (xs, ys) for name, ys in (models or {}).items()},
                        True, False, 0.0)
    ax = fig.axes[0]
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    for name, (lows, highs) in (spread or {}).items():
        mids = [float(v) for v in series[name]]
        ax.errorbar(xs, mids, yerr=[[m - lo for m, lo in zip(mids, lows)],
                                    [hi - m for m, hi in zip(mids, highs)]],
                    fmt="none", ecolor=colors.get(name, COLORS["using"]), capsize=3)
    if xs[-1] >= 8 * xs[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlim(xs[0] / 1.3, xs[-1] * 1.3)
    else:
        ax.set_xlim(xs[0] - 0.4, xs[-1] + 0.4)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.tick_params(which="both", labelsize=SMALL_PT)
    return fig


@_styled
def spread_bar_chart(values: Mapping[str, tuple[float, float, float]], *, title: str,
                     xlabel: str = "", ylabel: str,
                     colors: Mapping[str, str] | None = None) -> Figure:
    """Bars of medians with their spread: ``{label: (median, low, high)}``.

    Each bar carries its median above the error bar (e.g. the interquartile range of
    repeated rounds). Other arguments as for ``bar_chart``.

    Returns:
        The figure.
    """
    labels = list(values)
    mids = [float(values[k][0]) for k in labels]
    lows = [float(values[k][1]) for k in labels]
    highs = [float(values[k][2]) for k in labels]
    fig, ax = plt.subplots(figsize=_SIZE)
    xs = list(range(len(labels)))
    ax.bar(xs, mids, 0.6, color=[(colors or {}).get(k, _CYCLE[0]) for k in labels])
    ax.errorbar(xs, mids, yerr=[[m - lo for m, lo in zip(mids, lows)],
                                [hi - m for m, hi in zip(mids, highs)]],
                fmt="none", ecolor="black", capsize=4, linewidth=1)
    for x, m, hi in zip(xs, mids, highs):
        ax.annotate(_fmt(m), (x, hi), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=SMALL_PT)
    ax.set_xticks(xs, [_wrap(k, max(10, int(60 / max(len(labels), 1)))) for k in labels])
    ax.grid(False, axis="x")
    ax.set_ylim(0, max(highs + [1.0]) * 1.15)
    return _finish(fig, ax, title, xlabel, ylabel, legend=False)


@_styled
def ratio_chart(ratios: Mapping[str, tuple[float, float, float]], *, title: str,
                xlabel: str = "ratio (log scale; 1 = equal)") -> Figure:
    """Ratios with their intervals, one row each: ``{label: (median, low, high)}``.

    A log axis (a ratio of 2 and of 0.5 lie equally far from 1), the line at 1 drawn,
    each row labelled ``median [low–high]``.

    Returns:
        The figure.
    """
    labels = list(ratios)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.5 + 0.6 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    mids = [float(ratios[k][0]) for k in labels]
    lows = [float(ratios[k][1]) for k in labels]
    highs = [float(ratios[k][2]) for k in labels]
    ax.errorbar(mids, ys, xerr=[[m - lo for m, lo in zip(mids, lows)],
                                [hi - m for m, hi in zip(mids, highs)]],
                fmt="o", color=COLORS["using"], capsize=4, markersize=7)
    for m, lo, hi, y in zip(mids, lows, highs, ys):
        ax.annotate(f"{m:.2f} [{lo:.2f}–{hi:.2f}]", (hi, y), xytext=(6, -3),
                    textcoords="offset points", fontsize=SMALL_PT)
    ax.axvline(1.0, color=COLORS["limit"], linewidth=1)
    ax.set_xscale("log")
    lo, hi = min(lows) / 1.3, max(highs) * 2.5
    ax.set_xlim(lo, hi)
    ax.set_xticks([t for t in (0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10) if lo <= t <= hi])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: _fmt(value)))
    ax.minorticks_off()
    ax.set_yticks(ys, [_wrap(k, 34) for k in labels])
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(False, axis="y")
    return _finish(fig, ax, title, xlabel, "", legend=False)


@_styled
def scaling_chart(levels: Sequence[int], throughput: Mapping[str, Mapping[str, Sequence[float]]],
                  *, title: str, xlabel: str = "concurrent workers") -> Figure:
    """Throughput relative to one worker, beside perfect scaling (× workers).

    Args:
        levels: Worker counts, the first one 1.
        throughput: ``{kind of work: {stack: throughput per level}}``; one colour per kind
            of work, one marker and line style per stack.
        title: The question the chart answers.
        xlabel: Label of the worker axis.

    Returns:
        The figure.
    """
    fig, ax = plt.subplots(figsize=_SIZE)
    xs = list(levels)
    ax.plot(xs, xs, linestyle="--", color=COLORS["model"], linewidth=1.6,
            label="perfect scaling: × workers", zorder=1.8)
    for i, (kind, stacks) in enumerate(throughput.items()):
        for j, (stack, values) in enumerate(stacks.items()):
            relative = [float(v) / float(values[0]) for v in values]
            ax.plot(xs, relative, color=_CYCLE[i % len(_CYCLE)], marker=_MARKERS[j % 2],
                    markersize=7, linestyle="-" if j % 2 == 0 else ":", linewidth=2.2,
                    label=f"{kind}, {stack}", zorder=2 + i)
    ax.set_xticks(xs)
    ax.set_xlim(0, xs[-1] * 1.05)
    ax.set_ylim(0, xs[-1] * 1.1)
    fig = _finish(fig, ax, title, xlabel, "throughput ÷ throughput of 1 worker", legend=False)
    ax.legend(loc="upper left")
    return fig


@_styled
def points_with_model(points: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                      models: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                      title: str, xlabel: str, ylabel: str) -> Figure:
    """Measured points (markers, no lines) judged against a model drawn dashed.

    Both axes start at 0, so a point on the model's line reads as "the model holds".

    Args:
        points: ``{name: (xs, ys)}``, measured, each point its own experiment.
        models: ``{name: (xs, ys)}``, what a model predicts (``wait = hold``).
        title: The question the chart answers.
        xlabel: Label of the x axis, with its unit.
        ylabel: Label of the y axis, with its unit.

    Returns:
        The figure.
    """
    fig, ax = plt.subplots(figsize=_SIZE)
    _models(ax, models)
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.plot(list(x), [float(v) for v in y], linestyle="", marker=_MARKERS[i % len(_MARKERS)],
                markersize=8, color=_CYCLE[i % len(_CYCLE)], label=name, zorder=3 + i)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    fig = _finish(fig, ax, title, xlabel, ylabel, legend=False)
    ax.legend(loc="upper left")
    return fig


@_styled
def wait_chart(waits: Mapping[str, tuple[float, str | None]], *, cap: float, title: str,
               xlabel: str = "seconds until the caller got control back") -> Figure:
    """How long each case waited under a network fault, and how the wait ended.

    A bar per case, labelled with its seconds and outcome; a wait still running when we
    stopped looking (``cap``) is drawn hatched in grey up to the dashed cap line, so it
    never reads as a measured failure. The time axis ends at the cap.

    Args:
        waits: ``{case: (seconds, outcome)}``, first case on top; the outcome is an
            error class name, ``None`` (succeeded) or ``"still waiting"``.
        cap: Seconds after which we stopped waiting.
        title: The question the chart answers.
        xlabel: Label of the time axis, with its unit.

    Returns:
        The figure.
    """
    labels = list(waits)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.4 + 0.5 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        seconds, outcome = waits[label]
        capped = seconds >= cap or outcome == "still waiting"
        if capped:
            ax.barh(y, cap, color="#EEEEEE", hatch="//", edgecolor=COLORS["muted"], height=0.6)
            ax.annotate(f"still waiting at {cap:g} s", (0, y), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=SMALL_PT,
                        bbox={"boxstyle": "square,pad=0.15", "facecolor": "white",
                              "edgecolor": "none", "alpha": 0.9})
            continue
        color = COLORS["ok"] if outcome is None else COLORS["failed"]
        ax.barh(y, seconds, color=color, height=0.6)
        text = f"{_fmt_seconds(seconds)}  {outcome or 'ok'}"
        inside = seconds > 0.55 * cap  # no room on the right: write it on the bar
        ax.annotate(text, (seconds, y), xytext=(-4 if inside else 4, 0),
                    textcoords="offset points", va="center", fontsize=SMALL_PT,
                    ha="right" if inside else "left", color="white" if inside else "black")
    ax.axvline(cap, color=COLORS["limit"], linestyle="--", linewidth=1.2)
    ax.annotate("we stopped looking", (cap, 1.0), xycoords=("data", "axes fraction"),
                xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom",
                fontsize=SMALL_PT, color=COLORS["limit"])
    ax.set_yticks(ys, [_wrap(label, 40) for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlim(0, cap * 1.02)
    ax.grid(False, axis="y")
    return _finish(fig, ax, title, xlabel, "", legend=False)


def _camel_lines(name: str, width: int) -> str:
    """An error class name broken between its words (``DatabaseUnavailable`` / ``Error``)."""
    words = re.findall(r"[A-Z][a-z0-9]*|[^A-Z]+", name) or [name]
    lines = [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + len(word) > width:
            lines.append("")
        lines[-1] += word
    return "\n".join(lines)


@_styled
def wait_matrix_chart(cells: Mapping[str, Mapping[str, tuple[float, str | None]]], *,
                      cap: float, title: str) -> Figure:
    """Which setting ends which wait, per driver: a table of cells, one per case and column.

    Each cell says how long the caller waited and how the wait ended, and fills its width in
    proportion to the wait (the full width is ``cap``): red for an error, green for success,
    hatched grey for a wait still running when we stopped looking. A case a column does not
    have (an asyncio timeout on a sync driver) is left blank.

    Args:
        cells: ``{case: {column: (seconds, outcome)}}``, first case on top; the outcome is an
            error class name, ``None`` (succeeded) or ``"still waiting"``.
        cap: Seconds after which we stopped waiting.
        title: The question the chart answers.

    Returns:
        The figure.
    """
    rows = list(cells)
    columns = list(dict.fromkeys(c for row in cells.values() for c in row))
    fig, ax = plt.subplots(figsize=(WIDTH, 1.5 + 0.75 * len(rows)))
    for r, row in enumerate(rows):
        y = len(rows) - 1 - r
        for c, column in enumerate(columns):
            ax.add_patch(Rectangle((c + 0.03, y + 0.06), 0.94, 0.88, facecolor="#F7F7F7",
                                   edgecolor="#DDDDDD", linewidth=0.8))
            if column not in cells[row]:
                continue
            seconds, outcome = cells[row][column]
            waiting = outcome == "still waiting" or seconds >= cap
            width = 0.94 * min(1.0, max(seconds, 0.0) / cap)
            color = COLORS["muted"] if waiting else (
                COLORS["ok"] if outcome is None else COLORS["failed"])
            ax.add_patch(Rectangle((c + 0.03, y + 0.06), width, 0.88,
                                   facecolor="#EEEEEE" if waiting else color,
                                   alpha=1.0 if waiting else 0.25, edgecolor=COLORS["muted"]
                                   if waiting else "none", hatch="//" if waiting else None))
            text = (f"still waiting\nat {cap:g} s" if waiting
                    else f"{_fmt_seconds(seconds)}\n{_camel_lines(str(outcome or 'ok'), 16)}")
            ax.annotate(text, (c + 0.5, y + 0.5), ha="center", va="center",
                        fontsize=SMALL_PT, linespacing=1.1,
                        color="#555555" if waiting else "black",
                        bbox={"boxstyle": "square,pad=0.15", "facecolor": "#EEEEEE",
                              "edgecolor": "none"} if waiting else None)
    ax.set_xlim(0, len(columns))
    ax.set_ylim(0, len(rows))
    ax.set_xticks([c + 0.5 for c in range(len(columns))], [_wrap(c, 16) for c in columns])
    ax.xaxis.tick_top()
    ax.set_yticks([len(rows) - 0.5 - r for r in range(len(rows))],
                  [_wrap(row, 28) for row in rows])
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.annotate(f"a cell's fill: the wait, out of the {cap:g} s we looked", (0.0, 0.0),
                xycoords="axes fraction", xytext=(0, -6), textcoords="offset points",
                ha="left", va="top", fontsize=SMALL_PT, color="#555555")
    _title(fig, title)
    ax.tick_params(which="both", labelsize=SMALL_PT)
    plt.close(fig)
    return fig


@_styled
def request_outcomes_chart(rows: Mapping[str, Sequence[str | None]], *, title: str,
                           xlabel: str = "request number") -> Figure:
    """One row per case, one marker per request: green dot succeeded, red cross failed.

    The error of each row's first failure is written above its cross, inside the axes.

    Args:
        rows: A case's outcomes in order: ``None`` (succeeded), an error class name, or
            ``"still waiting"`` (cut when we stopped looking: a grey cross).
        title: The question the chart answers.
        xlabel: What the x positions count.

    Returns:
        The figure.
    """
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.5 + 0.5 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        outcomes = list(rows[label])
        for x, outcome in enumerate(outcomes, start=1):
            if outcome is None:
                ax.scatter([x], [y], marker="o", s=90, color=COLORS["ok"], zorder=3)
            else:
                muted = outcome == "still waiting"
                ax.scatter([x], [y], marker="X", s=120, zorder=3,
                           color=COLORS["muted"] if muted else COLORS["failed"])
        first = next(((x, o) for x, o in enumerate(outcomes, start=1) if o is not None), None)
        if first is not None:
            ax.annotate(first[1], (first[0], y), xytext=(-6, 8), textcoords="offset points",
                        ha="left", va="bottom", fontsize=SMALL_PT,
                        color=COLORS["muted"] if first[1] == "still waiting" else COLORS["failed"],
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                              "edgecolor": "none", "alpha": 0.9}, zorder=4)
    longest = max((len(v) for v in rows.values()), default=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.6, longest + 0.4)
    ax.set_yticks(ys, [_wrap(label, 40) for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.3)
    ax.grid(False, axis="y")
    handles = [Line2D([], [], marker="o", color=COLORS["ok"], linestyle="", markersize=9,
                      label="succeeded"),
               Line2D([], [], marker="X", color=COLORS["failed"], linestyle="", markersize=9,
                      label="failed"),
               Line2D([], [], marker="X", color=COLORS["muted"], linestyle="", markersize=9,
                      label="still waiting (cut)")]
    ax.legend(handles=handles, loc="lower right", ncol=3, bbox_to_anchor=(1.0, 1.0),
              frameon=False, borderaxespad=0.2)
    return _finish(fig, ax, title, xlabel, "", legend=False)


# -- a session used again after a failure (notebook 04) ----------------------------------


@_styled
def session_reuse_chart(rows: Mapping[str, Sequence[str | None]], *, title: str,
                        refused: Sequence[str], xlabel: str = "job number") -> Figure:
    """One row per way of handling errors, one marker per job: what one failure does next.

    A green dot is a job that succeeded; a red cross, a job that failed on its own error;
    a hollow red square, a job refused only because an earlier error was never rolled
    back. Each run of the same error is named once, above its first marker.

    Args:
        rows: A case's outcomes in order: ``None`` (succeeded) or an error class name.
        title: The question the chart answers.
        refused: The error names that mean "refused: an earlier error is still pending"
            (``PendingRollbackError``, ``InFailedSqlTransaction``).
        xlabel: What the x positions count.

    Returns:
        The figure.
    """
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.6 + 0.75 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        outcomes = list(rows[label])
        for x, outcome in enumerate(outcomes, start=1):
            if outcome is None:
                ax.scatter([x], [y], marker="o", s=90, color=COLORS["ok"], zorder=3)
            elif outcome in refused:
                ax.scatter([x], [y], marker="s", s=90, facecolors="white", linewidths=2.0,
                           edgecolors=COLORS["failed"], zorder=3)
            else:
                ax.scatter([x], [y], marker="X", s=130, color=COLORS["failed"], zorder=3)
        for x, outcome in enumerate(outcomes, start=1):
            if outcome is not None and (x == 1 or outcomes[x - 2] != outcome):
                own = outcome not in refused
                ax.annotate(outcome, (x, y), xytext=(-6 if own else 10, 9 if own else -9),
                            textcoords="offset points", ha="left",
                            va="bottom" if own else "top", fontsize=SMALL_PT,
                            color=COLORS["failed"], zorder=4,
                            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                                  "edgecolor": "none", "alpha": 0.9})
    longest = max((len(v) for v in rows.values()), default=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_yticks(ys, [_wrap(label, 34) for label in labels])
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.grid(False, axis="y")
    handles = [Line2D([], [], marker="o", color=COLORS["ok"], linestyle="", markersize=9,
                      label="succeeded"),
               Line2D([], [], marker="X", color=COLORS["failed"], linestyle="", markersize=9,
                      label="failed: its own error"),
               Line2D([], [], marker="s", markerfacecolor="white", markeredgewidth=2.0,
                      markeredgecolor=COLORS["failed"], linestyle="", markersize=8,
                      label="refused: an earlier error not rolled back")]
    ax.legend(handles=handles, loc="lower right", ncol=3, bbox_to_anchor=(1.0, 1.0),
              frameon=False, borderaxespad=0.2)
    return _finish(fig, ax, title, xlabel, "", legend=False)


@_styled
def lock_timeline_chart(lanes: Mapping[str, Sequence[tuple[float, float, str]]], *,
                        title: str, xlabel: str = "time since the round started (ms)",
                        groups: int = 2) -> Figure:
    """Transactions as lanes over time: open (holding its row locks), waiting for a lock,
    and how each attempt ended (committed, or aborted by the server).

    Args:
        lanes: ``{lane label: [(start, end, kind), ...]}`` in ms. ``kind`` is ``"open"``
            (a transaction open, holding the row locks it took), ``"wait"`` (a statement
            waiting for a lock another transaction holds), ``"backoff"`` (waiting before a
            retry), or the end of an attempt: ``"committed"`` or an error's words (a red
            cross, the words written beside it); an end uses ``start`` only.
        title: The question the chart answers.
        xlabel: Label of the time axis, with its unit.
        groups: Lanes per group: a thin line separates the groups (one case each).

    Returns:
        The figure.
    """
    labels = list(lanes)
    fig, ax = plt.subplots(figsize=(WIDTH, 1.4 + 0.5 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    bars = {"open": (COLORS["using"], 0.5, 2), "wait": (COLORS["waiting"], 0.5, 3),
            "backoff": (COLORS["muted"], 0.2, 2)}
    named: set[str] = set()
    for y, label in zip(ys, labels):
        for start, end, kind in lanes[label]:
            if kind in bars:
                color, height, zorder = bars[kind]
                ax.barh(y, end - start, left=start, height=height, color=color, zorder=zorder)
            elif kind == "committed":
                ax.scatter([start], [y], marker="o", s=80, color=COLORS["ok"], zorder=4)
            else:
                ax.scatter([start], [y], marker="X", s=120, color=COLORS["failed"], zorder=4)
                if kind not in named:
                    named.add(kind)
                    ax.annotate(kind, (start, y), xytext=(8, 0), textcoords="offset points",
                                ha="left", va="center", fontsize=SMALL_PT,
                                color=COLORS["failed"], zorder=5,
                                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                                      "edgecolor": "none", "alpha": 0.9})
    for boundary in range(groups, len(labels), groups):
        ax.axhline(len(labels) - boundary - 0.5, color=COLORS["muted"], linewidth=0.8)
    ax.set_yticks(ys, [_wrap(label, 34) for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(False, axis="y")
    ax.set_xlim(left=0)
    ax.margins(x=0.22)
    ax.set_xlim(left=0)
    handles = [Patch(color=COLORS["using"], label="transaction open, holding its locks"),
               Patch(color=COLORS["waiting"], label="waiting for a lock"),
               Patch(color=COLORS["muted"], label="backoff before a retry"),
               Line2D([], [], marker="o", color=COLORS["ok"], linestyle="", markersize=8,
                      label="committed"),
               Line2D([], [], marker="X", color=COLORS["failed"], linestyle="", markersize=9,
                      label="aborted")]
    ax.legend(handles=handles, loc="lower right", ncol=3, bbox_to_anchor=(1.0, 1.0),
              frameon=False, borderaxespad=0.2, handletextpad=0.4, columnspacing=1.0)
    return _finish(fig, ax, title, xlabel, "", legend=False)


# -- drivers and psycopg_pool (notebook 11) ------------------------------------------------


@_styled
def driver_comparison(rows: Sequence[Mapping[str, Any]], *, title: str,
                      xlabel: str = "concurrent workers (threads or tasks)") -> Figure:
    """Throughput and CPU per transaction of each driver, two panels side by side.

    Left: transactions per second against concurrency, one line per client, the median
    of the rounds with its interquartile range as error bars. Right: this process's CPU
    time per transaction (µs), bars grouped by concurrency: what the driver and its
    SQLAlchemy dialect cost, far less disturbed than throughput by other processes.

    Args:
        rows: ``labkit.lab.bench.summarize`` rows of one workload: ``client``,
            ``concurrency``, ``tps``, ``tps_q1``, ``tps_q3``, ``cpu_us_per_tx``.
        title: The question the chart answers.
        xlabel: Label of the concurrency axis.

    Returns:
        The figure: ``axes[0]`` throughput, ``axes[1]`` CPU per transaction.
    """
    clients = list(dict.fromkeys(str(r["client"]) for r in rows))
    levels = sorted({int(r["concurrency"]) for r in rows})
    cell = {(str(r["client"]), int(r["concurrency"])): r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH, 4.6))
    for i, client in enumerate(clients):
        got = [cell[(client, n)] for n in levels if (client, n) in cell]
        xs = [int(r["concurrency"]) for r in got]
        mids = [float(r["tps"]) for r in got]
        low = [m - float(r.get("tps_q1", m)) for m, r in zip(mids, got)]
        high = [float(r.get("tps_q3", m)) - m for m, r in zip(mids, got)]
        left.errorbar(xs, mids, yerr=[low, high], color=_CYCLE[i % len(_CYCLE)],
                      marker=_MARKERS[i % len(_MARKERS)], markersize=7, capsize=3,
                      linewidth=2.0, linestyle="-" if "async" not in client else ":",
                      label=client, zorder=2 + i)
    left.set_xticks(levels)
    left.set_xlim(0, max(levels) * 1.08 + 0.5)
    left.set_ylim(bottom=0, top=max([float(r.get("tps_q3", r["tps"])) for r in rows]) * 1.15)
    left.set_ylabel("transactions per second")
    left.set_xlabel(xlabel)
    width = 0.8 / max(len(clients), 1)
    for i, client in enumerate(clients):
        positions = [j + (i - (len(clients) - 1) / 2) * width for j in range(len(levels))]
        values = [float(cell[(client, n)]["cpu_us_per_tx"] or 0.0) if (client, n) in cell
                  else 0.0 for n in levels]
        right.bar(positions, values, width * 0.92, color=_CYCLE[i % len(_CYCLE)],
                  hatch="//" if "async" in client else None, edgecolor="white")
    right.set_xticks(range(len(levels)), [str(n) for n in levels])
    right.set_xlabel(xlabel.split(" (")[0])
    right.set_ylabel("CPU time of this process\nper transaction (µs)")
    right.grid(False, axis="x")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        _plain_axis(ax, "y")
        ax.tick_params(which="both", labelsize=SMALL_PT)
    handles, names = left.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, frameon=False)
    _title(fig, title)
    plt.close(fig)
    return fig


@_styled
def pool_fairness_chart(results: Mapping[str, LoadResult], *, title: str,
                        xlabel: str = "time since the run started (s)") -> Figure:
    """Who waits? Two (or more) load runs side by side, one lane per worker in each.

    Each request is an orange bar while it waits for a connection and a blue bar while
    it holds one (as in ``request_timeline``); beside each lane, how many requests that
    worker completed. A pool that serves waiters in order gives every worker about the
    same count; one that does not lets a few workers take nearly every connection.

    Args:
        results: ``{pool: LoadResult}``, runs of the same workers and work.
        title: The question the chart answers.
        xlabel: Label of the time axes.

    Returns:
        The figure, one axes per run.
    """
    names = list(results)
    lanes = max(r.workers for r in results.values())
    fig, axes = plt.subplots(1, len(names), sharey=True, squeeze=False,
                             figsize=(WIDTH, 2.2 + 0.34 * lanes))
    bar = 0.64
    for ax, name in zip(axes[0], names):
        result = results[name]
        end_time = max([result.elapsed] + [op.end for op in result.ops])
        for worker in range(result.workers):
            y = lanes - worker
            ops = [op for op in result.ops if op.worker == worker]
            waits = [(op.start, op.got - op.start) for op in ops if op.got is not None]
            uses = [(op.got, (op.released if op.released is not None else op.end) - op.got)
                    for op in ops if op.got is not None]
            ax.broken_barh(waits, (y - bar / 2, bar), facecolors=COLORS["waiting"],
                           edgecolor="white", linewidth=0.3)
            ax.broken_barh(uses, (y - bar / 2, bar), facecolors=COLORS["using"],
                           edgecolor="white", linewidth=0.3)
            failed = [op.end for op in ops if not op.ok]
            if failed:
                ax.plot(failed, [y] * len(failed), linestyle="", marker="X", markersize=8,
                        color=COLORS["failed"], zorder=4)
            ax.annotate(str(sum(op.ok for op in ops)), (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(4, 0), textcoords="offset points", ha="left", va="center",
                        fontsize=SMALL_PT)
        ax.set_title(_wrap(name, 36), fontsize=SMALL_PT + 1, loc="left")
        ax.set_xlim(0, end_time * 1.01)
        ax.grid(False, axis="y")
        ax.set_xlabel(xlabel if len(names) == 1 else _wrap(xlabel, 24))
        _plain_axis(ax, "x")
        ax.tick_params(which="both", labelsize=SMALL_PT)
    first = axes[0][0]
    first.set_ylim(0.4, lanes + 0.6)
    first.set_yticks(range(lanes, 0, -1), [str(i + 1) for i in range(lanes)])
    first.set_ylabel("worker (requests served at the right)")
    handles = [Patch(facecolor=COLORS["waiting"], label="waiting for a connection"),
               Patch(facecolor=COLORS["using"], label="using it")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)
    _title(fig, title)
    plt.close(fig)
    return fig


# -- the fleet simulator (notebook 12) -----------------------------------------------------


@_styled
def fleet_chart(times: Sequence[float], top: Mapping[str, Sequence[float]],
                bottom: Mapping[str, Sequence[float]], *, title: str, top_label: str,
                bottom_label: str, hlines: Mapping[str, float] | None = None,
                windows: Sequence[tuple[float, float, str]] | None = None,
                xlabel: str = "simulated time (s)") -> Figure:
    """Two panels over a simulation's time, one above the other, sharing the time axis.

    Typically connection attempts (or failures) per second above, and server connections
    below with the usable slots as a dashed limit (``hlines``, drawn on the lower panel);
    fault windows shaded on both.

    Args:
        times: Start of each time bin, in seconds (values beyond the last are not drawn).
        top: ``{name: values per bin}`` for the upper panel.
        bottom: ``{name: values per bin}`` for the lower panel.
        title: The question the chart answers.
        top_label: y label of the upper panel, with its unit.
        bottom_label: y label of the lower panel, with its unit.
        hlines: Limits on the lower panel, ``{"usable slots = 497": 497}``.
        windows: Fault windows ``[(start, end, "server down")]``.
        xlabel: Label of the shared time axis.

    Returns:
        The figure.
    """
    fig, (upper, lower) = plt.subplots(2, 1, sharex=True, figsize=(WIDTH, 6.4))
    for ax, series, label in ((upper, top, top_label), (lower, bottom, bottom_label)):
        values: list[float] = []
        for i, (name, ys) in enumerate(series.items()):
            n = min(len(times), len(ys))     # times may leave out the last bins
            ys = [float(v) for v in ys[:n]]
            values += ys
            ax.plot(list(times)[:n], ys, label=name, linewidth=max(1.2, 2.6 - 0.35 * i),
                    color=_CYCLE[i % len(_CYCLE)], zorder=2 + i)
        if ax is lower:
            _hlines(ax, hlines)
            values += list((hlines or {}).values())
        _windows(ax, windows, label=ax is upper)
        _from_zero(ax, values)
        ax.set_ylabel(_wrap(label, 30))
        _plain_axis(ax, "y")
        ax.tick_params(which="both", labelsize=SMALL_PT)
        if series:
            ax.legend(loc="best")
    lower.set_xlabel(xlabel)
    _plain_axis(lower, "x")
    _title(fig, title)
    plt.close(fig)
    return fig
