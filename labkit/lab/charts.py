"""Chart helpers: titled figures with labelled axes (units included) and legends.

Each helper returns the ``Figure`` so a notebook cell shows it and a test can inspect
it. matplotlib is imported here only, never by the core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["bar_chart", "box_chart", "line_chart", "step_chart"]

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
    """Like :func:`line_chart`, drawn as steps (for counts sampled over time)."""
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
