"""Runs a study does not train itself, against the code: the declared classes
(``shared_runs``, :mod:`v4lab.studies.sharing`) must be what training really does, and a
row without runs of its own gets its own ``chip/*`` figures here; a study that
``evaluates`` another's runs must ask for the very training those runs had
(:func:`check_evaluates`).

Both compose the row's config exactly as its DVC stage or multirun job would (experiment,
sweep values, the study's overrides) and build it as a run does, without training:
:func:`training_signature` is everything a run's training depends on once the chip has
decided the numerics (the model with its effective KV-cache dtype, the Lightning
precision of the chip's matmul dtype, every other setting), the chip's name and its
projection figures left out; two chips of one class must give the same signature, two
classes different ones. :func:`row_figures` is what a run of the row would record under
``chip/*`` (:func:`v4lab.chips.run_chip_metrics`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from v4lab import build, chips
from v4lab.config import RunConfig, differences, flatten, load_run_config
from v4lab.errors import ConfigError
from v4lab.io import compose
from v4lab.probe_run import EVAL_ONLY_KEYS, training_differences
from v4lab.studies.manifests import Run, Study, load_study

ROW_FIGURES = "chip/"  # the metrics a shared row computes for itself; the rest are its runs'
NOT_TRAINING = ("chip", "variant", "reevaluate")  # the chip acts through the numerics only


def row_config(study: Study, cell: Run, root: Path) -> RunConfig:
    """The validated config of one row of ``study`` (seed 0), as its runs compose it."""
    cfg = compose([f"+experiment={cell.experiment}", "seed=0", f"study={study.name}",
                   *cell.overrides(), *study.overrides], conf_dir=root / "conf")
    return load_run_config(cfg)


def training_signature(run_cfg: RunConfig) -> dict[str, Any]:
    """What a run of ``run_cfg`` trains with (flat), after the chip's numerics: equal
    signatures train bit for bit alike on one machine."""
    numerics = build.numerics(run_cfg, measure=False)  # no timing: a measured chip's peaks
    out = {k: v for k, v in asdict(run_cfg).items() if k not in NOT_TRAINING}
    out["model"] = asdict(numerics.model)
    out["trainer"]["precision"] = build.resolve_precision(run_cfg.trainer.precision,
                                                          numerics.matmul_dtype)
    return flatten(out)


def check_classes(study: Study, root: Path) -> None:
    """Refuse ``shared_runs`` classes that the code does not train alike (a chip whose
    numerics differ from its class's first chip, for any experiment or other sweep value),
    and classes that train alike (merge them: each class is trained once)."""
    source = f"experiments/{study.name}.yaml"
    for axis, classes in study.shared.items():
        groups: dict[tuple, dict[str, dict[str, Any]]] = {}  # the cell without axis: {value: sig}
        for cell in study.cells():
            others = tuple((k, v) for k, v in cell.axes if k != axis)
            value = dict(cell.axes)[axis]
            sig = training_signature(row_config(study, cell, root))
            groups.setdefault((cell.experiment, others), {})[value] = sig
        for (experiment, _), sigs in groups.items():
            firsts = {}
            for label, values in classes.items():
                for v in values[1:]:
                    diff = differences(sigs[values[0]], sigs[v])
                    if diff:
                        raise ConfigError(f"{source}: shared_runs {axis} {label} is not allowed: "
                                          f"{v} trains unlike {values[0]} ({experiment}): "
                                          + "; ".join(diff))
                same = [other for other, sig in firsts.items() if sig == sigs[values[0]]]
                if same:
                    raise ConfigError(f"{source}: shared_runs {axis} classes {same[0]} and {label} "
                                      f"train alike ({experiment}): merge them into one class")
                firsts[label] = sigs[values[0]]


def row_figures(study: Study, cell: Run, root: Path) -> dict[str, Any]:
    """The ``chip/*`` metrics a run of row ``cell`` would record, computed without training
    (the chip's numerics and projections are analytic). A measured chip (``cpu_host``)
    times this host: its figures come from its own runs, never from here."""
    run_cfg = row_config(study, cell, root)
    if run_cfg.chip.measured:
        raise ConfigError(f"experiments/{study.name}.yaml: shared_runs puts the measured chip "
                          f"{run_cfg.chip.name!r} behind another chip's runs ({cell.row}): its "
                          "figures are timed by its own runs; make it the first of its class")
    return chips.run_chip_metrics(run_cfg.chip, run_cfg.model)


def check_evaluates(study: Study, root: Path) -> Study:
    """The study ``study`` evaluates (``evaluates``), once it is checked: itself a training
    study, holding every experiment and seed of ``study``, as probe runs whose composed
    configs train exactly as ``study``'s do (all but :data:`v4lab.probe_run.EVAL_ONLY_KEYS`)."""
    where = f"experiments/{study.name}.yaml: evaluates={study.evaluates}"
    other = load_study(study.evaluates, root)
    missing = [e for e in study.experiments if e not in other.experiments]
    missing += [f"seed {s}" for s in study.seeds if s not in other.seeds]
    if other.evaluates or other.sweep or missing:
        raise ConfigError(f"{where} is not allowed: a study that trains its runs, without a sweep, "
                          f"with every experiment and seed of this one (missing: {missing or 'none'})")
    for e in study.experiments:
        mine, theirs = (row_config(s, Run(e, -1), root) for s in (study, other))
        if not mine.probe.enabled:
            raise ConfigError(f"{where} is not allowed: only probe runs are evaluated again "
                              f"(probe=<name>; {e} is a corpus run)")
        diff = training_differences(asdict(theirs), asdict(mine))
        if diff:
            raise ConfigError(f"{where} is not allowed: {e} would train otherwise there ("
                              + "; ".join(diff) + f"); only {', '.join(EVAL_ONLY_KEYS)} may differ")
    return other
