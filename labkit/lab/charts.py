"""Chart helpers: titled figures with labelled axes (units included) and legends.

Each helper returns the ``Figure`` so a notebook cell shows it and a test can inspect
it. matplotlib is imported here only, never by the core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["bar_chart", "box_chart", "duration_chart", "line_chart", "outcome_chart", "step_chart"]

_SIZE = (8.0, 4.0)


def _finish(fig: Figure, ax: plt.Axes, title: str, xlabel: str, ylabel: str,
            legend: bool = True) -> Figure:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    plt.close(fig)  # the notebook shows the returned figure once, not twice
    return fig


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None) -> Figure:
    """Plot named ``(x, y)`` series as lines; ``hlines`` draws labelled limits."""
    fig, ax = plt.subplots(figsize=_SIZE)
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    for name, value in (hlines or {}).items():
        ax.axhline(value, linestyle="--", color="grey", linewidth=1)
        ax.annotate(name, (0, value), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(4, 3), fontsize="small", color="grey")
    return _finish(fig, ax, title, xlabel, ylabel)


def step_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None) -> Figure:
    """Like ``line_chart``, drawn as steps (for counts sampled over time)."""
    fig, ax = plt.subplots(figsize=_SIZE)
    for name, (x, y) in series.items():
        ax.step(x, y, where="post", label=name)
    for name, value in (hlines or {}).items():
        ax.axhline(value, linestyle="--", color="grey", linewidth=1)
        ax.annotate(name, (0, value), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(4, 3), fontsize="small", color="grey")
    return _finish(fig, ax, title, xlabel, ylabel)


def bar_chart(values: Mapping[str, float] | Mapping[str, Mapping[str, float]], *, title: str,
              xlabel: str = "", ylabel: str, log: bool = False, annotate: bool = True) -> Figure:
    """Bars for ``{label: value}``, or grouped bars for ``{group: {series: value}}``."""
    fig, ax = plt.subplots(figsize=_SIZE)
    labels = list(values)
    first = next(iter(values.values()), None)
    if isinstance(first, Mapping):
        names = list(first)
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
            ys = [values[label][name] for label in labels]  # type: ignore[index]
            bars = ax.bar(xs, ys, width=width, label=name)
            if annotate:
                ax.bar_label(bars, fmt="%.3g", fontsize="small")
        ax.set_xticks(range(len(labels)), labels)
    else:
        bars = ax.bar(labels, [float(v) for v in values.values()])  # type: ignore[arg-type]
        if annotate:
            ax.bar_label(bars, fmt="%.3g", fontsize="small")
    if log:
        ax.set_yscale("log")
    return _finish(fig, ax, title, xlabel, ylabel)


def box_chart(groups: Mapping[str, Sequence[float]], *, title: str, xlabel: str = "",
              ylabel: str, log: bool = False) -> Figure:
    """Box plots of distributions (whiskers 1st-99th percentile), one per group."""
    fig, ax = plt.subplots(figsize=_SIZE)
    ax.boxplot([list(v) for v in groups.values()], whis=(1, 99), showfliers=False)
    ax.set_xticks(range(1, len(groups) + 1), list(groups))
    if log:
        ax.set_yscale("symlog", linthresh=0.1)
    return _finish(fig, ax, title, xlabel, ylabel, legend=False)


def duration_chart(values: Mapping[str, float], *, title: str, xlabel: str,
                   notes: Mapping[str, str] | None = None,
                   colors: Mapping[str, str] | None = None,
                   limit: tuple[str, float] | None = None,
                   cap: float | None = None) -> Figure:
    """Horizontal bars, one per case, each labelled with its value and a note.

    For "how long until X" comparisons: ``notes`` writes the outcome beside each bar
    (e.g. ``"QueryTimeoutError"``); ``limit`` draws a labelled vertical line (e.g. the
    configured timeout); bars that reached ``cap`` are drawn hatched in grey, so "still
    waiting when we stopped looking" never reads as a measured failure time.
    """
    labels = list(values)
    fig, ax = plt.subplots(figsize=(_SIZE[0], 0.9 + 0.5 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        value = float(values[label])
        capped = cap is not None and value >= cap
        color = "lightgrey" if capped else (colors or {}).get(label, "tab:blue")
        ax.barh(y, value, color=color, hatch="//" if capped else None,
                edgecolor="grey" if capped else color, height=0.6)
        note = (notes or {}).get(label, "")
        text = f"still waiting at {cap:g} s (we stopped looking)" if capped else (
            f"{_fmt_seconds(value)}  {note}".rstrip())
        ax.annotate(text, (value, y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize="small")
    ax.set_yticks(ys, labels)
    if limit is not None:
        name, at = limit
        ax.axvline(at, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(name, (at, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                    textcoords="offset points", color="tab:red", fontsize="small")
    right = max([float(v) for v in values.values()] + [limit[1] if limit else 0.0])
    reached_cap = cap is not None and any(float(v) >= cap for v in values.values())
    ax.set_xlim(0, right * (2.0 if reached_cap else 1.6) if right > 0 else 1)  # room for labels
    ax.grid(True, axis="x", alpha=0.3)
    return _finish(fig, ax, title, xlabel, "", legend=False)


def _fmt_seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def outcome_chart(rows: Mapping[str, Sequence[str | None]], *, title: str,
                  xlabel: str = "request number") -> Figure:
    """One row of markers per case: a green dot for success, a red cross for a failure.

    ``rows`` maps a case to its outcomes in order (``None``: succeeded, else the error
    name, written beside the first failure of a row).
    """
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(_SIZE[0], 0.9 + 0.55 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    for y, label in zip(ys, labels):
        outcomes = list(rows[label])
        xs = list(range(1, len(outcomes) + 1))
        ok = [x for x, o in zip(xs, outcomes) if o is None]
        bad = [(x, o) for x, o in zip(xs, outcomes) if o is not None]
        ax.scatter(ok, [y] * len(ok), marker="o", s=80, color="tab:green",
                   label="succeeded" if y == ys[0] else None)
        ax.scatter([x for x, _ in bad], [y] * len(bad), marker="X", s=110, color="tab:red",
                   label="failed" if y == ys[0] else None)
        if bad:
            ax.annotate(bad[0][1], (bad[0][0], y), xytext=(0, 9), textcoords="offset points",
                        ha="center", fontsize="small", color="tab:red")
    longest = max((len(v) for v in rows.values()), default=1)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_yticks(ys, labels)
    ax.set_ylim(-0.7, len(labels) - 0.1)
    ax.grid(True, axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", color="tab:green", linestyle="", label="succeeded"),
               plt.Line2D([], [], marker="X", color="tab:red", linestyle="", label="failed")]
    ax.legend(handles=handles, loc="upper right", fontsize="small", ncol=2,
              bbox_to_anchor=(1.0, 1.0))
    return _finish(fig, ax, title, xlabel, "", legend=False)
