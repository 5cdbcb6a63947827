"""The published table: one row per experiment (and sweep value), per metric the mean over seeds +- the
half-width of a 95% Student-t confidence interval, the difference to the baseline row and
the p-value of Welch's t-test (significant: p < 0.05)."""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from v4lab.report.runs import Runs, check_metrics
from v4lab.stats import ALPHA, constant, is_number, mean_ci, welch_p
from v4lab.studies.manifests import Study


def summarize(study: Study, runs: Runs) -> pl.DataFrame:
    """One row per experiment and sweep value (manifest order; the label in column
    ``experiment``: :meth:`Study.rows`): n, and per metric ``<m> mean``, ``<m> ci95``,
    ``<m> delta``, ``<m> p``, ``<m> significant``, ``<m> exact`` (no spread in this row nor
    the baseline's: a deterministic figure, compared without a test; string metrics:
    ``<m>`` only)."""
    check_metrics(study, runs)
    by_exp = {e: [runs[f"{e}-s{s}"][1] for s in study.seeds] for e in study.rows()}
    base = by_exp[study.baseline]
    rows = []
    for e, ms in by_exp.items():
        row: dict[str, Any] = {"experiment": e, "n": len(ms)}
        for metric in study.metrics:
            values = [m[metric] for m in ms]
            if not all(is_number(v) for v in values):
                distinct = sorted({str(v) for v in values})
                row[metric] = " / ".join(distinct)
                continue
            values = [float(v) for v in values]
            ref = [float(m[metric]) for m in base]
            m = mean_ci(values)
            mean, ci = m.mean, m.half_width
            row[f"{metric} mean"], row[f"{metric} ci95"] = mean, ci
            if e == study.baseline:
                row[f"{metric} delta"], row[f"{metric} p"] = 0.0, math.nan
            else:
                row[f"{metric} delta"] = mean - sum(ref) / len(ref)
                row[f"{metric} p"] = welch_p(values, ref)
            p = row[f"{metric} p"]
            row[f"{metric} significant"] = bool(p < ALPHA) if not math.isnan(p) else None
            row[f"{metric} exact"] = len(values) > 1 and constant(values) and constant(ref)
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def fmt(v: float) -> str:
    """Four decimals (scientific below 1e-3), thousands separators for counts."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if abs(v) >= 1e4 or (abs(v) >= 100 and float(v).is_integer()):
        return f"{v:,.0f}"
    if abs(v) >= 1e-3 or v == 0:
        return f"{v:.4f}"
    return f"{v:.3e}"


def markdown_table(study: Study, table: pl.DataFrame) -> str:
    """The published table: ``mean ± CI`` and ``Δ vs baseline (p)`` per metric."""
    header = ["experiment", "n"]
    for metric in study.metrics:
        header += [metric] if metric in table.columns else [metric, f"Δ {metric}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.iter_rows(named=True):
        name = row["experiment"]
        name = f"**{name}** (baseline)" if name == study.baseline else name
        cells = [name, str(row["n"])]
        for metric in study.metrics:
            if metric in table.columns:
                cells.append(str(row[metric]))
                continue
            ci = row[f"{metric} ci95"]
            cells.append(fmt(row[f"{metric} mean"]) + f" ± {fmt(ci)}")
            if row["experiment"] == study.baseline:
                cells.append("—")
            else:
                p, sig = row[f"{metric} p"], row[f"{metric} significant"]
                sign = "+" if row[f"{metric} delta"] > 0 else ""
                if row[f"{metric} exact"]:  # deterministic figure: no test to make
                    cells.append(f"{sign}{fmt(row[f'{metric} delta'])} (exact)" if p == 0 else "0 (exact)")
                    continue
                p_text = "n/a" if math.isnan(p) else f"{p:.3g}"
                cells.append(f"{sign}{fmt(row[f'{metric} delta'])} (p={p_text})" + (" *" if sig else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
