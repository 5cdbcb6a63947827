"""How many threads a CPU run uses: decided from the machine as it is when the run starts.

On a shared machine torch's default (one OpenMP thread per core, busy-waiting between
parallel regions) collapses: with two other busy processes on two cores a 2-thread run
trained ~30x slower than a 1-thread one (OpenMP threads spin waiting for a sibling the
scheduler has parked). So ``trainer.num_threads=auto`` (the default) takes

    usable CPUs = min(CPU affinity, cgroup CPU quota)
    busy CPUs   = other runnable processes right now (``procs_running`` of /proc/stat,
                  median of a few samples, minus this process)
    threads     = max(1, usable - busy), divided among this run's own processes (DDP)

and ``OMP_WAIT_POLICY=PASSIVE`` is set when v4lab is imported (before torch starts
OpenMP) unless the user set it: idle OpenMP threads sleep instead of spinning. A local
sweep (several runs at once) splits the cores the same way: each run sees the others
running. The choice and the load are recorded in metrics.json (``host/*``).

Bottom layer: standard library only (torch is set by the caller).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


def prefer_passive_wait() -> None:
    """Idle OpenMP threads sleep rather than spin (read once, when OpenMP starts)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cpus() -> float:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    cpus = float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") \
        else float(os.cpu_count() or 1)
    quota = cgroup_quota()
    return min(cpus, quota) if quota else cpus


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``)."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 else None
    except (OSError, ValueError):
        return None


def busy_cpus(samples: int = 5, interval: float = 0.02) -> float:
    """Other processes running right now: median of ``procs_running`` minus this one."""
    def running() -> int:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
        raise OSError("no procs_running in /proc/stat")

    try:
        counts = []
        for i in range(samples):
            counts.append(running())
            if i + 1 < samples:
                time.sleep(interval)
        return max(0.0, statistics.median(counts) - 1)
    except OSError:  # not Linux: fall back to the 1-minute load average
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    usable_cpus: float
    busy_cpus: float
    reason: str

    def metrics(self) -> dict[str, float]:
        return {"host/threads": float(self.threads), "host/usable_cpus": self.usable_cpus,
                "host/busy_cpus_at_start": self.busy_cpus}


def choose_threads(requested: int | str, processes: int = 1, *, cpus: float | None = None,
                   busy: float | None = None) -> ThreadChoice:
    """Threads per process for ``trainer.num_threads=requested`` ('auto', 0 = torch's
    default, or a count) when the run has ``processes`` local processes."""
    cpus = usable_cpus() if cpus is None else cpus
    busy = busy_cpus() if busy is None else busy  # recorded whatever the choice
    if requested != "auto":
        n = int(requested)
        return ThreadChoice(n, cpus, busy, "as configured" if n else "torch's default")
    free = max(1, math.floor(cpus - busy + 0.5))
    n = max(1, free // max(1, processes))
    return ThreadChoice(n, cpus, busy, f"auto: {cpus:g} usable CPUs, {busy:g} busy, "
                                       f"{processes} process(es)")
