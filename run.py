"""Run one v4lab experiment: `python run.py +experiment=no_vvpa [key=value ...]`.

Composes conf/ with Hydra, trains with Lightning, writes config.yaml, metrics.json and
checkpoints/ into Hydra's run directory (outputs/<study>/<experiment>-s<seed>), and logs
to W&B offline under logs/wandb/. Rerunning the same command resumes from last.ckpt.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from v4lab.data.prepare import DataError
from v4lab.errors import ConfigError
from v4lab.lit import NonFiniteLossError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from v4lab.train import train

    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
