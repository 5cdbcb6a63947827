"""The one run finder: where a study's runs are and what their ``metrics.json`` hold.

Every run of study ``S`` lands in ``<base>/S/<run name>/`` (:attr:`.manifests.Run.name`) with ``<base>``
``multirun`` (a sweep, ``python -m v4lab.studies run``) or ``outputs`` (one run at a
time, e.g. a DVC stage); the first base holding a ``metrics.json`` wins. A run whose
metrics.json names another experiment or seed, or whose config.yaml another sweep value
(``variant``), is refused naming the file. The report
(:mod:`v4lab.report.runs`) and ``python -m v4lab.studies status`` both read runs here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v4lab.errors import ConfigError
from v4lab.studies.manifests import Run, Study, find_root

RUN_BASES = ("multirun", "outputs")


class RunError(ConfigError):
    """A run's metrics.json cannot be used; the message (one line) names the file and the fix."""


@dataclass
class Scan:
    """What :func:`scan` found for a study."""

    runs: dict[str, tuple[Path, dict[str, Any]]] = field(default_factory=dict)  # name: (folder, metrics)
    missing: list[str] = field(default_factory=list)  # run names without a metrics.json
    bad: list[str] = field(default_factory=list)      # one line per unusable metrics.json


def run_dir(study: Study, run_name: str, root: Path, bases: tuple[str, ...] = RUN_BASES) -> Path | None:
    """The folder holding the run's metrics.json (the first of ``bases``), or None."""
    for base in bases:
        folder = root / base / study.name / run_name
        if (folder / "metrics.json").is_file():
            return folder
    return None


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json's contents; :class:`RunError` (one line naming ``path``) when it is
    unreadable, not JSON or not a JSON object."""
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: corrupt metrics.json ({e}); delete it and rerun the run") from e
    except OSError as e:
        raise RunError(f"{path}: cannot read metrics.json ({e.strerror or e})") from e
    if not isinstance(metrics, dict):
        raise RunError(f"{path}: corrupt metrics.json (not a JSON object); delete it and rerun the run")
    return metrics


def misplaced(run: Run, metrics: dict[str, Any]) -> bool:
    """The metrics.json names another experiment or seed than its folder (absent keys: a
    hand-written file, not a contradiction)."""
    return (metrics.get("experiment", run.experiment) != run.experiment
            or metrics.get("seed", run.seed) != run.seed)


def recorded_variant(folder: Path) -> str | None:
    """The ``variant`` (sweep values) the run's config.yaml records, or None when it records
    none (a run from before sweeps, or no config.yaml)."""
    import yaml

    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg.get("variant") if isinstance(cfg, dict) else None


def scan(study: Study, root: Path, bases: tuple[str, ...] = RUN_BASES) -> Scan:
    """Every run of ``study``: found (folder, metrics), missing, or bad (one line each)."""
    found = Scan()
    for run in study.runs():
        folder = run_dir(study, run.name, root, bases)
        if folder is None:
            found.missing.append(run.name)
            continue
        path = folder / "metrics.json"
        try:
            metrics = read_metrics(path)
        except RunError as e:
            found.bad.append(str(e))
            continue
        if misplaced(run, metrics):
            found.bad.append(f"{path}: holds experiment={metrics.get('experiment')!r} "
                             f"seed={metrics.get('seed')!r}, expected {run.experiment!r} seed {run.seed}")
            continue
        variant = recorded_variant(folder) if study.sweep else None
        if variant is not None and variant != run.variant:
            found.bad.append(f"{folder / 'config.yaml'}: holds variant={variant!r}, expected "
                             f"{run.variant!r} (the sweep values of {run.name})")
            continue
        found.runs[run.name] = (folder, metrics)
    return found


def collect(study: Study, root: Path | None = None, bases: tuple[str, ...] = RUN_BASES
            ) -> tuple[dict[str, dict], list[str]]:
    """The runs of ``study`` that finished: ({run name: metrics.json contents}, [missing]).
    Raises :class:`RunError` naming each unusable metrics.json."""
    found = scan(study, root or find_root(), bases)
    if found.bad:
        raise RunError("; ".join(found.bad))
    return {name: metrics for name, (_, metrics) in found.runs.items()}, found.missing
