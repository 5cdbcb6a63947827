"""Runs a study does not train itself: a manifest's ``shared_runs`` (rows sharing another
row's runs) and ``evaluates`` (another study's runs evaluated again), parsed and validated.

Chips that train with the same numerics (matmul dtype, effective KV-cache dtype after the
chip's fallback) train bit for bit alike, so training each of them again only repeats a
run. A swept study says which values of its ``chip`` axis train alike::

    sweep: {chip: [nvidia_h800, nvidia_h20, ascend_910b, ascend_910c, cpu_host]}
    shared_runs:
      chip:                      # numerics class: its chips (the first one is trained)
        bf16_fp8: [nvidia_h800, nvidia_h20]
        bf16_int8: [ascend_910b, ascend_910c]
        fp32_fp8: [cpu_host]

Each class is trained once per seed, on its first chip; the table still has one row per
chip, whose measured columns come from its class's runs and whose ``chip/*`` figures
(numerics, projections) are computed for that chip (:mod:`v4lab.studies.classes`, which
also checks, by composing the real configs, that the classes are what the code trains).
Only the ``chip`` axis may share runs: a chip's own figures are analytic, so a row without
runs of its own can still have them; any other swept value changes what a run measures.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from v4lab.errors import ConfigError

SHARED_AXES = ("chip",)  # axes whose rows can have their own figures without their own runs
CLASS_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


def parse_shared_runs(value: Any, source: str, sweep: dict[str, list[str]]
                      ) -> dict[str, dict[str, list[str]]]:
    """A manifest's ``shared_runs``: {axis: {class label: [values]}}, the axis one of
    :data:`SHARED_AXES` and swept, every swept value in exactly one class."""
    if value is None:
        return {}
    example = "{chip: {bf16_fp8: [nvidia_h800, nvidia_h20], fp32_fp8: [cpu_host]}}"
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{source}: shared_runs={value!r} is not allowed: a mapping of a swept "
                          f"axis to its classes of values that train alike, e.g. {example}")
    out = {}
    for axis, classes in value.items():
        if axis not in SHARED_AXES or axis not in sweep:
            raise ConfigError(f"{source}: shared_runs key {axis!r} is not allowed: a swept axis "
                              f"among {', '.join(SHARED_AXES)} (only a chip's own figures can be "
                              "computed for a row without runs of its own)")
        out[axis] = _classes(axis, classes, source, sweep[axis], example)
    return out


def _classes(axis: str, classes: Any, source: str, swept: list[str], example: str
             ) -> dict[str, list[str]]:
    where = f"{source}: shared_runs {axis}"
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(f"{where}={classes!r} is not allowed: a mapping of a class label to "
                          f"the {axis} values in it, e.g. {example}")
    seen: dict[str, str] = {}
    out = {}
    for label, values in classes.items():
        if not isinstance(label, str) or not CLASS_LABEL.fullmatch(label):
            raise ConfigError(f"{where} class {label!r} is not allowed: a label of letters, "
                              "digits, '_', '.' and '-'")
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, str) for v in values)):
            raise ConfigError(f"{where} {label}={values!r} is not allowed: a non-empty list of "
                              f"{axis} values of the sweep ({', '.join(swept)})")
        for v in values:
            if v not in swept:
                raise ConfigError(f"{where} {label} contains {v!r}, which is not allowed: one of "
                                  f"the swept values ({', '.join(swept)})")
            if v in seen:
                raise ConfigError(f"{where}: {v!r} is in classes {seen[v]!r} and {label!r}: each "
                                  "value trains in one class")
            seen[v] = label
        out[label] = list(values)
    unplaced = [v for v in swept if v not in seen]
    if unplaced:
        raise ConfigError(f"{where}: {unplaced} are in no class: every swept value is in one "
                          "(a class of its own when nothing trains like it)")
    return out


def parse_evaluates(value: Any, source: str, root: Path, sweep: dict[str, list[str]]) -> str | None:
    """A manifest's ``evaluates``: the name of another study whose trained probe runs (same
    experiment and seed) this study evaluates again with its own evaluation settings,
    without training (e.g. ``kv_cache`` decodes ``recall``'s weights with other caches).
    :func:`v4lab.studies.classes.check_evaluates` checks the configs against each other."""
    if value is None:
        return None
    name = Path(source).stem
    if not isinstance(value, str) or value == name or not (root / "experiments" / f"{value}.yaml").is_file():
        raise ConfigError(f"{source}: evaluates={value!r} is not allowed: the name of another study "
                          "(experiments/<name>.yaml) whose runs this study evaluates again")
    if sweep:
        raise ConfigError(f"{source}: evaluates={value!r} is not allowed with a sweep: an evaluating "
                          "study's runs are the other study's experiments and seeds")
    return value
