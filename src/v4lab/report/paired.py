"""Paired statistics of the reports: rows compared with seed as a block, and KV caches
compared answer by answer on the same weights (an exact McNemar test pooled over seeds).

They sit with the reports rather than in :mod:`v4lab.stats` because training reads
v4lab.stats (a probe run's own McNemar test) and every training stage of dvc.yaml depends
on it: a statistic only the reports use lives here, so that changing it re-runs the
reports, not the 184 trainings. :func:`blocked_comparisons` returns the same
:class:`v4lab.stats.Comparison` as :func:`v4lab.stats.pooled_comparisons`, so the table's
Holm correction, TOST and MDE apply to it unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from v4lab.stats import ALPHA, ROUND_OFF, Comparison, clopper_pearson, holm

CACHE_ACC = re.compile(r"probe/kv_([a-z0-9]+)/acc")  # a cache's accuracy on the run's own answers


def blocked_comparisons(groups: Mapping[str, Sequence[float] | np.ndarray], reference: str,
                        level: float = 0.95) -> tuple[dict[str, Comparison], float, int]:
    """Every row against ``groups[reference]`` with seed as a block; also the residual SD
    and its degrees of freedom (for the rows' minimum detectable effect).

    ``groups[row][i]`` is seed i's value (every row lists the same seeds in the same order).
    The model is two-way additive, y[row, seed] = mu + row + seed + e: a seed that is hard
    for one row is hard for all (same training sequences, same held-out queries), and that
    shared part is removed. The residual variance s^2 = SS_resid / ((rows-1)(seeds-1)) is
    pooled over all rows; Δ = the difference of the row means (= the mean of the seed-wise
    differences) with se = s * sqrt(2 / seeds). With two rows this is the paired t-test; in
    general it equals OLS ``y ~ C(row) + C(seed)`` with the reference as baseline level.
    """
    if reference not in groups:
        raise KeyError(f"reference {reference!r} is not one of the groups {list(groups)}")
    names = list(groups)
    sizes = [np.size(groups[g]) for g in names]
    if len(names) < 2 or len(set(sizes)) != 1 or sizes[0] < 2:
        raise ValueError(f"blocked_comparisons: need >= 2 rows of the same >= 2 seeds; got "
                         f"{dict(zip(names, sizes, strict=True))} values per row")
    y = np.array([np.asarray(groups[g], dtype=float) for g in names])
    if not np.isfinite(y).all():
        raise ValueError("blocked_comparisons: values must be finite")
    n, df = sizes[0], (len(names) - 1) * (sizes[0] - 1)
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    s = math.sqrt(float((resid ** 2).sum()) / df)
    se = s * math.sqrt(2 / n)
    scale = max(float(np.abs(y).max()), 1.0)
    tq = float(stats.t.ppf((1 + level) / 2, df))
    ref = y[names.index(reference)]
    out = {}
    for name, row in zip(names, y, strict=True):
        if name == reference:
            continue
        delta = float(row.mean() - ref.mean())
        if s <= ROUND_OFF * scale:  # the rows differ by a constant: exactly equal or not
            p = 1.0 if abs(delta) <= ROUND_OFF * scale else 0.0
            out[name] = Comparison(name, reference, delta, delta, delta, p, 0.0, df, n, n)
            continue
        p = float(2 * stats.t.sf(abs(delta) / se, df))
        out[name] = Comparison(name, reference, delta, delta - tq * se, delta + tq * se, p, se, df, n, n)
    return out, s, df


def discordant_counts(n: float, acc_own: float, acc: float, discordant: float) -> tuple[int, int]:
    """(n10, n01) of one run: answers this cache got right and the run's own cache wrong,
    and the reverse, from what the run records (n answers, both accuracies, n10 + n01):
    n01 - n10 = n (acc_own - acc)."""
    d, m = round(n * (acc_own - acc)), round(discordant)
    if abs(d) > m or (m + d) % 2:
        raise ValueError(f"discordant_counts: accuracies {acc_own} and {acc} on {n} answers "
                         f"cannot come with {discordant} discordant answers")
    return (m - d) // 2, (m + d) // 2


def mcnemar_p(n10: int, n01: int) -> float:
    """Exact two-sided McNemar p: n10 ~ Binomial(n10 + n01, 1/2) under equal accuracy."""
    m = n10 + n01
    return 1.0 if m == 0 else float(stats.binomtest(n10, m, 0.5).pvalue)


def paired_delta_interval(n10: int, n01: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """An interval of Δ = p10 - p01 (the accuracy difference of two classifiers on the same
    n items) that holds with probability >= ``level`` and does not collapse when no answer
    is discordant: exact Clopper-Pearson intervals of the two discordant rates, each at
    level 1 - (1 - level) / 2 (Bonferroni), subtracted end to end. 0 of 5,120 discordant
    gives about ±0.0009 at 95%."""
    each = 1 - (1 - level) / 2
    lo10, hi10 = clopper_pearson(n10, n, each)
    lo01, hi01 = clopper_pearson(n01, n, each)
    return lo10 - hi01, hi10 - lo01


@dataclass(frozen=True)
class CachePair:
    """One cache against the run's own cache, every seed's answers pooled (same weights)."""

    row: str
    cache: str
    n: int
    n10: int  # this cache right, the own cache wrong
    n01: int  # the own cache right, this cache wrong
    acc_own: float
    acc: float
    p: float  # exact McNemar on the pooled discordant answers
    p_holm: float
    lo: float  # 95% interval of delta
    hi: float
    margin: float | None  # equivalence margin (manifest ``equivalence`` of the cache's metric)
    eq_lo: float  # 90% interval: inside (-margin, margin) = equivalent (TOST at 0.05)
    eq_hi: float

    @property
    def delta(self) -> float:
        return (self.n10 - self.n01) / self.n

    @property
    def equivalent(self) -> bool | None:
        return None if self.margin is None else -self.margin < self.eq_lo and self.eq_hi < self.margin


def cache_pairs(rows: Mapping[str, list[dict[str, Any]]], own: str,
                margins: Mapping[str, float]) -> list[CachePair]:
    """Every (row, cache) whose runs record ``probe/kv_<cache>/acc`` and ``.../discordant``
    next to the own cache's accuracy ``own`` (``probe/acc@<L>``) and its answer count;
    the counts pooled over the row's seeds (a stratified McNemar: under equal accuracy each
    seed's discordant answers split evenly), Holm-corrected over all pairs."""
    answers = own.replace("/acc@", "/answers@")
    found = []
    for row, records in rows.items():
        caches = sorted({m.group(1) for r in records for k in r if (m := CACHE_ACC.fullmatch(k))})
        for cache in caches:
            n = n10 = n01 = 0
            for r in records:
                a, b = discordant_counts(r[answers], r[own], r[f"probe/kv_{cache}/acc"],
                                         r[f"probe/kv_{cache}/discordant"])
                n, n10, n01 = n + int(r[answers]), n10 + a, n01 + b
            found.append((row, cache, n, n10, n01, margins.get(f"probe/kv_{cache}/acc")))
    p = [mcnemar_p(a, b) for _, _, _, a, b, _ in found]
    p_holm = holm(p) if found else []
    out = []
    for (row, cache, n, n10, n01, margin), pi, ph in zip(found, p, p_holm, strict=True):
        acc_own = sum(round(r[own] * r[answers]) for r in rows[row]) / n
        out.append(CachePair(row, cache, n, n10, n01, acc_own, acc_own + (n10 - n01) / n,
                             pi, float(ph), *paired_delta_interval(n10, n01, n),
                             margin, *paired_delta_interval(n10, n01, n, 1 - 2 * ALPHA)))
    return out
