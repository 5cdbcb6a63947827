"""Training throughput on a busy machine, with the default thread policy (issue 17).

Runs the README's main job, shortened (``python run.py +experiment=no_vvpa`` at the cpu
profile, ``trainer.max_steps`` steps, no evaluation), three times side by side:

    idle   nothing else running, default policy (trainer.num_threads=auto)
    busy   N bounded busy-loop processes started by this script, default policy
    busy-2 the same load, threads pinned to 2 (what the old default did on 2 cores)

and reports each run's ``speed/train_tokens_per_s`` (read from its metrics.json), the
busy/idle ratio (acceptance: >= 1/3) and the thread count ``auto`` chose. The background
processes stop by themselves after ``--load-seconds`` and are killed in a ``finally``
whatever happens (Ctrl-C included).

    python benchmarks/busy_machine.py                 # 2 busy processes, 60 steps
    python benchmarks/busy_machine.py --busy 3 --steps 40
    python benchmarks/busy_machine.py --steps 3 profile=smoke   # overrides go to every run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]

BUSY_LOOP = "import time\nend = time.time() + {s}\nx = 0\nwhile time.time() < end:\n    x += 1\n"


def start_load(n: int, seconds: float) -> list[subprocess.Popen]:
    """n single-threaded busy loops, each ending by itself after ``seconds``."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(s=seconds)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def train_speed(run_dir: Path, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "run.py", "+experiment=no_vvpa", f"trainer.max_steps={steps}",
           "trainer.warmup_steps=2", f"trainer.val_every_n_steps={steps}", "trainer.val_batches=1",
           "trainer.test_batches=1", f"trainer.checkpoint_every_n_steps={steps}", "tasks=off",
           "logger.mode=disabled", f"hydra.run.dir={run_dir}", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    return {k: m[k] for k in ("speed/train_tokens_per_s", "host/threads", "host/busy_cpus_at_start")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=2, help="busy background processes")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--load-seconds", type=float, default=900.0, help="upper bound on the load's life")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "busy_machine.md"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["idle"] = train_speed(Path(tmp) / "idle", a.steps, a.overrides)
        load = start_load(a.busy, a.load_seconds)
        try:
            rows["busy"] = train_speed(Path(tmp) / "busy", a.steps, a.overrides)
            rows["busy-2"] = train_speed(Path(tmp) / "busy2", a.steps,
                                         [*a.overrides, "trainer.num_threads=2"])
        finally:
            stop_load(load)
    idle = rows["idle"]["speed/train_tokens_per_s"]
    lines = ["# Training throughput on a busy machine", "",
             f"`python run.py +experiment=no_vvpa {' '.join(a.overrides) or 'profile=cpu'}`, "
             f"{a.steps} steps, evaluation off; "
             f"'busy' runs beside {a.busy} single-threaded busy loops on a machine with "
             f"{os.cpu_count()} CPUs. Default policy: `trainer.num_threads=auto`, "
             "`OMP_WAIT_POLICY=PASSIVE`.", "",
             "| run | threads | busy CPUs at start | tokens/s | vs idle |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        v = r["speed/train_tokens_per_s"]
        lines.append(f"| {name} | {r['host/threads']:g} | {r['host/busy_cpus_at_start']:g} | "
                     f"{v:,.0f} | {v / idle:.2f} |")
    ratio = rows["busy"]["speed/train_tokens_per_s"] / idle
    lines += ["", f"busy / idle with the default policy: **{ratio:.2f}** (acceptance: >= 0.33)."]
    common.publish(a.out, lines)


if __name__ == "__main__":
    main()
