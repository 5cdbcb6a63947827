"""Run dvc.yaml's training stages N at a time, then let DVC record them.

``dvc repro`` runs stages one after another. The studies pin one thread per run
(conf/trainer/study.yaml), so on an N-core machine N runs can share it; this script runs
the ``train@<study>-<run>`` commands of dvc.yaml exactly as DVC would (same command, same
working directory), N at a time, skipping runs that already have a metrics.json, and
prints each run's wall time. Afterwards::

    dvc commit -f          # record the runs' outputs in dvc.lock (what dvc repro would have)
    dvc repro              # builds the reports; the runs are up to date

    python scripts/run_stages.py --jobs 2 [--study components ...]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def commands(studies: list[str]) -> list[tuple[str, str, Path]]:
    """(stage name, command, run folder) of every training stage of ``studies`` (all: [])."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    out = []
    for name, item in stage["foreach"].items():
        if studies and item["study"] not in studies:
            continue
        cmd = stage["do"]["cmd"]
        for k, v in item.items():
            cmd = cmd.replace(f"${{item.{k}}}", str(v))
        out.append((f"train@{name}", cmd, ROOT / "outputs" / item["study"] / item["run"]))
    return out


def run_one(name: str, cmd: str, log_dir: Path) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    with open(log_dir / f"{name.replace('@', '_')}.log", "w") as log:
        rc = subprocess.call(shlex.split(cmd), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return name, rc, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--study", action="append", default=[])
    parser.add_argument("--logs", default="outputs/stage_logs")
    args = parser.parse_args()
    todo = [(n, c) for n, c, folder in commands(args.study) if not (folder / "metrics.json").is_file()]
    log_dir = ROOT / args.logs
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(todo)} runs to make, {args.jobs} at a time", flush=True)
    t0, failed = time.perf_counter(), []
    with ThreadPoolExecutor(args.jobs) as pool:
        for done in as_completed([pool.submit(run_one, n, c, log_dir) for n, c in todo]):
            name, rc, seconds = done.result()
            print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", flush=True)
            failed += [name] * (rc != 0)
    print(f"done in {time.perf_counter() - t0:.0f} s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
