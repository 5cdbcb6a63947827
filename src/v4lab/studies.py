"""Studies: named sets of experiments x seeds that become one published table.

A study manifest is ``experiments/<name>.yaml``::

    name: components              # = the file name; W&B group and output folder
    description: leave-one-out from the full model
    experiments: [full, no_engram, no_vvpa, baseline]
    seeds: [0, 1, 2]
    baseline: baseline            # the row every other row is compared with
    metrics: [val/bpb, cost/kv_bytes_per_token]   # the table's columns (metrics.json keys)
    overrides: [trainer=smoke]    # optional: applied to every run of the study

The same manifest drives every engine: DVC expands it into one stage per run locally,
and this module turns it into one Hydra multirun (``run.py -m``), which Hydra's
launchers run sequentially, in parallel on this machine (``hydra/launcher=local``) or as
a SLURM job array (``hydra/launcher=slurm``)::

    python -m v4lab.studies list
    python -m v4lab.studies run components --launcher slurm hydra.launcher.partition=gpu
    python -m v4lab.studies run smoke --dry-run          # print the command only
    python -m v4lab.studies status components            # which runs have metrics.json

Every run of study ``S`` lands in ``<base>/S/<experiment>-s<seed>/`` with ``<base>``
``multirun`` (a sweep) or ``outputs`` (one run at a time, e.g. a DVC stage), so the
report step finds the runs whichever engine produced them (:func:`collect`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from v4lab.errors import ConfigError

LAUNCHERS = ("basic", "local", "slurm")
RUN_BASES = ("multirun", "outputs")
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


def multirun_command(study: Study, launcher: str = "basic", extra: list[str] | None = None) -> list[str]:
    """The command that runs ``study`` as one Hydra multirun with ``launcher``."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher={launcher!r} is not allowed: one of {', '.join(LAUNCHERS)}")
    for o in extra or []:
        if o.split("=", 1)[0].lstrip("+~") in ("experiment", "seed", "study"):
            raise ConfigError(f"override {o!r} is not allowed: the study sets experiment, seed "
                              "and study (write another study manifest instead)")
    launch = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    return [sys.executable, "run.py", *study.multirun_args(), *launch, *(extra or [])]


def collect(study: Study, root: Path | None = None, bases: tuple[str, ...] = RUN_BASES
            ) -> tuple[dict[str, dict], list[str]]:
    """The runs of ``study`` that finished: ({run name: metrics.json contents}, [missing]).

    Looks in ``<root>/<base>/<study>/<run>/metrics.json`` for each base in order (a sweep,
    then one-at-a-time runs); the first found wins.
    """
    root = root or find_root()
    found: dict[str, dict] = {}
    missing: list[str] = []
    for run in study.runs():
        for base in bases:
            path = root / base / study.name / run.name / "metrics.json"
            if path.is_file():
                found[run.name] = json.loads(path.read_text())
                break
        else:
            missing.append(run.name)
    return found, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m v4lab.studies", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the study manifests in experiments/")
    p_run = sub.add_parser("run", help="run a study as one Hydra multirun")
    p_run.add_argument("study")
    p_run.add_argument("--launcher", default="basic", help=f"one of {', '.join(LAUNCHERS)} "
                       "(basic: one run after another; local: parallel on this machine; slurm: a job array)")
    p_run.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p_run.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    p_status = sub.add_parser("status", help="which runs of a study have a metrics.json")
    p_status.add_argument("study")
    args, unknown = parser.parse_known_args(argv)
    if args.cmd != "run" and unknown or any(u.startswith("-") for u in unknown):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.cmd == "run":
        args.overrides = [*args.overrides, *unknown]
    try:
        root = find_root()
        if args.cmd == "list":
            for name in available_studies(root):
                try:
                    s = load_study(name, root)
                    print(f"{name:16s} {len(s.experiments)} experiments x {len(s.seeds)} seeds"
                          f"  {s.description}")
                except ConfigError as e:
                    print(f"{name:16s} INVALID: {e}")
            return 0
        study = load_study(args.study, root)
        if args.cmd == "status":
            found, missing = collect(study, root)
            print(f"{study.name}: {len(found)}/{len(study.runs())} runs done"
                  + (f"; missing: {', '.join(missing)}" if missing else ""))
            return 0 if not missing else 1
        cmd = multirun_command(study, args.launcher, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(["python", *cmd[1:]]), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd, cwd=root)


if __name__ == "__main__":
    sys.exit(main())
