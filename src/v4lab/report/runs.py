"""The runs a report is made of: every run of the study, each metrics.json whole and in its
place (found by :mod:`v4lab.studies.finder`), or a refusal that names every file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from v4lab import metrics as registry
from v4lab.errors import ConfigError
from v4lab.stats import is_number
from v4lab.studies.classes import ROW_FIGURES, row_figures
from v4lab.studies.finder import RUN_BASES, scan
from v4lab.studies.manifests import Study

Runs = dict[str, tuple[Path, dict[str, Any]]]  # run name: (run folder, metrics.json contents)


class ReportError(ConfigError):
    """A study cannot be published as asked; the message names the file and the fix."""


def load_runs(study: Study, root: Path) -> Runs:
    """{run name: (run folder, metrics)} for every run of ``study``; refuses missing,
    corrupt or misplaced runs with one message that names every file."""
    found = scan(study, root)
    bad = list(found.bad)
    for name, (folder, m) in list(found.runs.items()):
        if "experiment" not in m or "seed" not in m:  # the report labels rows and curves with them
            run = next(r for r in study.runs() if r.name == name)
            bad.append(f"{folder / 'metrics.json'}: holds experiment={m.get('experiment')!r} "
                       f"seed={m.get('seed')!r}, expected {run.experiment!r} seed {run.seed}")
            del found.runs[name]
    if found.missing or bad:
        lines = [f"study {study.name!r}: refusing to publish a partial table"]
        if found.missing:
            missing = [f"{r} (no {study.name}/{r}/metrics.json under {' or '.join(RUN_BASES)}/)"
                       for r in found.missing]
            lines.append(f"{len(missing)} of {len(study.runs())} runs missing or failed: "
                         + "; ".join(missing) + f" (run them: dvc repro {study.name}, or "
                         f"python -m v4lab.studies run {study.name})")
        lines += bad
        raise ReportError("\n  ".join(lines))
    return found.runs


def with_shared_rows(study: Study, runs: Runs, root: Path) -> Runs:
    """``runs`` plus, for each row that shares another row's runs (``shared_runs``), one
    entry per seed under the row's own run name: its source run's folder and metrics, the
    ``chip/*`` figures replaced by the row's own (computed for its chip, as its run would
    record them: :func:`v4lab.studies.classes.row_figures`)."""
    out = dict(runs)
    figures: dict[str, dict[str, Any]] = {}
    for r in study.row_runs():
        src = study.source(r)
        if src == r or src.name not in runs:
            continue
        if r.row not in figures:
            figures[r.row] = row_figures(study, r, root)
        folder, m = runs[src.name]
        own = {k: v for k, v in m.items() if not k.startswith(ROW_FIGURES)}
        out[r.name] = (folder, {**own, **figures[r.row]})
    return out


def check_finite(study: Study, runs: Runs) -> None:
    """No run holds a non-finite number where a good run writes a finite one: a registered
    quality, cost, speed or time metric (:func:`v4lab.metrics.must_be_finite`) or a table
    column. NaN there means a failed run, or a finished run rerun into an empty resume
    (issue 18: train/loss and speed/train_tokens_per_s NaN), which the table would
    otherwise show as "n/a"."""
    bad = [f"{folder / 'metrics.json'}: {key}={v!r}"
           for folder, m in runs.values() for key, v in m.items()
           if is_number(v) and not math.isfinite(v)
           and (registry.must_be_finite(key) or key in study.metrics)]
    if bad:
        raise ReportError(f"study {study.name!r}: refusing non-finite metrics (a failed run, or a "
                          "finished run rerun into an empty resume); delete those run folders and "
                          "rerun them:\n  " + "\n  ".join(bad))


def check_metrics(study: Study, runs: Runs) -> None:
    """Every metric column is produced by every run of a row or by none of them (a model
    without the piece), by some run of the study, as numbers or one string per experiment;
    no metric a good run writes as a finite number is NaN or infinite."""
    for metric in study.metrics:
        lacking = [str(folder / "metrics.json") for folder, m in runs.values() if metric not in m]
        if len(lacking) == len(runs):
            sample = next(iter(runs.values()))[1]
            raise ReportError(f"experiments/{study.name}.yaml: metrics contains {metric!r}, which no "
                              f"run produces; available: {', '.join(sorted(sample))}")
        by_row: dict[str, set[bool]] = {}
        for r in study.runs():  # a row's runs all have the metric, or none does (no such piece)
            by_row.setdefault(r.row, set()).add(metric in runs[r.name][1])
        partial = [row for row, has in by_row.items() if len(has) > 1]
        if partial:
            raise ReportError(f"experiments/{study.name}.yaml: metric {metric!r} is missing from "
                              f"{', '.join(lacking)} (rows {', '.join(partial)} have it in other seeds)")
        for folder, m in runs.values():
            if metric not in m:
                continue
            v = m[metric]
            if not (is_number(v) or isinstance(v, str)):
                raise ReportError(f"{folder / 'metrics.json'}: {metric}={v!r} is neither a number "
                                  "nor a string")
    check_finite(study, runs)
