"""Statistics of the lab: one percentile, one median, one interval for a median.

Every number the lab prints about a distribution comes from here, so that a load run's
p99 (``labkit.lab.load``), an open-loop run's (``labkit.lab.arrivals``), a benchmark's
(``labkit.lab.bench``) and a chart's box are the same statistic of the same values.

The percentile is the **linear interpolation between the closest ranks**: sort the
``n`` values, go to position ``q / 100 * (n - 1)`` (from 0) and interpolate between the
two values around it. It is numpy's and pandas' default (``method="linear"``, Hyndman
and Fan's type 7) and ``statistics.quantiles(..., method="inclusive")``; its 50th
percentile is the median that ``statistics.median`` returns, its 0th and 100th the
minimum and maximum. On a few values it can fall between two measurements: the p99 of
``[1, 2, ..., 10]`` is 9.91.

Example:
    ```python
    percentile([15, 20, 35, 40, 50], 40)      # 29.0: 60 % of the way from 20 to 35
    median([4, 1, 3, 2])                      # 2.5
    median_interval(ratios, 0.95)             # (low, high, coverage reached)
    ```
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["median", "median_interval", "percentile"]


def percentile(values: Iterable[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) of ``values``, interpolating linearly.

    The definition is the module's (numpy's default): position ``q / 100 * (n - 1)``
    in the sorted values, between the two values around it.

    Args:
        values: The measurements, in any order (any iterable, read once).
        q: The percentile, from 0 (the minimum) to 100 (the maximum).

    Returns:
        The percentile; NaN when there are no values.

    Raises:
        ValueError: ``q`` is outside 0-100.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be between 0 and 100, got {q!r}")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q / 100.0 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    """Return the median of ``values``: their 50th ``percentile``; NaN when empty."""
    return percentile(values, 50.0)


def median_interval(values: Iterable[float], confidence: float = 0.95
                    ) -> tuple[float, float, float]:
    """Return a distribution-free interval for the median of ``values``, and its coverage.

    The interval runs from the k-th smallest to the k-th largest value, with the largest
    k whose coverage, ``1 - 2 * P(Binomial(n, 1/2) < k)``, is still at least
    ``confidence`` (the sign-test interval). It assumes only independent draws from one
    distribution, not a normal one. With too few values for the coverage asked (fewer
    than 6 for 95 %), it is the minimum to the maximum and the coverage returned is lower
    than asked.

    Returns:
        ``(low, high, coverage)``; ``(nan, nan, 0.0)`` for no values.

    Example:
        ```python
        median_interval([0.97, 1.01, 0.99, 1.04, 0.98, 1.00, 1.02, 0.96], 0.95)
        # (0.96, 1.04, 0.9922): with 8 values only the minimum to the maximum reaches 95 %
        ```
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan, math.nan, 0.0

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)
