"""The published table: one row per experiment (and sweep value); per metric the mean over
seeds with its 95% interval, the difference to the reference row (the manifest's
``baseline``) with its 95% interval, the p-value of a t-test whose seed variance is pooled
over every row of the study (:func:`v4lab.stats.pooled_comparisons`), Holm-corrected over
the rows compared, and the minimum detectable effect (80% power) of that test. A ``paired``
study (the probe studies: a seed's rows share their data and held-out queries) compares
with seed as a block instead (:func:`v4lab.report.paired.blocked_comparisons`).

Accuracies (``probe/acc@<L>``, ``*/acc``) whose runs also record how many answers they
were measured on (``probe/answers@<L>``) show the accuracy pooled over seeds with an exact
Clopper-Pearson interval on the pooled counts; their comparison stays the seed-level test.
A metric with an equivalence margin in the manifest gets a TOST per row.

Rows that share another row's runs (``shared_runs``: chips with the same numerics) are the
same runs, not independent replications: a measured metric is tested once per class (the
pooled variance and Holm's correction over the rows with runs of their own), each row of a
class shows its class's test, and a row sharing the reference's runs has none (``<m>
same_runs``). Their ``chip/*`` figures are their own (:data:`v4lab.studies.classes.ROW_FIGURES`)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import polars as pl

from v4lab.report.paired import blocked_comparisons
from v4lab.report.runs import Runs, check_metrics
from v4lab.stats import (
    ALPHA,
    Comparison,
    clopper_pearson,
    constant,
    holm,
    is_number,
    mde,
    mean_ci,
    pooled_comparisons,
    pooled_sd,
    tost,
)
from v4lab.studies.classes import ROW_FIGURES
from v4lab.studies.manifests import Study

POWER = 0.8  # the power at which each row's minimum detectable effect is given
ACCURACY = re.compile(r"probe/acc@[^/]+|.+/acc")  # proportions (fraction correct)


TASK_CELL = re.compile(r"(task/[^/@]+@[^/]+)/acc")  # a long-context task cell's accuracy
MIN_CELL = 100  # examples per run a task cell needs to count as a result (issue 16)


def answers_key(metric: str) -> str | None:
    """The metrics.json key holding the number of answers behind accuracy ``metric``
    (``probe/acc@128`` -> ``probe/answers@128``, ``task/mqar@256/acc`` ->
    ``task/mqar@256/answers``), or None when none is recorded."""
    m = re.fullmatch(r"probe/acc@([^/]+)", metric)
    if m:
        return f"probe/answers@{m.group(1)}"
    m = TASK_CELL.fullmatch(metric)
    return f"{m.group(1)}/answers" if m else None


def summarize(study: Study, runs: Runs) -> pl.DataFrame:
    """One row per experiment and sweep value (manifest order; the label in column
    ``experiment``: :meth:`Study.rows`): n, and per numeric metric ``<m> mean``, ``<m> ci95``
    (half-width of the seed-level Student-t interval; ``<m> absent`` on a row whose runs
    do not record the metric, e.g. MoE figures of a dense model), ``<m> lo``/``<m> hi`` (the interval
    shown: Student t, or Clopper-Pearson on pooled counts where ``<m> answers`` is given),
    ``<m> delta`` with ``<m> delta_lo``/``<m> delta_hi``, ``<m> p`` (pooled t-test vs the
    reference), ``<m> p_holm``, ``<m> significant`` (p_holm < 0.05), ``<m> mde``,
    ``<m> exact`` (no spread in this row nor the reference's: a deterministic figure,
    compared without a test), and with a margin ``<m> tost_p`` and ``<m> equivalent``.
    String metrics: ``<m>`` only."""
    check_metrics(study, runs)
    records = {e: [runs[f"{e}-s{s}"][1] for s in study.seeds] for e in study.rows()}
    rows: dict[str, dict[str, Any]] = {e: {"experiment": e, "n": len(ms)} for e, ms in records.items()}
    if study.shared:  # which runs each row shows, and its class
        for e in rows:
            rows[e] |= {"runs": study.source_row(e), "class": study.numerics_class(e)}
    for metric in study.metrics:
        # a row whose model lacks the piece (dense_ffn has no moe/*) has no such column
        present = {e: ms for e, ms in records.items() if metric in ms[0]}
        values = {e: [m[metric] for m in ms] for e, ms in present.items()}
        if not all(is_number(v) for vs in values.values() for v in vs):
            for e in rows:
                rows[e][metric] = " / ".join(sorted({str(v) for v in values[e]})) if e in values else "—"
            continue
        groups = {e: [float(v) for v in vs] for e, vs in values.items()}
        cells = _metric_cells(study, metric, groups, present)
        for e in rows:
            rows[e].update({f"{metric} {k}": v for k, v in cells.get(e, {"absent": True}).items()})
    return pl.DataFrame(list(rows.values()), infer_schema_length=None)


def _interval(metric: str, values: list[float], ms: list[dict[str, Any]]) -> dict[str, Any]:
    """mean, ci95, lo, hi (and answers) of one row of a numeric metric."""
    m = mean_ci(values)
    out = {"mean": m.mean, "ci95": m.half_width, "lo": m.lo, "hi": m.hi}
    key = answers_key(metric) if ACCURACY.fullmatch(metric) else None
    if key and all(is_number(r.get(key)) and r[key] >= 1 for r in ms):
        n = sum(int(r[key]) for r in ms)
        k = sum(round(float(r[metric]) * int(r[key])) for r in ms)  # correct answers of each seed
        out["mean"], out["answers"] = k / n, n
        out["lo"], out["hi"] = clopper_pearson(int(k), n)
        if TASK_CELL.fullmatch(metric):  # fewest examples in one run; beyond the trained length?
            out["per_run"] = min(int(r[key]) for r in ms)
            flag = f"{TASK_CELL.fullmatch(metric).group(1)}/extrapolated"
            out["extrapolated"] = any(r.get(flag) == 1 for r in ms)
    return out


def _comparisons(ref: str, groups: dict[str, list[float]],
                 paired: bool = False) -> tuple[dict[str, Comparison], float, int]:
    """Each row against ``ref`` (exact where neither has spread), the pooled SD and its df
    (nan, 0 when the study has a single seed per row: no test). ``paired``: seed as a block
    (:func:`v4lab.report.paired.blocked_comparisons`; its SD is the residual one)."""
    try:
        pooled, s, df = (blocked_comparisons(groups, ref) if paired
                         else (pooled_comparisons(groups, ref), *pooled_sd(groups)))
    except ValueError:  # one seed per row: no degrees of freedom
        return {}, math.nan, 0
    a = groups[ref]
    out = {}
    for e, vs in groups.items():
        if e == ref:
            continue
        if len(vs) > 1 and constant(vs) and constant(a):  # deterministic: exactly equal or not
            delta = float(np.mean(vs) - np.mean(a))
            same = math.isclose(float(np.mean(vs)), float(np.mean(a)), rel_tol=1e-9)
            out[e] = Comparison(e, ref, delta, delta, delta, 1.0 if same else 0.0, 0.0, df,
                                len(vs), len(a))
        else:
            out[e] = pooled[e]
    return out, s, df


def _metric_cells(study: Study, metric: str, groups: dict[str, list[float]],
                  records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every row's cells of one numeric metric (keys without the metric's name). A metric
    of shared runs is tested on the rows with runs of their own only."""
    shared = bool(study.shared) and not metric.startswith(ROW_FIGURES)
    source = {e: study.source_row(e) if shared else e for e in groups}
    ref = source.get(study.baseline, study.baseline)
    own = {e: vs for e, vs in groups.items() if source[e] == e}
    comps, s, df = _comparisons(ref, own, study.paired) if ref in own else ({}, math.nan, 0)
    tested = [e for e, c in comps.items() if c.se > 0]
    adjusted = dict(zip(tested, holm([comps[e].p for e in tested]))) if tested else {}
    margin = study.equivalence.get(metric)
    out = {}
    for e, vs in groups.items():
        cell = _interval(metric, vs, records[e])
        c = comps.get(source[e])
        exact = c is not None and c.se == 0
        p = c.p if c else math.nan
        p_holm = float(adjusted.get(source[e], p))  # exact comparisons are not tests: not corrected
        cell |= {"delta": c.delta if c else float(np.mean(vs) - np.mean(groups[ref]))
                 if ref in groups else math.nan,
                 "delta_lo": c.lo if c else math.nan, "delta_hi": c.hi if c else math.nan,
                 "p": p, "p_holm": p_holm,
                 "significant": None if math.isnan(p_holm) else bool(p_holm < ALPHA),
                 "mde": mde(s, len(vs), len(groups[ref]), df, target=POWER)
                 if c is not None and not exact and s > 0 else math.nan,
                 "exact": exact}
        if study.shared:  # (a column only where rows share runs: other tables keep theirs)
            cell["same_runs"] = e != study.baseline and source[e] == ref
        if margin is not None:
            eq = tost(c, margin) if c else None
            cell |= {"tost_p": eq.p if eq else math.nan,
                     "equivalent": eq.equivalent if eq else None}
        out[e] = cell
    return out


