"""Study manifests: named sets of experiments x sweep values x seeds that become one
published table.

A study manifest is ``experiments/<name>.yaml``::

    name: components              # = the file name; W&B group and output folder
    description: leave-one-out from the full model
    experiments: [full, no_engram, no_vvpa, baseline]
    sweep: {chip: [nvidia_h800, ascend_910c]}   # optional: config group or key -> values
    seeds: [0, 1, 2]
    baseline: baseline            # the row every other row is compared with
    metrics: [val/bpb, cost/kv_bytes_per_token]   # the table's columns (v4lab.metrics names)
    overrides: [profile=smoke]    # optional: applied to every run of the study
    equivalence: {val/bpb: 0.02}  # optional: TOST margin per metric ("matches" claims)
    axis: {label: Engram share (%), values: {a0: 0, a50: 50}, log: false}  # optional
    shared_runs: {chip: {bf16_fp8: [nvidia_h800, nvidia_h20]}}  # optional: chips that train alike
    evaluates: recall             # optional: evaluate that study's runs again, no training
    paired: true                  # optional: seed s of every row is a block (same data, same queries)

One table row per experiment and sweep value; its label, e.g. ``full-chip_ascend_910c``
(the experiment, then ``-<axis>_<value>`` per sweep axis, the axis named by the last part of
its key), is also the start of each of its runs' names (``full-chip_ascend_910c-s0``: the
run folder, the DVC stage, the W&B run). Without ``sweep`` a row is just the experiment.
``axis`` places rows on a swept quantity (a number per row, e.g. the share of a budget
when each row is its own experiment) for the report's quality-vs-axis figure.
``shared_runs``, ``evaluates``: runs that a row or study does not train itself
(:mod:`v4lab.studies.sharing`). ``paired``: every row's seed s trains on the same generated
sequences and is scored on the same held-out queries (the probe studies), so the report
compares rows with seed as a block (:func:`v4lab.report.paired.blocked_comparisons`).
:func:`load_study` validates a manifest (errors name the file, the key and the value).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from v4lab.errors import ConfigError
from v4lab.studies.sharing import parse_evaluates, parse_shared_runs

REQUIRED_KEYS = ("name", "experiments", "seeds", "baseline", "metrics")
OPTIONAL_KEYS = ("description", "sweep", "overrides", "equivalence", "axis", "shared_runs", "evaluates",
                 "paired")
# Keys a study sets itself; an override of them would break the run <-> folder mapping.
OWNED_KEYS = ("experiment", "+experiment", "seed", "study", "variant", "hydra.sweep.dir",
              "hydra.sweep.subdir")
SWEEP_VALUE = re.compile(r"[A-Za-z0-9_.-]+")  # readable in a folder, a DVC stage, a table row
SWEEP_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def axis_label(key: str) -> str:
    """How a sweep axis is named in run and row labels: the last part of its key
    (``chip`` -> ``chip``, ``model.attention.sparse.topk`` -> ``topk``)."""
    return key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Run:
    """One run of a study: an experiment at one value of each sweep axis, at a seed."""

    experiment: str
    seed: int
    axes: tuple[tuple[str, str], ...] = ()  # (sweep key, value), in manifest order

    @property
    def variant(self) -> str:
        """What the sweep adds to the experiment's name: ``-<axis>_<value>`` per axis (the
        ``variant`` key of conf/config.yaml, part of the run folder)."""
        return "".join(f"-{axis_label(k)}_{v}" for k, v in self.axes)

    @property
    def row(self) -> str:
        """The run's table row: the experiment and its sweep values."""
        return self.experiment + self.variant

    @property
    def name(self) -> str:
        """The run's folder, DVC stage and W&B run name (``hydra.sweep.subdir`` in
        conf/config.yaml: ``${experiment}${variant}-s${seed}``)."""
        return f"{self.row}-s{self.seed}"

    def overrides(self) -> list[str]:
        """The Hydra overrides that select this run's sweep values and name its folder."""
        return [f"{k}={v}" for k, v in self.axes] + [f"variant={self.variant}"] * bool(self.axes)


@dataclass(frozen=True)
class Axis:
    """The quantity a study's rows are points of: its title, each placed row's value and
    whether it is drawn on a log scale."""

    label: str
    values: dict[str, float]  # row label: value, in manifest order
    log: bool = False


