"""v4lab.stats against statsmodels (an independent implementation) on fixed numbers, plus
hand-checked cases. Closed-form pieces agree to float64 round-off (rtol 1e-10); root-found
ones (MDE) to the root finders' tolerance (rtol 1e-6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from v4lab import stats

sm_stats = pytest.importorskip("statsmodels.stats")
from statsmodels.regression.linear_model import OLS  # noqa: E402
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402
from statsmodels.stats.multitest import multipletests  # noqa: E402
from statsmodels.stats.power import TTestIndPower  # noqa: E402
from statsmodels.stats.proportion import proportion_confint  # noqa: E402
from statsmodels.stats.weightstats import DescrStatsW, ttest_ind, ttost_ind  # noqa: E402

# a study: val/bpb of four arms over five seeds (fixed numbers, spread like the lab's)
STUDY = {
    "full": [1.912, 1.874, 1.951, 1.893, 1.925],
    "no_vvpa": [1.958, 1.902, 1.987, 1.941, 1.969],
    "no_engram": [1.921, 1.899, 1.940, 1.907, 1.915],
    "no_mtp": [1.890, 1.860, 1.934, 1.881, 1.902, 1.911],  # unequal n on purpose
}


def test_mean_ci_matches_statsmodels_and_hand():
    x = np.array(STUDY["full"])
    got = stats.mean_ci(x)
    lo, hi = DescrStatsW(x).tconfint_mean(alpha=0.05)
    assert got.mean == pytest.approx(x.mean(), rel=1e-12)
    assert (got.lo, got.hi) == pytest.approx((lo, hi), rel=1e-10)
    # by hand: [1, 2, 3] has mean 2, sd 1, t_{0.975, 2} = 4.302653 -> half-width 2.484138
    h = stats.mean_ci([1.0, 2.0, 3.0])
    assert (h.mean, h.sd) == (2.0, 1.0)
    assert h.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_mean_ci_edge_cases():
    one = stats.mean_ci([2.5])
    assert one.mean == 2.5 and math.isnan(one.lo) and math.isnan(one.hi)
    const = stats.mean_ci([1.25, 1.25, 1.25])  # a deterministic figure: no interval
    assert (const.lo, const.hi, const.sd) == (1.25, 1.25, 0.0)
    with pytest.raises(ValueError, match="no values"):
        stats.mean_ci([])


def test_pooled_two_groups_is_the_classic_t_test():
    a, b = STUDY["no_vvpa"], STUDY["full"]
    c = stats.pooled_comparisons({"full": b, "no_vvpa": a}, "full")["no_vvpa"]
    t, p, df = ttest_ind(a, b, usevar="pooled")
    assert c.df == df == 8
    assert c.t == pytest.approx(t, rel=1e-10)
    assert c.p == pytest.approx(p, rel=1e-10)
    assert c.p == pytest.approx(sps.ttest_ind(a, b, equal_var=True).pvalue, rel=1e-10)
    assert c.delta == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)


def test_pooled_comparisons_equal_ols_with_reference_baseline():
    """Pooled over all arms (df = N - k) is OLS on arm dummies with the reference left out."""
    names = list(STUDY)
    y = np.concatenate([STUDY[k] for k in names])
    labels = np.concatenate([[k] * len(STUDY[k]) for k in names])
    arms = [k for k in names if k != "full"]
    X = np.column_stack([np.ones(y.size)] + [(labels == k).astype(float) for k in arms])
    fit = OLS(y, X).fit()
    ci = fit.conf_int(alpha=0.05)
    got = stats.pooled_comparisons(STUDY, "full")
    assert set(got) == set(arms)
    for j, k in enumerate(arms, start=1):
        c = got[k]
        assert c.df == y.size - len(names) == fit.df_resid
        assert c.delta == pytest.approx(fit.params[j], rel=1e-10)
        assert c.se == pytest.approx(fit.bse[j], rel=1e-10)
        assert (c.lo, c.hi) == pytest.approx(tuple(ci[j]), rel=1e-10)
        assert c.p == pytest.approx(fit.pvalues[j], rel=1e-9)
    # pooling differs from a two-arm test: more df, another se (so the test can tell them apart)
    two = stats.pooled_comparisons({k: STUDY[k] for k in ("full", "no_vvpa")}, "full")["no_vvpa"]
    assert two.df == 8 and got["no_vvpa"].df == 17 and two.p != pytest.approx(got["no_vvpa"].p)


def test_pooled_constant_groups_and_errors():
    got = stats.pooled_comparisons({"a": [3.0, 3.0], "b": [3.0, 3.0], "c": [4.0, 4.0]}, "a")
    assert got["b"].p == 1.0 and got["c"].p == 0.0 and got["c"].delta == 1.0
    with pytest.raises(KeyError, match="reference"):
        stats.pooled_comparisons(STUDY, "baseline")
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.pooled_comparisons({"a": [1.0], "b": [2.0]}, "a")


def test_holm_matches_statsmodels_and_hand():
    p = np.array([0.012, 0.31, 0.0009, 0.049, 0.020, 0.7])
    want = multipletests(p, alpha=0.05, method="holm")[1]
    np.testing.assert_allclose(stats.holm(p), want, rtol=1e-12)
    # by hand: sorted 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> running max 0.06
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06], rtol=1e-12)
    out = stats.holm([0.5, np.nan, 0.01])  # nan is not a test and does not count in m
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.5, 0.02], rtol=1e-12)


def test_dunnett_between_raw_and_bonferroni():
    """Dunnett uses the same pooled t; its adjustment lies between none and Bonferroni."""
    raw = stats.pooled_comparisons(STUDY, "full")
    d = stats.dunnett(STUDY, "full", seed=0)
    res = sps.dunnett(*[np.array(STUDY[k]) for k in raw], control=np.array(STUDY["full"]),
                      random_state=np.random.default_rng(0))
    for (k, c), t in zip(raw.items(), res.statistic):
        assert c.t == pytest.approx(t, rel=1e-10)
        assert c.p <= d[k] + 1e-3 and d[k] <= min(1.0, 3 * c.p) + 1e-3  # qMC accuracy ~1e-3
    assert d == stats.dunnett(STUDY, "full", seed=0)  # seeded: reproducible


def test_tost_matches_statsmodels_ttost_ind():
    a, b = STUDY["no_engram"], STUDY["full"]
    c = stats.pooled_comparisons({"full": b, "no_engram": a}, "full")["no_engram"]
    for margin in (0.01, 0.03, 0.08):
        got = stats.tost(c, margin)
        p, (_, p1, _), (_, p2, _) = ttost_ind(a, b, -margin, margin, usevar="pooled")
        assert got.p == pytest.approx(p, rel=1e-9)
        assert (got.p_lower, got.p_upper) == pytest.approx((p1, p2), rel=1e-9)
        # the verdict is the 90% interval inside the margin
        assert got.equivalent == (-margin < got.lo and got.hi < margin)
    assert not stats.tost(c, 0.01).equivalent and stats.tost(c, 0.08).equivalent
    assert stats.tost(c, 0.08).verdict == "equivalent within +-0.08"
    with pytest.raises(ValueError, match="margin"):
        stats.tost(c, 0.0)


def test_clopper_pearson_matches_statsmodels_and_hand():
    for k, n in [(0, 12), (3, 12), (12, 12), (1, 1), (0, 1000), (937, 1000), (500, 1000)]:
        lo, hi = proportion_confint(k, n, alpha=0.05, method="beta")
        assert stats.clopper_pearson(k, n) == pytest.approx((lo, hi), rel=1e-10, abs=1e-15)
    # by hand: 0/12 -> upper 1 - 0.025**(1/12) = 0.26465; 12/12 mirrors it
    assert stats.clopper_pearson(0, 12) == pytest.approx((0.0, 1 - 0.025 ** (1 / 12)), rel=1e-12)
    assert stats.clopper_pearson(0, 12)[1] == pytest.approx(0.2646, abs=5e-5)
    assert stats.clopper_pearson(12, 12) == pytest.approx((0.025 ** (1 / 12), 1.0), rel=1e-12)
    for bad in [(-1, 5), (6, 5), (0, 0), (1.5, 5)]:
        with pytest.raises(ValueError, match="clopper_pearson"):
            stats.clopper_pearson(*bad)


def test_mde_matches_statsmodels_power_and_issue():
    sm = TTestIndPower()
    for sd, n in [(0.051, 3), (0.051, 5), (0.009, 5), (0.02, 10)]:
        d = sm.solve_power(nobs1=n, ratio=1.0, alpha=0.05, power=0.8)
        assert stats.mde(sd, n) == pytest.approx(d * sd, rel=1e-6)
        assert stats.power(d * sd, sd, n) == pytest.approx(0.8, rel=1e-5)  # statsmodels root: ~1e-7
        assert stats.power(0.5 * d * sd, sd, n) == pytest.approx(
            sm.power(0.5 * d, n, alpha=0.05, ratio=1.0), rel=1e-10)
        # the standard approximation is close: 1.2% low at n = 3, within 0.2% from n = 5
        assert stats.mde_approx(sd, n) == pytest.approx(stats.mde(sd, n), rel=0.012 if n < 5 else 0.002)
    # issue 16: pooled seed SD 0.051 at 3 seeds -> about 0.16 bpb
    assert stats.mde(0.051, 3) == pytest.approx(0.1566, abs=5e-4)
    # a study-wide pooled df buys power: 6 arms x 5 seeds (df 24) beats a two-arm df 8
    assert stats.mde(0.051, 5, df=24) < stats.mde(0.051, 5)
    # unequal arms: statsmodels' ratio = n_ref / n
    d = sm.solve_power(nobs1=4, ratio=2.0, alpha=0.05, power=0.8)
    assert stats.mde(0.03, 4, n_ref=8) == pytest.approx(d * 0.03, rel=1e-6)
    with pytest.raises(ValueError, match="sd"):
        stats.mde(0.0, 3)


def test_mcnemar_exact_matches_statsmodels_and_hand():
    rng = np.random.default_rng(7)
    a = rng.random(400) < 0.8
    b = a.copy()
    flip = rng.random(400) < 0.1
    b[flip] = ~b[flip]
    got = stats.mcnemar_exact(a, b)
    table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
    assert got.p == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-10)
    assert got.n10 + got.n01 == flip.sum()
    # by hand: 6 discordant pairs all favouring b -> 2 * 0.5**6
    a2 = np.array([1] * 10 + [0] * 6 + [0] * 4)
    b2 = np.array([1] * 10 + [1] * 6 + [0] * 4)
    h = stats.mcnemar_exact(a2, b2)
    assert (h.n10, h.n01, h.p) == (0, 6, pytest.approx(2 * 0.5 ** 6))
    assert h.delta == pytest.approx(6 / 20)
    assert stats.mcnemar_exact(a2, a2).p == 1.0  # identical outputs: nothing to test
    with pytest.raises(ValueError, match="equally long"):
        stats.mcnemar_exact(a2, b2[:-1])
