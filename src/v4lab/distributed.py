"""Several processes for one run: ranks, the Lightning strategy, and how workers start.

Lightning's own subprocess launcher re-executes the command line that started the run
(``sys.argv``). That is wrong for v4lab in three places: inside a Hydra multirun (the
command line is the whole sweep, ``-m`` included, and Hydra's run dir is not the job's
sweep dir), inside a joblib worker (``sys.argv`` is the worker's), and under pytest. So
v4lab starts the extra local processes itself, from the run's own resolved config: rank 0
writes ``<run_dir>/config.yaml`` before training, and each extra process runs
``python -m v4lab.worker <run_dir>``, which loads that file and calls the same
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
import threading
from pathlib import Path

from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
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


class _Watchdog(threading.Thread):
    """Ends this process (with a message) when a worker dies during the run: the survivors
    would otherwise wait for it in a collective until the process group times out.
    Unlike Lightning's observer it stands down once the run is over or being torn down,
    so a finished or failed run never takes down the process (a sweep, a test) with it."""

    def __init__(self, procs: list[subprocess.Popen], period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.procs, self.period, self.stop = procs, period, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() not in (None, 0) and not self.stop.is_set():
                    print(f"error: DDP worker rank {rank} (pid {proc.pid}) exited with code "
                          f"{proc.returncode}; stopping the run (its log is above)",
                          file=sys.stderr, flush=True)
                    for other in self.procs:
                        if other.poll() is None:
                            other.kill()
                    os._exit(1)


class RunScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, but the workers run ``python -m v4lab.worker
    <run_dir>`` (the run's saved config) instead of re-executing ``sys.argv``, and a
    :class:`_Watchdog` replaces Lightning's process observer."""

    def __init__(self, run_dir: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_dir = Path(run_dir)
        self.watchdog: _Watchdog | None = None

    def launch(self, function, *args, trainer=None, **kwargs):
        # fit, validate and test each come through here; workers start once (afterwards
        # LOCAL_RANK is set, so the environment reports processes as created externally).
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.watchdog = _Watchdog(self.procs)
            self.watchdog.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def kill(self, signum) -> None:
        """Lightning's teardown after Ctrl+C: stand the watchdog down, then end the workers."""
        self.stand_down()
        super().kill(signum)

    def stand_down(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop.set()

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        command = [sys.executable, "-m", "v4lab.worker", str(self.run_dir.resolve())]
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


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own requeue-on-signal. The
    submitit launcher already requeues a run that reaches its time limit
    (``hydra.launcher.max_num_timeout``) and the requeued run resumes from last.ckpt; two
    handlers of the same signal would requeue twice."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def finish_launch(strategy, ok: bool, timeout: float = 120.0) -> None:
    """After a run, in the process that started workers: let them finish (``ok``) or end
    them (the run failed: they would wait for this rank in a collective), then forget the
    launcher's variables so that the next run of a sequential multirun starts clean."""
    import torch.distributed as dist

    launcher = getattr(strategy, "_launcher", None)
    if not isinstance(launcher, RunScriptLauncher) or not launcher.procs:
        return
    launcher.stand_down()
    if dist.is_available() and dist.is_initialized():  # the next run needs a group of its own
        dist.destroy_process_group()
    for proc in launcher.procs:
        if not ok and proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for key in _LAUNCH_ENV:
        os.environ.pop(key, None)