@dataclass
class Study:
    name: str
    experiments: list[str]
    seeds: list[int]
    baseline: str
    metrics: list[str]
    overrides: list[str] = field(default_factory=list)
    description: str = ""
    sweep: dict[str, list[str]] = field(default_factory=dict)  # key: values (as Hydra reads them)
    groups: tuple[str, ...] = ()  # the sweep keys that are config groups (conf/<key>/)
    equivalence: dict[str, float] = field(default_factory=dict)  # metric: TOST margin (> 0)
    axis: Axis | None = None  # the swept quantity the rows are points of (a figure's x)
    shared: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # axis: {class: values}
    evaluates: str | None = None  # the study whose trained runs this one evaluates again
    paired: bool = False  # rows compared with seed as a block (same data and queries per seed)

    def _trained(self, key: str, value: str) -> str:  # whose runs it uses: its class's first
        return next((vs[0] for vs in self.shared.get(key, {}).values() if value in vs), value)

    def source(self, cell: Run) -> Run:
        """The cell whose runs ``cell`` uses: itself, or its class's first (``shared_runs``)."""
        return Run(cell.experiment, cell.seed, tuple((k, self._trained(k, v)) for k, v in cell.axes))

    def source_row(self, row: str) -> str:
        """The row whose runs row ``row`` shows (itself unless it shares runs)."""
        return {c.row: self.source(c).row for c in self.cells()}[row]

    def numerics_class(self, row: str) -> str | None:  # its class in shared_runs, or None
        axes = dict(next(c for c in self.cells() if c.row == row).axes)
        return next((lb for k, cs in self.shared.items() for lb, vs in cs.items() if axes[k] in vs), None)

    def row_runs(self) -> list[Run]:
        """Every (row, seed), rows outer, shared rows included (their runs are their source's)."""
        return [Run(c.experiment, s, c.axes) for c in self.cells() for s in self.seeds]

    def cells(self) -> list[Run]:
        """One seedless run per table row: experiments outer, then the sweep values (the
        first axis outer), in manifest order."""
        combos: list[tuple[tuple[str, str], ...]] = [()]
        for key, values in self.sweep.items():
            combos = [(*c, (key, v)) for c in combos for v in values]
        return [Run(e, -1, c) for e in self.experiments for c in combos]

    def rows(self) -> list[str]:
        """The table's row labels, in order (= the experiments when there is no sweep)."""
        return [c.row for c in self.cells()]

    def runs(self) -> list[Run]:
        """Every run (row, seed), rows outer, in manifest order; rows sharing runs have none."""
        return [r for r in self.row_runs() if self.source(r) == r]

    def multirun_args(self) -> list[str]:
        """The ``run.py -m`` arguments that run the whole study as one Hydra sweep; each job's
        ``variant`` resolves to its own sweep values (a group's choice, or a key's value)."""
        axes = [f"{k}={','.join(v for v in vs if self._trained(k, v) == v)}"
                for k, vs in self.sweep.items()]
        variant = "".join(f"-{axis_label(k)}_${{hydra:runtime.choices.{k}}}" if k in self.groups
                          else f"-{axis_label(k)}_${{{k}}}" for k in self.sweep)
        return ["-m", f"+experiment={','.join(self.experiments)}",
                f"seed={','.join(map(str, self.seeds))}", f"study={self.name}", *axes,
                *[f"variant={variant}"] * bool(self.sweep), *self.overrides]


