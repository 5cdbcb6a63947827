"""The paired statistics of the reports on fixed numbers, against independent computations:
the seed-blocked comparison (statsmodels OLS ``y ~ C(row) + C(seed)``; scipy's paired t-test
for two rows), the pooled McNemar (statsmodels' exact McNemar), the interval of a paired
accuracy difference, the counts a run's figures imply, and the ``paired`` manifest key."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
import yaml
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar

from v4lab.errors import ConfigError
from v4lab.report.caches import cache_finding, study_cache_pairs
from v4lab.report.paired import (
    blocked_comparisons,
    cache_pairs,
    discordant_counts,
    mcnemar_p,
    paired_delta_interval,
)
from v4lab.report.table import method_text, summarize
from v4lab.stats import mde
from v4lab.studies import load_study
from v4lab.studies.manifests import Study

ROOT = Path(__file__).resolve().parents[2]
# seed 2 is hard for every row (a block effect the unpaired test counts as noise)
ACC = {"ref": [0.98, 0.97, 0.60, 0.98, 0.99], "a": [0.85, 0.94, 0.59, 0.95, 0.93],
       "b": [0.97, 0.99, 0.62, 0.96, 0.99]}


def test_blocked_comparison_is_ols_with_row_and_seed_effects():
    comps, s, df = blocked_comparisons(ACC, "ref")
    frame = pd.DataFrame([{"g": g, "seed": i, "y": v} for g, vs in ACC.items() for i, v in enumerate(vs)])
    res = smf.ols("y ~ C(g, Treatment('ref')) + C(seed)", frame).fit()
    assert df == res.df_resid == 8
    assert s == pytest.approx(math.sqrt(res.scale), rel=1e-12)
    for arm in ("a", "b"):
        name = f"C(g, Treatment('ref'))[T.{arm}]"
        c = comps[arm]
        assert c.delta == pytest.approx(res.params[name], abs=1e-12)
        assert c.se == pytest.approx(res.bse[name], rel=1e-10)
        assert c.p == pytest.approx(res.pvalues[name], rel=1e-8)
        lo, hi = res.conf_int().loc[name]
        assert (c.lo, c.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_two_rows_give_the_paired_t_test_and_more_power_than_the_unpaired_one():
    two = {"ref": ACC["ref"], "a": ACC["a"]}
    comps, s, df = blocked_comparisons(two, "ref")
    paired = sps.ttest_rel(ACC["a"], ACC["ref"])
    assert comps["a"].p == pytest.approx(paired.pvalue, rel=1e-10) and df == 4
    assert comps["a"].p < sps.ttest_ind(ACC["a"], ACC["ref"]).pvalue  # the seed effect is removed
    # the MDE the table shows comes from the residual SD: se = s sqrt(2/n)
    assert mde(s, 5, 5, df) < mde(float(np.std(np.r_[ACC["a"], ACC["ref"]], ddof=2)), 5, 5, 8)


def test_blocked_comparison_refuses_unequal_or_single_seeds():
    with pytest.raises(ValueError, match="same >= 2 seeds"):
        blocked_comparisons({"ref": [1.0, 2.0], "a": [1.0, 2.0, 3.0]}, "ref")
    with pytest.raises(ValueError, match="same >= 2 seeds"):
        blocked_comparisons({"ref": [1.0], "a": [2.0]}, "ref")
    exact, s, _ = blocked_comparisons({"ref": [1.0, 2.0, 3.0], "a": [1.5, 2.5, 3.5]}, "ref")
    assert s == 0 and exact["a"].p == 0.0 and exact["a"].delta == pytest.approx(0.5)


@pytest.mark.parametrize(("n10", "n01"), [(0, 0), (10, 8), (2, 11), (0, 7), (40, 21)])
def test_mcnemar_p_is_statsmodels_exact_mcnemar(n10, n01):
    expected = 1.0 if n10 + n01 == 0 else mcnemar([[100, n10], [n01, 100]], exact=True).pvalue
    assert mcnemar_p(n10, n01) == pytest.approx(expected, rel=1e-12)


def test_paired_interval_is_honest_without_discordant_answers_and_covers():
    lo, hi = paired_delta_interval(0, 0, 5120)
    bound = 1 - 0.0125 ** (1 / 5120)  # Clopper-Pearson upper end of 0/5120 at 97.5%
    assert (lo, hi) == (pytest.approx(-bound, rel=1e-9), pytest.approx(bound, rel=1e-9))
    # coverage by simulation: p10 = 0.004, p01 = 0.002 on 1,000 items
    rng = np.random.default_rng(0)
    counts = rng.multinomial(1000, [0.004, 0.002, 0.994], size=2000)
    inside = [lo <= 0.002 <= hi for lo, hi in (paired_delta_interval(a, b, 1000) for a, b, _ in counts)]
    assert np.mean(inside) >= 0.95


def test_discordant_counts_follow_from_a_runs_figures():
    assert discordant_counts(1024, 0.9775390625, 0.98046875, 11) == (7, 4)  # cache +3 answers
    assert discordant_counts(1024, 0.98046875, 0.978515625, 6) == (2, 4)
    with pytest.raises(ValueError, match="cannot come with 3 discordant"):
        discordant_counts(1024, 0.98046875, 0.978515625, 3)  # 2 answers apart, odd total


def _records(n10s, n01s, n=1000, own=0.9):
    return [{"probe/acc@32": own, "probe/answers@32": float(n),
             "probe/kv_fp32/acc": own + (a - b) / n, "probe/kv_fp32/discordant": float(a + b)}
            for a, b in zip(n10s, n01s, strict=True)]


def test_cache_pairs_pool_seeds_and_test_equivalence():
    [c] = cache_pairs({"dense": _records([3, 0, 5], [1, 2, 4])}, "probe/acc@32", {"probe/kv_fp32/acc": 0.01})
    assert (c.n, c.n10, c.n01) == (3000, 8, 7)
    assert c.p == pytest.approx(mcnemar([[0, 8], [7, 0]], exact=True).pvalue)
    assert c.delta == pytest.approx(1 / 3000) and c.acc == pytest.approx(0.9 + 1 / 3000)
    assert c.equivalent and -0.01 < c.lo < c.eq_lo < 0 < c.eq_hi < c.hi < 0.01  # 90% inside 95%
    [worse] = cache_pairs({"dense": _records([0, 0], [60, 70])}, "probe/acc@32", {})
    assert worse.p_holm < 1e-30 and worse.equivalent is None
    assert "a significant difference" in cache_finding(worse)


def test_study_cache_pairs_only_for_runs_with_other_caches():
    study = Study("kv", ["dense"], [0, 1], "dense", ["probe/acc@32"], equivalence={})
    runs = {f"dense-s{s}": (Path("/nowhere"), r) for s, r in enumerate(_records([1, 0], [0, 1]))}
    assert [c.cache for c in study_cache_pairs(study, runs)] == ["fp32"]
    plain = {k: (p, {m: v for m, v in r.items() if "kv_" not in m}) for k, (p, r) in runs.items()}
    assert study_cache_pairs(study, plain) == []


def test_a_paired_study_table_uses_the_blocked_test():
    study = Study("p", list(ACC), [0, 1, 2, 3, 4], "ref", ["probe/acc@32"], paired=True)
    runs = {f"{e}-s{s}": (Path("/nowhere"), {"probe/acc@32": v}) for e, vs in ACC.items()
            for s, v in enumerate(vs)}
    row = {r["experiment"]: r for r in summarize(study, runs).iter_rows(named=True)}["a"]
    comps, s, df = blocked_comparisons(ACC, "ref")
    assert row["probe/acc@32 p"] == pytest.approx(comps["a"].p)
    assert row["probe/acc@32 mde"] == pytest.approx(mde(s, 5, 5, df))
    assert "seed as a block" in method_text(study, summarize(study, runs))


@pytest.mark.parametrize(("extra", "message"), [
    ({"paired": "yes"}, r"bad.yaml: paired='yes' is not allowed: true or false"),
    ({"paired": True, "sweep": {"chip": ["nvidia_h800", "nvidia_h20"]},
      "baseline": "baseline-chip_nvidia_h800",
      "shared_runs": {"chip": {"same": ["nvidia_h800", "nvidia_h20"]}}},
     r"bad.yaml: paired=true is not allowed with shared_runs"),
])
def test_manifest_paired_is_validated(tmp_path, extra, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "experiments": ["baseline"], "seeds": [0, 1],
                                    "baseline": "baseline", "metrics": ["val/bpb"], **extra}))
    with pytest.raises(ConfigError, match=message):
        load_study(str(path), ROOT)


def test_the_probe_studies_are_paired_and_the_corpus_studies_are_not():
    paired = {name for name in ("recall", "vvpa", "facts", "capacity", "components", "v4", "experts")
              if load_study(name, ROOT).paired}
    assert paired == {"recall", "vvpa", "facts", "capacity"}
