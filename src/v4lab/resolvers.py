"""The functions ``conf/`` interpolates (``${v4lab.run_name:...}``,
``${v4lab.gpus_per_node:...}``) and :func:`register`, which makes them known to OmegaConf.

Bottom layer: :func:`v4lab.io.compose` and ``run.py`` call :func:`register` before they
compose, so every composition of the project's config (runs, studies, tests) resolves
``hydra.run.dir`` without importing the run configuration.
"""

from __future__ import annotations

from omegaconf import OmegaConf

DEFAULT_STUDY, DEFAULT_PROFILE = "adhoc", "cpu"


def run_name(experiment: str, combine_as: str | None, seed: int, study: str,
             profile: str | None = None, trainer: str | None = None, variant: str = "") -> str:
    """A run's folder name (``hydra.run.dir`` / ``hydra.sweep.subdir`` in conf/config.yaml):
    ``<experiment><variant>-s<seed>``. An ad-hoc run adds its size profile where it is not
    the default ``cpu`` (``no_vvpa-smoke-s0``), and a trainer its profile did not pick
    (``no_vvpa-trainer_ddp_cpu-s0``), so the README's lines never share a folder. A
    study's runs keep ``<experiment><variant>-s<seed>``: its
    manifest fixes their profile, and ``variant`` carries its sweep values."""
    name = (combine_as or experiment) + variant
    if study == DEFAULT_STUDY:
        if profile not in (None, "", DEFAULT_PROFILE):
            name = f"{name}-{profile}"
        if trainer not in (None, "", profile or DEFAULT_PROFILE):  # a trainer the profile did not pick
            name = f"{name}-trainer_{trainer}"
    return f"{name}-s{seed}"


def _run_name(experiment, combine_as, seed, study, profile, trainer, variant="") -> str:
    def opt(v):
        return None if v in (None, "None", "null") else str(v)

    return run_name(str(experiment), opt(combine_as), seed, str(study), opt(profile), opt(trainer),
                    opt(variant) or "")


def _gpus_per_node(accelerator: str, devices: int) -> int:
    """``${v4lab.gpus_per_node:${trainer.accelerator},${trainer.devices}}`` in
    conf/hydra/launcher/slurm.yaml: a CPU trainer asks SLURM for no GPU."""
    return 0 if str(accelerator) == "cpu" else int(devices)


def register() -> None:
    """Make the interpolations known to OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("v4lab.run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("v4lab.gpus_per_node", _gpus_per_node, replace=True)
