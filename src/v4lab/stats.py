"""Statistics for the study tables: intervals, pooled comparisons, corrections, power.

Pure functions of numbers (floats and numpy arrays), built on scipy only; the tests check
each one against statsmodels on fixed numbers. Conventions: two-sided tests at
``alpha = 0.05`` unless told; a difference is always ``arm - reference``.

    mean_ci              mean with a Student-t interval over seeds
    pooled_comparisons   each arm against one reference row, variance pooled over all arms
    holm, dunnett        multiplicity corrections inside a study
    tost                 equivalence within a stated margin ("matches", "lossless")
    clopper_pearson      exact interval for an accuracy k/n (0/12 -> [0, 0.265])
    mde                  minimum detectable effect at a given power (noncentral t, exact)
    mcnemar_exact        paired binary outcomes: two caches on the same weights and queries
    welch_p              two-sided Welch t-test of two groups (today's tables)

Deterministic figures (parameter counts, a value that every seed reproduces) have no
spread; a spread below ``1e-9`` of the values counts as round-off, so such groups compare
as exactly equal (p = 1) or exactly different (p = 0) instead of dividing by zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
ROUND_OFF = 1e-9  # relative spread below which a group counts as constant


def is_number(v: object) -> bool:
    """A table cell that is a number (bools are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def constant(values: Sequence[float] | np.ndarray) -> bool:
    """No spread beyond round-off (relative ``ROUND_OFF``): a deterministic figure."""
    a = _array(values, "constant")
    return float(np.ptp(a)) <= ROUND_OFF * _scale(a)


def _array(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: values must be finite, got {a.tolist()}")
    return a


def _scale(*groups: np.ndarray) -> float:
    """Magnitude of the values, for the round-off threshold."""
    return max(float(np.max(np.abs(g))) for g in groups)


@dataclass(frozen=True)
class MeanCI:
    """Mean of n values with its two-sided ``level`` Student-t interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    sd: float  # sample SD (ddof 1); nan for n = 1
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def mean_ci(x: Sequence[float] | np.ndarray, level: float = 0.95) -> MeanCI:
    """Mean with the t interval ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``.

    n = 1 has no interval (lo = hi = nan); constant values (spread within round-off) have
    a zero-width interval.
    """
    a = _array(x, "mean_ci")
    n, mean = a.size, float(a.mean())
    if n < 2:
        return MeanCI(mean, math.nan, math.nan, math.nan, 1)
    sd = float(a.std(ddof=1))
    if float(np.ptp(a)) <= ROUND_OFF * _scale(a):
        return MeanCI(mean, mean, mean, 0.0, n)
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, sd, n)


@dataclass(frozen=True)
class Comparison:
    """``arm - reference`` with a pooled-variance t test.

    se: standard error of delta; df: residual degrees of freedom (N - k over the whole
    study); [lo, hi]: two-sided ``level`` interval of delta; p: two-sided p of delta = 0.
    """

    arm: str
    reference: str
    delta: float
    lo: float
    hi: float
    p: float
    se: float
    df: int
    n_arm: int
    n_ref: int

    @property
    def t(self) -> float:
        return self.delta / self.se if self.se > 0 else math.copysign(math.inf, self.delta)


def pooled_sd(groups: Mapping[str, Sequence[float] | np.ndarray]) -> tuple[float, int]:
    """(pooled SD, df): sqrt of the within-group sum of squares over ``N - k``."""
    arrays = [_array(v, f"group {k!r}") for k, v in groups.items()]
    df = sum(a.size for a in arrays) - len(arrays)
    if df < 1:
        raise ValueError(f"pooled_sd: {len(arrays)} groups of {[a.size for a in arrays]} values "
                         "leave no degrees of freedom (need N - k >= 1)")
    ss = sum(float(((a - a.mean()) ** 2).sum()) for a in arrays)
    return math.sqrt(ss / df), df


def pooled_comparisons(groups: Mapping[str, Sequence[float] | np.ndarray], reference: str,
                       level: float = 0.95) -> dict[str, Comparison]:
    """Every arm of a study against ``groups[reference]``, one pooled variance for all.

    The variance is pooled over *all* groups (s^2 = within-group SS / (N - k)), as in a
    one-way ANOVA: with few seeds per arm this borrows strength from the other arms
    (df = N - k instead of n_arm + n_ref - 2), assuming the arms share one seed variance.
    Equals ordinary least squares with the reference as the baseline level.
    """
    if reference not in groups:
        raise KeyError(f"reference {reference!r} is not one of the groups {list(groups)}")
    arrays = {k: _array(v, f"group {k!r}") for k, v in groups.items()}
    s, df = pooled_sd(arrays)
    ref = arrays[reference]
    scale = _scale(*arrays.values())
    tq = float(stats.t.ppf((1 + level) / 2, df))
    out = {}
    for name, a in arrays.items():
        if name == reference:
            continue
        delta = float(a.mean() - ref.mean())
        se = s * math.sqrt(1 / a.size + 1 / ref.size)
        if s <= ROUND_OFF * scale:  # every group constant: exactly equal or exactly different
            p = 1.0 if abs(delta) <= ROUND_OFF * scale else 0.0
            out[name] = Comparison(name, reference, delta, delta, delta, p, 0.0, df, a.size, ref.size)
            continue
        p = float(2 * stats.t.sf(abs(delta) / se, df))
        out[name] = Comparison(name, reference, delta, delta - tq * se, delta + tq * se, p, se, df,
                               a.size, ref.size)
    return out


def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given; nan stays nan, not counted).

    Sorted ascending, p_(i) is multiplied by (m - i) for i = 0..m-1, then made
    non-decreasing by a running maximum and capped at 1. Reject where adjusted p < alpha:
    controls the family-wise error rate under any dependence.
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(q[order] * (m - np.arange(m))))
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def dunnett(groups: Mapping[str, Sequence[float] | np.ndarray], reference: str,
            seed: int = 0) -> dict[str, float]:
    """Dunnett's many-to-one adjusted p-values (scipy.stats.dunnett), per arm.

    Same pooled variance and t statistics as :func:`pooled_comparisons`, but adjusted for
    the correlation of comparisons that share the reference (less conservative than Holm
    for its first step). scipy integrates the multivariate t by quasi-Monte Carlo, hence
    the seed; its p-values are accurate to about 1e-3.
    """
    arms = [k for k in groups if k != reference]
    if reference not in groups or not arms:
        raise KeyError(f"reference {reference!r} must be one of >= 2 groups {list(groups)}")
    res = stats.dunnett(*[_array(groups[k], k) for k in arms],
                        control=_array(groups[reference], reference),
                        random_state=np.random.default_rng(seed))
    return {k: float(p) for k, p in zip(arms, res.pvalue)}


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided tests of |delta| < margin.

    p: the larger of the two one-sided p-values; equivalent: p < alpha, i.e. the
    two-sided (1 - 2 alpha) interval [lo, hi] lies inside (-margin, margin).
    """

    margin: float
    p: float
    p_lower: float  # H0: delta <= -margin
    p_upper: float  # H0: delta >= +margin
    lo: float
    hi: float
    alpha: float

    @property
    def equivalent(self) -> bool:
        return self.p < self.alpha

    @property
    def verdict(self) -> str:
        return (f"equivalent within +-{self.margin:g}" if self.equivalent
                else f"not shown equivalent within +-{self.margin:g}")


def tost(c: Comparison, margin: float, alpha: float = ALPHA) -> Equivalence:
    """TOST equivalence test of a :class:`Comparison` (same pooled se and df) at ``margin``."""
    if not margin > 0:
        raise ValueError(f"tost: margin={margin!r} must be > 0")
    if c.se == 0:  # deterministic figures: the difference is known exactly
        inside = abs(c.delta) < margin
        p_lo = 0.0 if c.delta > -margin else 1.0
        p_up = 0.0 if c.delta < margin else 1.0
        return Equivalence(margin, 0.0 if inside else 1.0, p_lo, p_up, c.delta, c.delta, alpha)
    p_lo = float(stats.t.sf((c.delta + margin) / c.se, c.df))
    p_up = float(stats.t.cdf((c.delta - margin) / c.se, c.df))
    tq = float(stats.t.ppf(1 - alpha, c.df))
    return Equivalence(margin, max(p_lo, p_up), p_lo, p_up, c.delta - tq * c.se,
                       c.delta + tq * c.se, alpha)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion from k successes in n trials.

    Beta quantiles: lo = B((1-level)/2; k, n-k+1), hi = B((1+level)/2; k+1, n-k); lo = 0
    at k = 0 and hi = 1 at k = n. So 0/12 gives [0, 1 - 0.025**(1/12)] = [0, 0.2646]:
    an accuracy of zero on 12 examples does not rule out 26%.
    """
    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer)) and 0 <= k <= n
            and n >= 1):
        raise ValueError(f"clopper_pearson: need integers 0 <= k <= n, n >= 1; got k={k!r}, n={n!r}")
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def power(effect: float, sd: float, n: int, n_ref: int | None = None, df: int | None = None,
          alpha: float = ALPHA) -> float:
    """Power of the two-sided pooled t test to detect a true difference ``effect``.

    Noncentral t with ncp = effect / (sd * sqrt(1/n + 1/n_ref)); both rejection tails count
    (as in statsmodels' TTestIndPower). df defaults to n + n_ref - 2 (a two-arm test); pass
    the study's N - k when the variance is pooled over more arms.
    """
    n_ref = n if n_ref is None else n_ref
    df = n + n_ref - 2 if df is None else df
    if n < 1 or n_ref < 1 or df < 1 or not sd > 0:
        raise ValueError(f"power: need n, n_ref, df >= 1 and sd > 0; got n={n}, n_ref={n_ref}, "
                         f"df={df}, sd={sd}")
    ncp = effect / (sd * math.sqrt(1 / n + 1 / n_ref))
    c = float(stats.t.ppf(1 - alpha / 2, df))
    # P(T > c) + P(T < -c), the second as P(-T > c) with -T ~ nct(df, -ncp): scipy's
    # nct.cdf returns nan far in the tail, its sf there underflows cleanly to 0
    return float(stats.nct.sf(c, df, ncp) + stats.nct.sf(c, df, -ncp))


def mde(sd: float, n: int, n_ref: int | None = None, df: int | None = None, alpha: float = ALPHA,
        target: float = 0.8) -> float:
    """Minimum detectable effect: the difference the two-sided pooled t test finds with
    probability ``target`` (80%) at ``alpha`` (0.05), given the pooled ``sd``.

    Exact: solves :func:`power` (noncentral t) = target for the effect. The familiar
    approximation (t_{1-alpha/2,df} + t_{target,df}) * sd * sqrt(1/n + 1/n_ref) is 1.2% low
    at 3 seeds per arm and within 0.2% from 5 (see :func:`mde_approx`). E.g. sd 0.051, 3 seeds per arm: 0.16.
    """
    if not 0 < target < 1:
        raise ValueError(f"mde: target power {target!r} must be in (0, 1)")
    hi = 2 * mde_approx(sd, n, n_ref, df, alpha, target) + sd
    while power(hi, sd, n, n_ref, df, alpha) < target:
        hi *= 2
    return float(optimize.brentq(lambda e: power(e, sd, n, n_ref, df, alpha) - target, 0.0, hi,
                                 xtol=1e-12 * sd, rtol=1e-12))


def mde_approx(sd: float, n: int, n_ref: int | None = None, df: int | None = None,
               alpha: float = ALPHA, target: float = 0.8) -> float:
    """(t_{1-alpha/2,df} + t_{target,df}) * sd * sqrt(1/n + 1/n_ref): ignores the far tail
    and the noncentral shape: 5% below :func:`mde` at 2 per arm, 1.2% at 3, < 0.2% from 5."""
    n_ref = n if n_ref is None else n_ref
    df = n + n_ref - 2 if df is None else df
    if n < 1 or n_ref < 1 or df < 1 or not sd > 0:
        raise ValueError(f"mde: need n, n_ref, df >= 1 and sd > 0; got n={n}, n_ref={n_ref}, "
                         f"df={df}, sd={sd}")
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(target, df))
                 * sd * math.sqrt(1 / n + 1 / n_ref))


@dataclass(frozen=True)
class Paired:
    """Two classifiers on the same items. n10: a right, b wrong; n01: a wrong, b right."""

    n: int
    acc_a: float
    acc_b: float
    n10: int
    n01: int
    p: float  # exact two-sided McNemar p (binomial on the discordant pairs)

    @property
    def delta(self) -> float:
        return self.acc_b - self.acc_a


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> Paired:
    """Exact McNemar test of equal accuracy for paired binary outcomes.

    a[i], b[i]: whether variant a / b got item i right (e.g. two KV caches decoding the
    same weights on the same queries). Only the discordant items carry information: under
    H0 each is equally likely to favour a or b, so n10 ~ Binomial(n10 + n01, 1/2) and the
    p-value is min(1, 2 * P(X <= min(n10, n01))); p = 1 when no item is discordant.
    """
    x = np.asarray(a).ravel()
    y = np.asarray(b).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"mcnemar_exact: need two equally long non-empty outcome vectors, got "
                         f"{x.size} and {y.size}")
    for name, v in (("a", x), ("b", y)):
        if not np.isin(v, (0, 1)).all():
            raise ValueError(f"mcnemar_exact: {name} must hold booleans or 0/1")
    x, y = x.astype(bool), y.astype(bool)
    n10, n01 = int((x & ~y).sum()), int((~x & y).sum())
    m = n10 + n01
    p = 1.0 if m == 0 else min(1.0, float(2 * stats.binom.cdf(min(n10, n01), m, 0.5)))
    return Paired(x.size, float(x.mean()), float(y.mean()), n10, n01, p)


def welch_p(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test of mean(a) = mean(b); nan if either n < 2.

    Two groups without variance (deterministic figures such as parameter counts) are
    either equal (p = 1) or differ exactly (p = 0)."""
    a, b = _array(a, "welch_p a"), _array(b, "welch_p b")
    if a.size < 2 or b.size < 2:
        return math.nan
    if constant(a) and constant(b):
        return 1.0 if math.isclose(float(a.mean()), float(b.mean()), rel_tol=ROUND_OFF) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)
