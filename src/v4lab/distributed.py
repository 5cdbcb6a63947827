"""Several processes for one run: ranks, the Lightning strategy, and how workers start.

Lightning's own subprocess launcher re-executes the command line that started the run
(``sys.argv``). That is wrong for v4lab in three places: inside a Hydra multirun (the
command line is the whole sweep, ``-m`` included, and Hydra's run dir is not the job's
sweep dir), inside a joblib worker (``sys.argv`` is the worker's), and under pytest. So
v4lab starts the extra local processes itself, from the run's own resolved config: rank 0
writes ``<run_dir>/config.yaml`` before training, and each extra process runs
``python -m v4lab.distributed <run_dir>``, which loads that file and calls the same
:func:`v4lab.train.train`. The environment (``MASTER_ADDR``, ``LOCAL_RANK``, ...) is set
exactly as Lightning's launcher sets it. Where processes are created outside
(SLURM with ``ntasks-per-node = devices``, torchrun), Lightning takes the ranks from the
environment and nothing is launched here.

Only rank 0 writes files (config.yaml, metrics.json, checkpoints) and opens the W&B run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from v4lab.config import TrainerConfig

# Set by the launcher in the process that starts the workers; removed again after the run
# so that the next run of a sequential multirun starts clean.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def global_rank() -> int:
    """This process's rank, from the environment (before any process group exists)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value is not None and (key != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
            return int(value)
    return 0


def is_rank_zero() -> bool:
    return global_rank() == 0


class RunScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, but the workers run ``python -m v4lab.distributed
    <run_dir>`` (the run's saved config) instead of re-executing ``sys.argv``."""

    def __init__(self, run_dir: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_dir = Path(run_dir)

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        command = [sys.executable, "-m", "v4lab.distributed", str(self.run_dir.resolve())]
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=os.getcwd()))


class _RunScriptLaunch:
    """Mixin: use :class:`RunScriptLauncher` where Lightning would use its own."""

    run_dir: Path

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = RunScriptLauncher(self.run_dir, self.cluster_environment,
                                           self.num_processes, self.num_nodes)


class RunDDPStrategy(_RunScriptLaunch, DDPStrategy):
    def __init__(self, run_dir: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir)


class RunFSDPStrategy(_RunScriptLaunch, FSDPStrategy):
    def __init__(self, run_dir: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir)


def make_strategy(t: TrainerConfig, run_dir: Path):
    """The Lightning strategy for ``trainer.strategy`` ('auto' stays Lightning's default)."""
    if t.strategy == "ddp":
        backend = "gloo" if t.accelerator == "cpu" else "nccl"
        return RunDDPStrategy(run_dir, process_group_backend=backend)
    if t.strategy == "fsdp":
        from v4lab.model import Block

        # One FSDP unit per transformer block; a full (gathered) checkpoint so that
        # last.ckpt stays one file that resume, evaluation and reports read alike.
        return RunFSDPStrategy(run_dir, auto_wrap_policy={Block}, state_dict_type="full")
    return "auto"


def finish_launch(strategy, timeout: float = 120.0) -> None:
    """After a run, in the process that started workers: wait for them to exit and forget
    the launcher's variables, so that the next run of a sequential multirun starts clean."""
    launcher = getattr(strategy, "_launcher", None)
    if not isinstance(launcher, RunScriptLauncher) or not launcher.procs:
        return
    for proc in launcher.procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    for key in _LAUNCH_ENV:
        os.environ.pop(key, None)


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m v4lab.distributed RUN_DIR`` (started by the launcher)."""
    from omegaconf import OmegaConf

    from v4lab.config import load_run_config
    from v4lab.train import train

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or "LOCAL_RANK" not in os.environ:
        print("usage: python -m v4lab.distributed RUN_DIR (started by v4lab's DDP launcher, "
              "with LOCAL_RANK set; not meant to be run by hand)", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    cfg = load_run_config(OmegaConf.load(run_dir / "config.yaml"))
    train(cfg, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
