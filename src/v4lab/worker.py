"""A DDP worker process: ``python -m v4lab.worker RUN_DIR``.

Started by :class:`v4lab.distributed.RunScriptLauncher` for every local rank but the
first; it loads the run's saved ``config.yaml`` and calls the same :func:`v4lab.train.train`
as ``run.py``. Kept apart from ``distributed`` so that ``train`` may import
``distributed`` without a cycle.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from v4lab.config import load_run_config
from v4lab.train import train


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m v4lab.worker RUN_DIR`` (started by the launcher)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or "LOCAL_RANK" not in os.environ:
        print("usage: python -m v4lab.worker RUN_DIR (started by v4lab's DDP launcher, "
              "with LOCAL_RANK set; not meant to be run by hand)", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    cfg = load_run_config(OmegaConf.load(run_dir / "config.yaml"))
    train(cfg, run_dir, worker=True)  # rank 0 has checked and locked the folder
    return 0


if __name__ == "__main__":
    sys.exit(main())