def fmt(v: float) -> str:
    """Four decimals (scientific below 1e-3), thousands separators for counts."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if abs(v) >= 1e4 or (abs(v) >= 100 and float(v).is_integer()):
        return f"{v:,.0f}"
    if abs(v) >= 1e-3 or v == 0:
        return f"{v:.4f}"
    return f"{v:.3e}"


def _signed(v: float) -> str:
    return ("+" if v > 0 else "") + fmt(v)


def _p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.3g}"


def _has_mde(table: pl.DataFrame, metric: str) -> bool:
    col = f"{metric} mde"
    return col in table.columns and any(v is not None and not math.isnan(v) for v in table[col])


def _mean_cell(row: dict[str, Any], metric: str) -> str:
    if row.get(f"{metric} answers") is not None:  # pooled counts: exact interval
        marks = ["extrapolated"] * bool(row.get(f"{metric} extrapolated"))
        per_run = row.get(f"{metric} per_run")
        if per_run is not None and per_run < MIN_CELL:
            marks.append(f"{per_run} per run < {MIN_CELL}: not a result")
        return (f"{fmt(row[f'{metric} mean'])} [{fmt(row[f'{metric} lo'])}, {fmt(row[f'{metric} hi'])}]"
                f" ({row[f'{metric} answers']:,} answers{''.join(f'; {m}' for m in marks)})")
    return fmt(row[f"{metric} mean"]) + f" ± {fmt(row[f'{metric} ci95'])}"


def _delta_cell(row: dict[str, Any], metric: str) -> str:
    delta = row[f"{metric} delta"]
    if row.get(f"{metric} same_runs"):  # the reference's own runs: nothing to test
        return "= reference (same runs)"
    if row[f"{metric} exact"]:  # deterministic figure: no test to make
        return f"{_signed(delta)} (exact)" if row[f"{metric} p"] == 0 else "0 (exact)"
    text = f"{_signed(delta)} (p={_p(row[f'{metric} p_holm'])})"
    text += " *" if row[f"{metric} significant"] else ""
    if row.get(f"{metric} equivalent"):
        text += f" ≈ (TOST p={_p(row[f'{metric} tost_p'])})"
    return text


def markdown_table(study: Study, table: pl.DataFrame) -> str:
    """The published table: per metric ``mean ± CI``, ``Δ vs reference (Holm p)`` and, where
    a test was made, the row's MDE."""
    header = ["experiment", "n", *(["runs", "class"] if study.shared else [])]
    for metric in study.metrics:
        header += [metric] if metric in table.columns else [metric, f"Δ {metric}"]
        header += [f"MDE {metric}"] if _has_mde(table, metric) else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.iter_rows(named=True):
        name = row["experiment"]
        is_ref = name == study.baseline
        cells = [f"**{name}** (reference)" if is_ref else name, str(row["n"])]
        if study.shared:  # the row whose runs this row shows (itself: "own")
            cells += ["own" if row["runs"] == name else f"`{row['runs']}`", str(row["class"])]
        for metric in study.metrics:
            if metric in table.columns:
                cells.append(str(row[metric]))
                continue
            if row.get(f"{metric} absent"):  # the row's model has no such piece
                cells += ["—", "—"] + ["—"] * _has_mde(table, metric)
                continue
            no_test = is_ref or math.isnan(row[f"{metric} delta"])
            cells += [_mean_cell(row, metric), "—" if no_test else _delta_cell(row, metric)]
            if _has_mde(table, metric):
                cells.append("—" if no_test or row.get(f"{metric} same_runs")
                             else fmt(row[f"{metric} mde"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_text(study: Study, table: pl.DataFrame) -> str:
    """The sentence under a table that says what its numbers are."""
    n = len(study.rows()) - _n_sharing(study)  # rows with runs of their own
    test = (f"seed as a block (every row's seed s trains on the same generated sequences and is "
            f"scored on the same held-out queries): the two-way model row + seed, its residual "
            f"variance pooled over all {n} rows (df = (rows − 1)(seeds − 1); with two rows, the "
            f"paired t-test)" if study.paired else
            f"the seed variance pooled over all {n} rows of the study with runs of their own "
            f"(df = runs − rows)")
    text = (f"Mean ± 95% CI (Student t) over seeds {study.seeds}; Δ = difference of the mean to "
            f"the reference row `{study.baseline}`; p = two-sided t-test of Δ = 0 with {test}, "
            f"Holm-corrected over the {n - 1} row(s) compared with the reference, per metric; "
            f"* = corrected p < {ALPHA}. MDE = the smallest true |Δ| this test detects with "
            f"{POWER:.0%} power at α = {ALPHA} ({'residual' if study.paired else 'pooled'} SD, "
            "the row's and the reference's seeds). "
            "(exact): a figure without spread in the row and the reference, compared without a "
            "test. n/a: one seed gives no interval or test.")
    if any(c.endswith(" answers") for c in table.columns):
        text += (" Accuracies with [lo, hi]: pooled over seeds, exact Clopper–Pearson 95% "
                 "interval on the pooled answer counts; their Δ and p are from the seed-level test.")
    if any(c.endswith(" per_run") for c in table.columns):
        text += (f" Task cells: extrapolated = a context beyond the trained length (trainer.seq_len); "
                 f"a cell with fewer than {MIN_CELL} examples in a run is marked as not a result.")
    if study.shared:
        text += (" Rows that share runs (column runs: `shared_runs`, one numerics class) show "
                 "the runs of the row named there: the same runs, not independent replications, "
                 "so their measured metrics are tested once per class (the test of the row that "
                 "trained them) and a row sharing the reference's runs has no test (= reference). "
                 "Their chip/* figures (numerics, projections) are computed for their own chip "
                 "and compared as exact figures.")
    if study.equivalence:
        margins = ", ".join(f"{m} ±{v:g}" for m, v in study.equivalence.items())
        text += (f" ≈ = shown equivalent to the reference by TOST (two one-sided pooled t-tests "
                 f"at {ALPHA}) within the margin: {margins}.")
    return text


def _n_sharing(study: Study) -> int:
    """How many rows show another row's runs."""
    return sum(study.source(c) != c for c in study.cells())


def _sharing_note(study: Study) -> str | None:
    """The finding that says which rows are the same runs (no independent evidence)."""
    groups: dict[str, list[str]] = {}
    for row in study.rows():
        if study.source_row(row) != row:
            groups.setdefault(study.source_row(row), []).append(f"`{row}`")
    if not groups:
        return None
    parts = [f"{', '.join(rows)} show `{src}`'s runs"
             + (" (the reference's: not tested against it)" if src == study.source_row(study.baseline)
                else "") for src, rows in groups.items()]
    return ("Rows sharing runs are the same runs, not independent results (same numerics "
            "class, trained once per seed): " + "; ".join(parts) + ". Each class's test below "
            "holds for every row of the class.")


def _finding(study: Study, row: dict[str, Any], metric: str) -> str | None:
    e, margin = row["experiment"], study.equivalence.get(metric)
    if study.shared and study.source_row(e) != e and not metric.startswith(ROW_FIGURES):
        return None  # its class's finding, under the row that trained the runs
    delta, p = row[f"{metric} delta"], row[f"{metric} p_holm"]
    if row.get(f"{metric} absent") or row[f"{metric} exact"] or p is None or math.isnan(p):
        return None
    if row[f"{metric} significant"]:
        return (f"`{e}`: {metric} Δ = {_signed(delta)} (95% CI {_signed(row[f'{metric} delta_lo'])} "
                f"to {_signed(row[f'{metric} delta_hi'])}), Holm p = {_p(p)}.")
    if row.get(f"{metric} equivalent"):
        return (f"`{e}`: {metric} equivalent to `{study.baseline}` within ±{margin:g} "
                f"(Δ = {_signed(delta)}, TOST p = {_p(row[f'{metric} tost_p'])}).")
    return (f"`{e}`: {metric} no detectable difference (Δ = {_signed(delta)}, Holm p = {_p(p)}); "
            f"MDE = {fmt(row[f'{metric} mde'])} at {POWER:.0%} power.")


def findings(study: Study, table: pl.DataFrame) -> list[str]:
    """Short factual lines from the table: for the primary metric (the manifest's first) and
    every other numeric metric with a test, each row significantly different after Holm
    (Δ, its 95% CI, corrected p), shown equivalent by TOST (margin), or a null with its MDE.
    Deterministic figures and single-seed studies give none."""
    out = [note] if study.shared and (note := _sharing_note(study)) else []
    for metric in study.metrics:
        if f"{metric} p_holm" not in table.columns:
            continue
        out += [f for row in table.iter_rows(named=True)
                if row["experiment"] != study.baseline and (f := _finding(study, row, metric))]
    return out
