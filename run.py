"""Run one v4lab experiment: `python run.py +experiment=no_vvpa [key=value ...]`.

Composes conf/ with Hydra, trains with Lightning, writes config.yaml, metrics.json and
checkpoints/ into Hydra's run directory (outputs/<study>/<experiment>-s<seed>, plus the
trainer profile for an ad-hoc run on another profile: outputs/adhoc/no_vvpa-smoke-s0),
and logs to W&B offline under logs/wandb/. Rerunning the same command resumes from
last.ckpt; rerunning a finished run says so and changes nothing (`reevaluate=true`
evaluates it again). A folder refuses a run of another configuration, and one experiment
overlay per run unless the combination is named (`+experiment=[a,b] combine_as=a+b`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from v4lab.config import check_one_experiment
from v4lab.data.prepare import DataError
from v4lab.errors import ConfigError
from v4lab.io import atomic_write_text
from v4lab.lit import NonFiniteLossError
from v4lab.resolvers import register


def save_hydra_record(cfg: DictConfig, hydra_cfg: DictConfig):
    """Hydra's own ``.hydra/`` record (composed config, Hydra config, overrides), written
    once the folder has accepted the run: ``hydra.output_subdir`` is null in conf/config.yaml
    so that a refused run never overwrites the record of the run the folder holds."""

    def write(run_dir: Path) -> None:
        folder = run_dir / ".hydra"
        atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
        atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))

    return write


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from v4lab.folders import RunError
    from v4lab.train import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        check_one_experiment(list(hydra_cfg.overrides.task), cfg.get("combine_as"))
        train(cfg, run_dir, on_start=save_hydra_record(cfg, hydra_cfg))
    except (ConfigError, DataError, NonFiniteLossError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    register()  # hydra.run.dir interpolates ${v4lab.run_name:...}
    main()
