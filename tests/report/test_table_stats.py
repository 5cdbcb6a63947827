"""The table's statistics on fixed numbers, against statsmodels: the pooled comparison with
the reference (OLS with the reference as the baseline level), Holm, MDE, TOST,
Clopper-Pearson on pooled counts; the findings written from them; `check` on the new
columns; the manifest's equivalence margins."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import statsmodels.formula.api as smf
import yaml
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from v4lab import stats
from v4lab.errors import ConfigError
from v4lab.report.check import compare
from v4lab.report.publish import study_markdown
from v4lab.report.table import findings, markdown_table, method_text, summarize
from v4lab.studies import load_study
from v4lab.studies.manifests import Study

ROOT = Path(__file__).resolve().parents[2]
BPB = {"full": [3.00, 3.02, 3.01], "no_a": [3.10, 3.12, 3.09],  # a large effect
       "no_b": [3.01, 3.03, 3.00], "no_c": [3.00, 3.03, 3.02]}    # nulls, the last one "matches"
ACC = {"full": [0.90, 0.95, 0.85], "no_a": [0.50, 0.55, 0.45], "no_b": [0.88, 0.92, 0.90],
       "no_c": [0.91, 0.93, 0.86]}
ANSWERS = [100, 120, 80]
METRICS = ["val/bpb", "probe/acc@128", "task/copy@64/acc", "cost/params_total"]


def _study(equivalence: dict[str, float] | None = None) -> Study:
    return Study("mini", list(BPB), [0, 1, 2], "full", METRICS, equivalence=equivalence or {})


def _runs() -> dict:
    runs = {}
    for e in BPB:
        for s in range(3):
            runs[f"{e}-s{s}"] = (Path(f"/nowhere/{e}-s{s}"), {
                "experiment": e, "seed": s, "val/bpb": BPB[e][s], "probe/acc@128": ACC[e][s],
                "probe/answers@128": ANSWERS[s], "task/copy@64/acc": ACC[e][s],
                "cost/params_total": 1000.0 + 10 * (e == "no_a")})
    return runs


def _ols(data: dict[str, list[float]]):
    """The pooled comparison as a regression: value ~ row, the reference as baseline level."""
    df = pd.DataFrame([{"g": g, "y": v} for g, vs in data.items() for v in vs])
    return smf.ols("y ~ C(g, Treatment('full'))", df).fit()


def _coef(res, arm: str) -> str:
    return f"C(g, Treatment('full'))[T.{arm}]"


@pytest.fixture(scope="module")
def table() -> dict[str, dict]:
    t = summarize(_study({"val/bpb": 0.05}), _runs())
    return {r["experiment"]: r for r in t.iter_rows(named=True)}


@pytest.mark.parametrize(("metric", "data"), [("val/bpb", BPB), ("task/copy@64/acc", ACC)])
def test_pooled_delta_p_holm_and_mde_match_statsmodels(table, metric, data):
    res = _ols(data)
    arms = ["no_a", "no_b", "no_c"]
    p = [res.pvalues[_coef(res, a)] for a in arms]
    _, p_holm, _, _ = multipletests(p, method="holm")
    sd = math.sqrt(res.scale)  # the residual SD: variance pooled over every row
    for a, pa, ph in zip(arms, p, p_holm):
        row = table[a]
        lo, hi = res.conf_int().loc[_coef(res, a)]
        assert row[f"{metric} delta"] == pytest.approx(res.params[_coef(res, a)], abs=1e-12)
        assert (row[f"{metric} delta_lo"], row[f"{metric} delta_hi"]) == pytest.approx((lo, hi), rel=1e-9)
        assert row[f"{metric} p"] == pytest.approx(pa, rel=1e-9)
        assert row[f"{metric} p_holm"] == pytest.approx(ph, rel=1e-9)
        assert row[f"{metric} significant"] is bool(ph < 0.05)
        assert row[f"{metric} mde"] == pytest.approx(stats.mde(sd, 3, 3, int(res.df_resid)), rel=1e-9)
    assert table["no_a"][f"{metric} significant"] is True and table["no_b"][f"{metric} significant"] is False
    ref = table["full"]
    assert ref[f"{metric} delta"] == 0.0 and math.isnan(ref[f"{metric} p_holm"])
    assert math.isnan(ref[f"{metric} mde"]) and ref[f"{metric} significant"] is None


def test_mde_is_the_effect_found_with_80_percent_power(table):
    """Independent of stats.power: a noncentral t at the MDE rejects 80% of the time."""
    res = _ols(BPB)
    d, df = table["no_b"]["val/bpb mde"], res.df_resid
    ncp = d / (math.sqrt(res.scale) * math.sqrt(2 / 3))
    c = sps.t.ppf(0.975, df)
    assert sps.nct.sf(c, df, ncp) + sps.nct.cdf(-c, df, ncp) == pytest.approx(0.8, abs=1e-9)


def test_tost_column_only_with_a_margin_and_against_the_pooled_se(table):
    assert "val/bpb tost_p" in summarize(_study({"val/bpb": 0.05}), _runs()).columns
    plain = summarize(_study(), _runs()).columns
    assert not any(c.endswith((" tost_p", " equivalent")) for c in plain)
    res = _ols(BPB)
    for a in ("no_a", "no_b", "no_c"):
        delta, se = res.params[_coef(res, a)], res.bse[_coef(res, a)]
        p = max(sps.t.sf((delta + 0.05) / se, res.df_resid), sps.t.cdf((delta - 0.05) / se, res.df_resid))
        assert table[a]["val/bpb tost_p"] == pytest.approx(p, rel=1e-9)
        assert table[a]["val/bpb equivalent"] is bool(p < 0.05)
    assert table["no_c"]["val/bpb equivalent"] is True and table["no_a"]["val/bpb equivalent"] is False


def test_accuracy_with_answer_counts_gets_clopper_pearson_on_pooled_counts(table):
    for e, accs in ACC.items():
        k = sum(round(a * n) for a, n in zip(accs, ANSWERS))
        lo, hi = proportion_confint(k, sum(ANSWERS), alpha=0.05, method="beta")
        row = table[e]
        assert row["probe/acc@128 answers"] == sum(ANSWERS)
        assert row["probe/acc@128 mean"] == pytest.approx(k / sum(ANSWERS))
        assert (row["probe/acc@128 lo"], row["probe/acc@128 hi"]) == pytest.approx((lo, hi), rel=1e-9)
        # without answer counts: the seed-level Student-t interval
        m = sps.t.interval(0.95, 2, loc=np.mean(accs), scale=sps.sem(accs))
        assert (row["task/copy@64/acc lo"], row["task/copy@64/acc hi"]) == pytest.approx(m, rel=1e-9)
    assert "task/copy@64/acc answers" not in table["full"]
    # the comparison stays the seed-level pooled test (same numbers as the t metric)
    assert table["no_a"]["probe/acc@128 p_holm"] == table["no_a"]["task/copy@64/acc p_holm"]


def test_deterministic_figures_are_compared_exactly_and_not_corrected(table):
    assert table["no_a"]["cost/params_total p"] == 0.0 and table["no_a"]["cost/params_total exact"]
    assert table["no_b"]["cost/params_total p"] == 1.0 and not table["no_b"]["cost/params_total significant"]
    assert math.isnan(table["no_b"]["cost/params_total mde"])


def test_findings_and_markdown_say_what_was_found():
    study = _study({"val/bpb": 0.05})
    t = summarize(study, _runs())
    lines = findings(study, t)
    sig = next(f for f in lines if f.startswith("`no_a`: val/bpb"))
    assert "Δ = +0.0933 (95% CI" in sig and "Holm p = " in sig
    null = next(f for f in lines if f.startswith("`no_b`: task/copy@64/acc"))
    mde = {r["experiment"]: r for r in t.iter_rows(named=True)}["no_b"]["task/copy@64/acc mde"]
    assert "no detectable difference" in null and f"MDE = {mde:.4f} at 80% power" in null
    assert any(f.startswith("`no_c`: val/bpb equivalent to `full` within ±0.05") for f in lines)
    assert not any("cost/params_total" in f for f in lines)  # deterministic: nothing to find
    md = study_markdown(study, {"findings": lines, "method": method_text(study, t),
                                "table_md": markdown_table(study, t), "figures": [],
                                "runs": 12, "experiments": list(BPB), "seeds": [0, 1, 2], "overrides": [],
                                "run_git_revs": ["a" * 40], "report_git_rev": "b" * 40,
                                "data_manifests": [], "corpus_sha256": ["c" * 64],
                                "train_seconds_total": 1.0, "report_seconds": 0.1, "study": "mini"})
    assert md.index("## Findings") < md.index("Holm-corrected over the 3 row(s)") < md.index("| experiment")
    assert "variance pooled over all 4 rows" in md and "Clopper–Pearson" in md and "TOST" in md
    assert "| **full** (reference) | 3 |" in md and "MDE val/bpb" in md and "≈ (TOST p=" in md
    assert "| 0.9067 [0.8679, 0.9371] (300 answers) |" in md  # full: 272 of 300, Clopper-Pearson


def test_check_handles_the_new_columns(table):
    t = summarize(_study({"val/bpb": 0.05}), _runs())
    assert compare(t, t) == []

    def moved(col: str, by: float) -> list[str]:
        return compare(t.with_columns(pl.when(pl.col("experiment") == "no_b")
                                      .then(pl.col(col) + by).otherwise(pl.col(col)).alias(col)), t)

    assert moved("val/bpb p_holm", 0.01) == [] and len(moved("val/bpb p_holm", 0.05)) == 1
    assert moved("val/bpb tost_p", 0.01) == [] and len(moved("val/bpb tost_p", 0.05)) == 1
    mean = table["no_b"]["val/bpb mean"]
    for col in ("val/bpb mde", "val/bpb delta_lo", "val/bpb hi"):
        assert moved(col, 1e-6) == [] and len(moved(col, 3e-3 * mean)) == 1, col


def test_check_lets_the_tests_of_wall_clock_metrics_move_with_the_machine():
    """A rebuild on the same code moved only the p-values of speed/* rows (0.40 -> 1e-4):
    a wall-clock figure's test is as machine-bound as the figure; quality p-values are not."""
    runs = {k: (p, m | {"speed/train_tokens_per_s": 1000.0 + 10 * m["seed"] + (e == "no_a")})
            for k, (p, m) in _runs().items() for e in [m["experiment"]]}
    study = Study("mini", list(BPB), [0, 1, 2], "full", ["val/bpb", "speed/train_tokens_per_s"])
    t = summarize(study, runs)
    for col in ("speed/train_tokens_per_s p", "speed/train_tokens_per_s p_holm"):
        assert compare(t.with_columns((1 - pl.col(col)).alias(col)), t) == [], col
    assert len(compare(t.with_columns((1 - pl.col("val/bpb p")).alias("val/bpb p")), t)) >= 1


def test_single_seed_gives_no_test_but_a_delta():
    study = Study("mini", list(BPB), [0], "full", ["val/bpb"], equivalence={"val/bpb": 0.05})
    runs = {k: v for k, v in _runs().items() if k.endswith("-s0")}
    row = {r["experiment"]: r for r in summarize(study, runs).iter_rows(named=True)}["no_a"]
    assert row["val/bpb delta"] == pytest.approx(0.1) and math.isnan(row["val/bpb p_holm"])
    assert math.isnan(row["val/bpb mde"]) and row["val/bpb equivalent"] is None
    assert findings(study, summarize(study, runs)) == []


@pytest.mark.parametrize(("equivalence", "message"), [
    ({"val/nope": 0.02}, r"bad.yaml: equivalence key 'val/nope' is not allowed: one of the study's metrics"),
    ({"val/bpb": 0}, r"bad.yaml: equivalence val/bpb=0 is not allowed: a margin"),
    ({"val/bpb": "0.02"}, r"bad.yaml: equivalence val/bpb='0.02' is not allowed"),
    ([0.02], r"bad.yaml: equivalence=\[0.02\] is not allowed: a mapping"),
])
def test_manifest_equivalence_is_validated(tmp_path, equivalence, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "experiments": ["baseline"], "seeds": [0],
                                    "baseline": "baseline", "metrics": ["val/bpb"],
                                    "equivalence": equivalence}))
    with pytest.raises(ConfigError, match=message):
        load_study(str(path), ROOT)
    path.write_text(yaml.safe_dump({
        "name": "bad", "experiments": ["baseline"], "seeds": [0], "baseline": "baseline",
        "metrics": ["val/bpb"], "equivalence": {"val/bpb": 0.02}}))
    assert load_study(str(path), ROOT).equivalence == {"val/bpb": 0.02}


def test_figure_bands_are_student_t_intervals():
    from v4lab.report.figures import t_band

    x = [3.0, 3.1, 3.25]
    assert t_band(x) == pytest.approx(sps.t.interval(0.95, 2, loc=np.mean(x), scale=sps.sem(x)), rel=1e-12)
    assert t_band([2.0]) == (2.0, 2.0)  # one seed: no band


def test_a_row_without_the_piece_shows_a_dash_and_is_left_out_of_the_tests():
    """`moe/load` exists only where there are experts: rows lacking it in every seed show
    "—"; the other rows are compared as if the row were not in the study (pooled SD and
    Holm over the rows that have it, checked against OLS on those rows)."""
    runs = _runs()
    load = {"full": [1.2, 1.3, 1.25], "no_a": [1.6, 1.7, 1.65], "no_c": [1.2, 1.28, 1.3]}
    for e, vs in load.items():
        for s in range(3):
            runs[f"{e}-s{s}"][1]["moe/load"] = vs[s]
    study = Study("mini", list(BPB), [0, 1, 2], "full", ["val/bpb", "moe/load"])
    table = {r["experiment"]: r for r in summarize(study, runs).iter_rows(named=True)}
    assert table["no_b"]["moe/load absent"] and not table["full"].get("moe/load absent")
    res = _ols(load)
    p = multipletests([res.pvalues[_coef(res, a)] for a in ("no_a", "no_c")], method="holm")[1]
    assert table["no_a"]["moe/load p_holm"] == pytest.approx(p[0], rel=1e-6)
    assert table["no_c"]["moe/load p_holm"] == pytest.approx(p[1], rel=1e-6)
    md = markdown_table(study, summarize(study, runs))
    assert "| no_b | 3 | 3.0133 ± " in md and md.splitlines()[4].endswith("| — | — | — |")
    assert not any("no_b`: moe/load" in f for f in findings(study, summarize(study, runs)))
    runs["no_b-s1"][1]["moe/load"] = 1.0  # one seed of a row with it: a broken run, refused
    from v4lab.report.runs import ReportError
    with pytest.raises(ReportError, match="moe/load.*rows no_b have it in other seeds"):
        summarize(study, runs)
