"""Study manifests: named sets of experiments x seeds that become one published table.

A study manifest is ``experiments/<name>.yaml``::

    name: components              # = the file name; W&B group and output folder
    description: leave-one-out from the full model
    experiments: [full, no_engram, no_vvpa, baseline]
    seeds: [0, 1, 2]
    baseline: baseline            # the row every other row is compared with
    metrics: [val/bpb, cost/kv_bytes_per_token]   # the table's columns (v4lab.metrics names)
    overrides: [trainer=smoke]    # optional: applied to every run of the study

:func:`load_study` validates one; every error names the file, the key and the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from v4lab.errors import ConfigError

REQUIRED_KEYS = ("name", "experiments", "seeds", "baseline", "metrics")
OPTIONAL_KEYS = ("description", "overrides")
# Keys a study sets itself; an override of them would break the run <-> folder mapping.
OWNED_KEYS = ("experiment", "+experiment", "seed", "study", "hydra.sweep.dir", "hydra.sweep.subdir")


@dataclass(frozen=True)
class Run:
    """One run of a study: an experiment at a seed."""

    experiment: str
    seed: int

    @property
    def name(self) -> str:
        """The run's folder and W&B run name (``hydra.sweep.subdir`` in conf/config.yaml)."""
        return f"{self.experiment}-s{self.seed}"


@dataclass
class Study:
    name: str
    experiments: list[str]
    seeds: list[int]
    baseline: str
    metrics: list[str]
    overrides: list[str] = field(default_factory=list)
    description: str = ""

    def runs(self) -> list[Run]:
        """Every (experiment, seed), experiments outer, in manifest order."""
        return [Run(e, s) for e in self.experiments for s in self.seeds]

    def multirun_args(self) -> list[str]:
        """The ``run.py -m`` arguments that run the whole study as one Hydra sweep."""
        return ["-m", f"+experiment={','.join(self.experiments)}",
                f"seed={','.join(map(str, self.seeds))}", f"study={self.name}", *self.overrides]


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
    baseline = data["baseline"]
    if baseline not in experiments:
        raise ConfigError(f"{source}: baseline={baseline!r} is not allowed: one of the study's "
                          f"experiments ({', '.join(experiments)})")
    metrics = _str_list(f"{source}: metrics", data["metrics"], "metrics.json keys")
    overrides = data.get("overrides") or []
    overrides = _str_list(f"{source}: overrides", overrides, "key=value overrides") if overrides else []
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or o.startswith("-") or key.lstrip("~") in OWNED_KEYS:
            raise ConfigError(f"{source}: overrides contains {o!r}, which is not allowed: "
                              "key=value overrides other than "
                              f"{', '.join(OWNED_KEYS)} (the study sets those)")
    description = data.get("description") or ""
    return Study(name, experiments, list(seeds), baseline, metrics, overrides, str(description))


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
