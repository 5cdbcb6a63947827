"""Launching a study: one Hydra multirun (``run.py -m``) that Hydra's launchers run one
after another (``basic``), in parallel on this machine (``local``, joblib) or as a SLURM
job array (``slurm``, submitit)."""

from __future__ import annotations

import sys

from v4lab.errors import ConfigError
from v4lab.studies.manifests import Study

LAUNCHERS = ("basic", "local", "slurm")


def multirun_command(study: Study, launcher: str = "basic", extra: list[str] | None = None) -> list[str]:
    """The command that runs ``study`` as one Hydra multirun with ``launcher``."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher={launcher!r} is not allowed: one of {', '.join(LAUNCHERS)}")
    if study.evaluates:
        raise ConfigError(f"study {study.name!r} trains nothing: it evaluates study "
                          f"{study.evaluates!r}'s runs again (dvc repro {study.name}, or per run "
                          "python -m v4lab.probe_run --source RUN --out DIR [overrides])")
    owned = ("experiment", "seed", "study", "variant", *study.sweep)
    for o in extra or []:
        if o.split("=", 1)[0].lstrip("+~") in owned:
            raise ConfigError(f"override {o!r} is not allowed: the study sets {', '.join(owned)} "
                              "(write another study manifest instead)")
    launch = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    return [sys.executable, "run.py", *study.multirun_args(), *launch, *(extra or [])]
