"""``python -m v4lab.report check S``: the rebuilt ``reports/S.csv`` against the committed
one, cell by cell, within each metric's tolerance (:mod:`v4lab.metrics`)."""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

from v4lab import metrics as registry
from v4lab.report.runs import ReportError
from v4lab.stats import is_number
from v4lab.studies.manifests import Study

REPORTS = "reports"


def _tolerance(column: str) -> float:
    return registry.tolerance(column.rsplit(" ", 1)[0])


# The table's columns (v4lab.report.table) that are read like another one: corrected and
# equivalence p-values like p (absolute); interval ends and the MDE, differences of values
# on the metric's scale, like a delta (absolute, from the row's mean).
LIKE = {"p_holm": "p", "tost_p": "p", "delta_lo": "delta", "delta_hi": "delta", "lo": "delta",
        "hi": "delta", "mde": "delta"}
FLAGS = (" significant", " equivalent")  # test verdicts: may flip with the noise of speed metrics


def _cell_tolerance(col: str, a: float, b: float, row: dict[str, Any]) -> float:
    """How far a rebuilt cell may move (:func:`v4lab.metrics.cell_tolerance`)."""
    name, _, stat = col.rpartition(" ")
    if LIKE.get(stat, stat) == "p" and _tolerance(col) >= 0.5:
        return 1.0  # a wall-clock metric's test moves with the machine, as its verdict (FLAGS)
    mean = row.get(f"{name} mean")
    col = f"{name} {LIKE[stat]}" if stat in LIKE else col
    return registry.cell_tolerance(col, a, b, float(mean) if is_number(mean) else None)


def compare(rebuilt: pl.DataFrame, reference: pl.DataFrame) -> list[str]:
    """Every cell of ``rebuilt`` that moved beyond its tolerance from ``reference``."""
    moved = []
    if rebuilt.columns != reference.columns:
        moved.append(f"columns differ: {rebuilt.columns} vs {reference.columns}")
    ref = {r["experiment"]: r for r in reference.iter_rows(named=True)}
    new = {r["experiment"]: r for r in rebuilt.iter_rows(named=True)}
    for e in sorted(set(ref) ^ set(new)):
        moved.append(f"row {e!r} only in the {'reference' if e in ref else 'rebuilt'} table")
    for e in [e for e in new if e in ref]:
        for col in [c for c in rebuilt.columns if c in reference.columns and c != "experiment"]:
            a, b = new[e][col], ref[e][col]
            if is_number(a) and is_number(b):
                if math.isnan(a) and math.isnan(b):
                    continue
                tol = _cell_tolerance(col, a, b, new[e])
                if not abs(a - b) <= tol:
                    moved.append(f"{e} / {col}: {b!r} -> {a!r} (tolerance {tol:.3g})")
            elif a != b and not (col.endswith(FLAGS) and _tolerance(col) >= 0.5):
                moved.append(f"{e} / {col}: {b!r} -> {a!r}")
    return moved


def _committed_csv(root: Path, rel: str) -> pl.DataFrame:
    r = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise ReportError(f"no committed {rel} in git HEAD to compare with ({r.stderr.strip()})")
    fd, tmp = tempfile.mkstemp(suffix=".csv")
    with os.fdopen(fd, "w") as f:
        f.write(r.stdout)
    try:
        return pl.read_csv(tmp, infer_schema_length=None)
    finally:
        os.unlink(tmp)


def check(study: Study, root: Path, reference: Path | None = None) -> list[str]:
    """Compare the rebuilt ``reports/S.csv`` with ``reference`` (default: git HEAD's)."""
    path = root / REPORTS / f"{study.name}.csv"
    if not path.is_file():
        raise ReportError(f"{path} does not exist: rebuild it first (dvc repro {study.name})")
    if reference is None:
        ref = _committed_csv(root, f"{REPORTS}/{study.name}.csv")
    else:
        ref = pl.read_csv(reference, infer_schema_length=None)
    return compare(pl.read_csv(path, infer_schema_length=None), ref)