def find_root(start: Path | None = None) -> Path:
    """The repository root (the folder holding run.py and conf/), from ``start`` upwards."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "run.py").is_file() and (folder / "conf" / "config.yaml").is_file():
            return folder
    raise ConfigError(f"no v4lab checkout (run.py + conf/config.yaml) at or above {here}: "
                      "run this from the repository")


def available_experiments(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "conf" / "experiment").glob("*.yaml"))


def available_studies(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "experiments").glob("*.yaml"))


def _str_list(key: str, value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}={value!r} is not allowed: a non-empty list of {what}")
    return list(value)


def parse_study(data: Any, source: str, root: Path) -> Study:
    """Validate a manifest's contents; every error names the file, the key and the value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a study manifest is a mapping with keys "
                          f"{', '.join(REQUIRED_KEYS)} (optional: {', '.join(OPTIONAL_KEYS)})")
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if unknown or missing:
        problems = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
        raise ConfigError(f"{source}: {'; '.join(problems)} "
                          f"(allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
    name = data["name"]
    if name != Path(source).stem:
        raise ConfigError(f"{source}: name={name!r} is not allowed: the file name, "
                          f"{Path(source).stem!r}")
    experiments = _str_list(f"{source}: experiments", data["experiments"], "experiment names")
    known = available_experiments(root)
    for e in experiments:
        if e not in known:
            raise ConfigError(f"{source}: experiments contains {e!r}, which does not exist "
                              f"(conf/experiment/{e}.yaml); available: {', '.join(known)}")
    seeds = data["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{source}: seeds={seeds!r} is not allowed: a non-empty list of "
                          "non-negative integers")
    for key, values in (("experiments", experiments), ("seeds", seeds)):
        dup = sorted({v for v in values if values.count(v) > 1}, key=str)
        if dup:
            raise ConfigError(f"{source}: {key} lists {dup} more than once: each run "
                              "(experiment, seed) must appear once")
    metrics = _str_list(f"{source}: metrics", data["metrics"], "metrics.json keys")
    overrides = data.get("overrides") or []
    overrides = _str_list(f"{source}: overrides", overrides, "key=value overrides") if overrides else []
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or o.startswith("-") or key.lstrip("~") in OWNED_KEYS:
            raise ConfigError(f"{source}: overrides contains {o!r}, which is not allowed: "
                              "key=value overrides other than "
                              f"{', '.join(OWNED_KEYS)} (the study sets those)")
    sweep, groups = parse_sweep(data.get("sweep"), source, root, overrides)
    description = data.get("description") or ""
    study = Study(name, experiments, list(seeds), data["baseline"], metrics, overrides, str(description),
                  sweep, groups, parse_equivalence(data.get("equivalence"), source, metrics))
    if study.baseline not in study.rows():
        raise ConfigError(f"{source}: baseline={study.baseline!r} is not allowed: one of the study's "
                          f"{'rows' if sweep else 'experiments'} ({', '.join(study.rows())})")
    study.axis = parse_axis(data.get("axis"), source, study.rows())
    study.shared = parse_shared_runs(data.get("shared_runs"), source, sweep)
    study.evaluates = parse_evaluates(data.get("evaluates"), source, root, sweep)
    study.paired = parse_paired(data.get("paired", False), source, study)
    return study


def parse_paired(value: Any, source: str, study: Study) -> bool:
    """A manifest's ``paired``: true or false; not with ``shared_runs`` (rows that are the
    same runs are not blocks of a design)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: paired={value!r} is not allowed: true or false")
    if value and study.shared:
        raise ConfigError(f"{source}: paired=true is not allowed with shared_runs: rows sharing "
                          "runs are the same runs, not paired replications")
    return value


def parse_axis(value: Any, source: str, rows: list[str]) -> Axis | None:
    """A manifest's ``axis``: {label: title, values: {row: number}, log: bool}, each key a row
    of the study and each value a finite number, distinct (one curve through the rows)."""
    if value is None:
        return None
    keys = ("label", "values", "log")
    if not isinstance(value, dict) or not {"label", "values"} <= set(value) or set(value) - set(keys):
        raise ConfigError(f"{source}: axis={value!r} is not allowed: a mapping with keys label "
                          "(the axis title), values ({row: number}) and optionally log (true/false)")
    label, values, log = value["label"], value["values"], value.get("log", False)
    if not isinstance(label, str) or not label.strip():
        raise ConfigError(f"{source}: axis label={label!r} is not allowed: a non-empty title")
    if not isinstance(log, bool):
        raise ConfigError(f"{source}: axis log={log!r} is not allowed: true or false")
    if not isinstance(values, dict) or len(values) < 2:
        raise ConfigError(f"{source}: axis values={values!r} is not allowed: a mapping of at least "
                          "two of the study's rows to numbers, e.g. {alloc_0: 0, alloc_50: 50}")
    out = _number_items(values, source, "axis values", rows, "rows",
                        "a finite number" + (" > 0 (log: true)" if log else ""),
                        (lambda x: x > 0) if log else (lambda x: True))
    dup = sorted({x for x in out.values() if list(out.values()).count(x) > 1})
    if dup:
        raise ConfigError(f"{source}: axis values {out} are not allowed: {dup} given to more than "
                          "one row (one point per value: the figure draws one curve)")
    return Axis(label.strip(), out, log)


def parse_equivalence(value: Any, source: str, metrics: list[str]) -> dict[str, float]:
    """A manifest's ``equivalence``: {metric: margin}, each metric one of ``metrics`` and each
    margin a number > 0 (in the metric's unit: the largest difference that still "matches")."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{source}: equivalence={value!r} is not allowed: a mapping of a metric "
                          "of the study to its equivalence margin, e.g. {val/bpb: 0.02}")
    return _number_items(value, source, "equivalence", metrics, "metrics",
                         "a margin, a finite number > 0 in the metric's unit", lambda x: x > 0)


def _number_items(items: dict, source: str, what: str, allowed: list[str], allowed_name: str,
                  rule: str, ok: Callable[[float], bool]) -> dict[str, float]:
    """{key: float(x)} of a manifest mapping whose keys must be among ``allowed`` (the study's
    ``allowed_name``) and whose values finite numbers passing ``ok``; an error names the
    mapping (``what``), the key or value, and ``rule``."""
    out = {}
    for key, x in items.items():
        if key not in allowed:
            raise ConfigError(f"{source}: {what} key {key!r} is not allowed: one of the study's "
                              f"{allowed_name} ({', '.join(allowed)})")
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or not ok(x):
            raise ConfigError(f"{source}: {what} {key}={x!r} is not allowed: {rule}")
        out[key] = float(x)
    return out


def _key_default(key: str, root: Path) -> Any:
    """The value of ``key`` in the default config; KeyError when it has none."""
    from omegaconf import OmegaConf

    from v4lab.io import compose

    missing = object()
    value = OmegaConf.select(compose([], conf_dir=root / "conf"), key, default=missing)
    if value is missing:
        raise KeyError(key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _check_key_value(where: str, key: str, value: Any, default: Any) -> None:
    """A swept key takes scalars of its default's type (a value Hydra reads back unchanged,
    so that the run's folder name and its config agree)."""
    if isinstance(default, (dict, list)):
        raise ConfigError(f"{where}: {key} is a section, not allowed as a sweep axis: a config "
                          "group (conf/<group>/) or a key with one value")
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    allowed = kinds.get(type(default), (bool, int, float, str))
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{where}: {key} value {value!r} is not allowed: a {type(default).__name__} "
                          f"like the default ({default!r})")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    read = OverridesParser.create().parse_override(f"{key}={value}").value()
    if str(read) != str(value):  # e.g. the string 'true', which Hydra reads as True
        raise ConfigError(f"{where}: {key} value {value!r} is not allowed: Hydra reads {key}={value} "
                          f"as {read!r}, so the run's name and its config would disagree")


def parse_sweep(sweep: Any, source: str, root: Path, overrides: list[str]
                ) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    """A manifest's ``sweep``: {config group or key: [values]}, validated against conf/.
    Returns (key: values as Hydra reads them, the keys that are config groups)."""
    if sweep is None:
        return {}, ()
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{source}: sweep={sweep!r} is not allowed: a mapping of a config group "
                          "or key to a non-empty list of values, e.g. {chip: [nvidia_h800, ascend_910c]}")
    set_by_overrides = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    out: dict[str, list[str]] = {}
    groups = []
    for key, values in sweep.items():
        where = f"{source}: sweep"
        if (not isinstance(key, str) or not SWEEP_KEY.fullmatch(key) or key in OWNED_KEYS
                or key.split(".")[0] in ("hydra", "experiment")):
            raise ConfigError(f"{where} key {key!r} is not allowed: a config group (one of "
                              f"{', '.join(sorted(_groups(root)))}) or a config key such as "
                              f"trainer.lr, other than {', '.join(OWNED_KEYS)} and hydra.*")
        if key in set_by_overrides:
            raise ConfigError(f"{where} key {key!r} is also set in overrides: set it in one place")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {key}={values!r} is not allowed: a non-empty list of values")
        if key in _groups(root):
            known = sorted(p.stem for p in (root / "conf" / key).glob("*.yaml"))
            for v in values:
                if v not in known:
                    raise ConfigError(f"{where}: {key} value {v!r} does not exist (conf/{key}/{v}.yaml); "
                                      f"available: {', '.join(known)}")
            groups.append(key)
        else:
            try:
                default = _key_default(key, root)
            except KeyError:
                raise ConfigError(f"{where} key {key!r} is neither a config group (one of "
                                  f"{', '.join(sorted(_groups(root)))}) nor a key of the config "
                                  "(conf/config.yaml and its defaults)") from None
            for v in values:
                _check_key_value(where, key, v, default)
        strings = [str(v) for v in values]
        for v in strings:
            if not SWEEP_VALUE.fullmatch(v):
                raise ConfigError(f"{where}: {key} value {v!r} is not allowed: letters, digits, "
                                  "'_', '.' and '-' only (it is part of run folder names)")
        dup = sorted({v for v in strings if strings.count(v) > 1})
        if dup:
            raise ConfigError(f"{where}: {key} lists {dup} more than once: each run must appear once")
        out[key] = strings
    labels = [axis_label(k) for k in out]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"{source}: sweep keys {list(out)} are not allowed together: two end in "
                          "the same name, which labels the runs")
    return out, tuple(groups)


def _groups(root: Path) -> set[str]:
    """The config groups a sweep may select (conf/<group>/; not experiment or hydra)."""
    return {p.name for p in (root / "conf").iterdir()
            if p.is_dir() and p.name not in ("experiment", "hydra") and not p.name.startswith(".")}


def load_study(name_or_path: str, root: Path | None = None) -> Study:
    """``experiments/<name>.yaml`` (or a path to a manifest), validated."""
    root = root or find_root()
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = root / "experiments" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"study {name_or_path!r} does not exist ({path}); available: "
                          f"{', '.join(available_studies(root)) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return parse_study(data, str(path), root)
