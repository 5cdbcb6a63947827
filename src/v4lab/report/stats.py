"""The report's statistics: Student-t confidence intervals and Welch's t-test over seeds."""

from __future__ import annotations

import math
from typing import Any

ALPHA = 0.05  # two-sided: 95% confidence intervals, "significant" means p < ALPHA


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def constant(values: list[float]) -> bool:
    """No spread beyond round-off (relative 1e-9)."""
    return max(values) - min(values) <= 1e-9 * max(abs(v) for v in values)


def mean_ci(values: list[float], alpha: float = ALPHA) -> tuple[float, float]:
    """(mean, half-width of the two-sided 1-alpha Student-t interval); nan width for n < 2."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    if constant(values):  # a deterministic figure; round-off is not an interval
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test of mean(a) = mean(b); nan if either n < 2.

    Two groups without variance (deterministic figures such as parameter counts; spread
    below 1e-9 of the values counts as round-off) are either equal (p = 1) or differ
    exactly (p = 0).
    """
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return math.nan
    if constant(a) and constant(b):
        return 1.0 if math.isclose(sum(a) / len(a), sum(b) / len(b), rel_tol=1e-9) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)
