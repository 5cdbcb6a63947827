"""Run dvc.yaml's stages N at a time, then let DVC record them.

``dvc repro`` runs stages one after another. The studies pin one thread per run
(conf/trainer/study.yaml), so on an N-core machine N runs can share it; this script runs
the ``train@<study>-<run>`` commands of dvc.yaml exactly as DVC would (same command line,
same working directory), N at a time, then the ``evaluate@`` stages (they read trained
runs), skipping runs that already have a metrics.json, then every study's report stage
(``python -m v4lab.report build <study>``, always, one at a time), and prints
each stage's wall time. Afterwards::

    dvc commit -f                  # record every stage's outputs in dvc.lock (what dvc repro would have)
    dvc status                     # "Data and pipelines are up to date."

    python scripts/run_stages.py --jobs 2 [--study components ...] [--no-preload]

Preloading: every run starts by importing torch, Lightning (and torchmetrics, which pulls
in scipy and transformers when they are installed), W&B and Hydra, about 8 s of a 70 s run.
So by default this process imports them once and runs each command in a forked child
(``os.fork``), which executes ``run.py`` / ``python -m <module>`` with the stage's own
arguments as ``__main__``, exactly as the interpreter would. Nothing numerical happens in
the parent (no torch op runs before the fork, so each child starts OpenMP itself with its
own thread count), so a child's metrics are bit-identical to the plain command's; the
rebuild checks that with ``python -m v4lab.report check <study>``. ``--no-preload`` (or a
platform without ``fork``) runs each command as a fresh process instead.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import runpy
import shlex
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# evaluate@ stages read the runs train@ stages make; a study's report reads both
PHASES = ("train", "evaluate", "report")
REPORT = "python -m v4lab.report build "


def commands(studies: list[str], phase: str = "train") -> list[tuple[str, str, Path]]:
    """(stage name, command, run folder) of every ``phase`` stage of ``studies`` (all: []).
    A report stage's folder is None: it is never skipped."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    if phase == "report":
        return [(name, st["cmd"], None) for name, st in stages.items()
                if st.get("cmd", "").startswith(REPORT) and (not studies or name in studies)]
    stage = stages.get(phase)
    out = []
    for name, item in (stage or {}).get("foreach", {}).items():
        if studies and item["study"] not in studies:
            continue
        cmd = stage["do"]["cmd"]
        for k, v in item.items():
            cmd = cmd.replace(f"${{item.{k}}}", str(v))
        out.append((f"{phase}@{name}", cmd, ROOT / "outputs" / item["study"] / item["run"]))
    return out


PRELOAD = {  # what each phase's commands import (see the docstring)
    # v4lab first: importing it sets OMP_WAIT_POLICY, read once when torch loads OpenMP
    "train": ("v4lab", "torch", "hydra", "lightning", "wandb", "v4lab.train", "v4lab.probe_run"),
    "evaluate": (),
    # after every run: polars' and matplotlib's imports never precede a training child
    "report": ("v4lab.report.__main__",),
}


def preload(phase: str = "train") -> None:
    """Import what ``phase``'s commands import, without running any torch op."""
    for module in PRELOAD[phase]:
        importlib.import_module(module)


def _as_main(argv: list[str]) -> int:
    """Run ``python <argv...>`` in this (forked) process: a script path or ``-m module``."""
    sys.path[0] = str(ROOT)  # what the interpreter puts first for `python run.py` / `-m` in ROOT
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  the child reports it in its log, as python would
        traceback.print_exc()
        return 1


def _fork(cmd: str, log: Path) -> int:
    """Start ``cmd`` in a forked child writing to ``log``; return the child's pid."""
    argv = shlex.split(cmd)
    if Path(argv[0]).name not in ("python", "python3"):
        raise SystemExit(f"run_stages: cannot preload {cmd!r}: not a python command (use --no-preload)")
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # a fresh interpreter's streams on the log (the parent's may not be fd 1/2: pytest)
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", closefd=False)  # noqa: SIM115
        os.chdir(ROOT)
        _forget_parent_finalizers()
        code = _as_main(argv[1:])
        atexit._run_exitfuncs()  # what interpreter shutdown would run (W&B, logging)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _forget_parent_finalizers() -> None:
    """Drop, in a child, the exit callbacks that would delete its parent's temporary folders:
    W&B's ``wandb-media`` folder (made at import, removed by an ``atexit`` callback and by
    its ``weakref.finalize``). Run by the first child's exit they would delete it under the
    parent and every later child (whose W&B tables then fail to write)."""
    private = sys.modules.get("wandb.sdk.data_types._private")
    if private is not None:
        atexit.unregister(private.MEDIA_TMP.cleanup)
    for finalizer in list(weakref.finalize._registry):  # the child's copy; all the parent's
        finalizer.detach()


def run_forked(todo: list[tuple[str, str]], jobs: int, log_dir: Path):
    """Yield (stage, exit code, seconds) as forked children finish, ``jobs`` at a time."""
    queue, running = list(todo), {}
    while queue or running:
        while queue and len(running) < jobs:
            name, cmd = queue.pop(0)
            running[_fork(cmd, _log(log_dir, name))] = (name, time.perf_counter())
        pid, status = os.wait()
        name, t0 = running.pop(pid)
        yield name, os.waitstatus_to_exitcode(status), time.perf_counter() - t0


def run_fresh(todo: list[tuple[str, str]], jobs: int, log_dir: Path):
    """Yield (stage, exit code, seconds) of each command run as a fresh process."""
    queue, running = list(todo), {}
    while queue or running:
        while queue and len(running) < jobs:
            name, cmd = queue.pop(0)
            with open(_log(log_dir, name), "w") as log:
                proc = subprocess.Popen(shlex.split(cmd), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = (name, proc, time.perf_counter())
        pid, status = os.wait()
        name, _, t0 = running.pop(pid)
        yield name, os.waitstatus_to_exitcode(status), time.perf_counter() - t0


def _log(log_dir: Path, name: str) -> Path:
    return log_dir / f"{name.replace('@', '_')}.log"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--study", action="append", default=[])
    parser.add_argument("--logs", default="outputs/stage_logs")
    parser.add_argument("--no-preload", action="store_true", help="a fresh process per command")
    args = parser.parse_args()
    preloaded = not args.no_preload and hasattr(os, "fork")
    log_dir = ROOT / args.logs
    log_dir.mkdir(parents=True, exist_ok=True)
    t0, failed = time.perf_counter(), []
    for phase in PHASES:
        todo = [(n, c) for n, c, folder in commands(args.study, phase)
                if folder is None or not (folder / "metrics.json").is_file()]
        if preloaded:
            preload(phase)
        # reports one at a time: each build rewrites the shared index, reports/README.md,
        # from every published table, so two at once could each miss the other's
        jobs = 1 if phase == "report" else args.jobs
        print(f"{phase}: {len(todo)} stages to run, {jobs} at a time"
              f"{', modules preloaded' if preloaded else ''}", flush=True)
        runner = run_forked if preloaded else run_fresh
        for name, rc, seconds in runner(todo, jobs, log_dir):
            print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", flush=True)
            failed += [name] * (rc != 0)
    print(f"done in {time.perf_counter() - t0:.0f} s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
