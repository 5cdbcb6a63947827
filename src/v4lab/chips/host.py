"""Host timing: this machine's matmul peaks and copy bandwidth (the ``cpu_host`` profile).

:func:`measure_host` times fp32 / bf16 matrix products and a tensor copy (~3 s) and caches
the result in ``~/.cache/v4lab/host_peaks.json`` (``V4LAB_CACHE_DIR`` overrides), keyed by
CPU model, torch version and thread count. Each record says when it was measured and how
loaded the machine was then. A cached record is measured again when it is older than
``MAX_AGE_DAYS`` or has no load record, and when it was measured under load (more than
``MAX_LOAD_PER_CORE`` of other work per core) and the machine is quiet now. While the
machine stays busy the record measured under load is used (timing again would only give
another loaded figure), and every figure and projection resting on it is marked low
confidence (:func:`peaks_confidence`).

:func:`matmul_flops` is the project's one matmul timer (the benchmarks use it through
``benchmarks/common.py``).
"""

from __future__ import annotations

import calendar
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from v4lab.io import atomic_write_json
from v4lab.threads import busy_cpus, usable_cpus

MAX_AGE_DAYS = 30.0
MAX_LOAD_PER_CORE = 0.5
_WHEN_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def host_cache_path() -> Path:
    root = os.environ.get("V4LAB_CACHE_DIR") or Path.home() / ".cache" / "v4lab"
    return Path(root) / "host_peaks.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def host_key() -> str:
    return f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


# ---- timers -------------------------------------------------------------------------------
def matmul_flops(dtype: torch.dtype, n: int = 1024, budget_s: float = 1.0) -> float:
    """Achieved FLOP/s of an [n, n] @ [n, n] product in ``dtype`` at the current thread
    count: the best of repeated timings within ``budget_s`` seconds, after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up
    best, t_end = float("inf"), time.perf_counter() + budget_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def copy_bandwidth(nbytes: int, budget_s: float) -> float:
    """Achieved memory bandwidth (bytes/s) of a tensor copy: read + write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best, t_end = float("inf"), time.perf_counter() + budget_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


# ---- load ---------------------------------------------------------------------------------
def load_now() -> tuple[float, float, float]:
    """(other runnable processes now, CPUs this process may use, other work per CPU), from
    :mod:`v4lab.threads` (the same reading the thread policy uses; this process is left
    out, so a quiet machine reads 0 whatever its core count)."""
    busy, cpus = busy_cpus(), usable_cpus()
    return busy, cpus, busy / cpus


def _measure() -> dict[str, Any]:
    load, cores, per_core = load_now()
    m = {
        "cpu": _cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "when": time.strftime(_WHEN_FORMAT, time.gmtime()),
        "fp32_tflops": matmul_flops(torch.float32, 1024, 1.0) / 1e12,
        "bf16_tflops": matmul_flops(torch.bfloat16, 1024, 1.0) / 1e12,
        "mem_tbps": copy_bandwidth(256 << 20, 1.0) / 1e12,
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
    }
    # the busier of before and after: a load that came or went while timing counts
    per_core = max(per_core, load_now()[2])
    return m | {"busy_cpus": load, "cores": cores, "load_per_core": per_core}


# ---- the cache ------------------------------------------------------------------------------
def age_days(m: dict[str, Any], now: float | None = None) -> float | None:
    """Days since the record ``m`` was measured (None when its time cannot be read)."""
    try:
        when = calendar.timegm(time.strptime(str(m.get("when")), _WHEN_FORMAT))
    except ValueError:
        return None
    return ((time.time() if now is None else now) - when) / 86400


def under_load(m: dict[str, Any]) -> bool:
    """Whether ``m`` was measured while other work took more than MAX_LOAD_PER_CORE per
    core (a record without a load figure counts as loaded: nobody knows)."""
    per_core = m.get("load_per_core")
    return not isinstance(per_core, (int, float)) or per_core > MAX_LOAD_PER_CORE


def remeasure_reason(m: dict[str, Any], load_per_core: float, now: float | None = None) -> str:
    """Why the cached record ``m`` should be timed again ('' = it is good to use), given
    the machine's load per core now."""
    age = age_days(m, now)
    if age is None or age > MAX_AGE_DAYS:
        return f"older than {MAX_AGE_DAYS:g} days (measured {m.get('when')})"
    if not isinstance(m.get("load_per_core"), (int, float)):
        return "no load record"
    if under_load(m) and load_per_core <= MAX_LOAD_PER_CORE:
        return (f"measured under load ({m['load_per_core']:.2f} per core), the machine is "
                f"quiet now ({load_per_core:.2f})")
    return ""


def peaks_confidence(m: dict[str, Any]) -> tuple[str, str]:
    """(confidence, caveat for the source) of figures from the record ``m``: ``low`` when
    it was measured under load, else ``medium`` (a one-off timing on a shared machine)."""
    if under_load(m):
        per_core = m.get("load_per_core")
        load = f"{per_core:.2f} per core" if isinstance(per_core, (int, float)) else "unknown"
        return "low", f" under load ({load} > {MAX_LOAD_PER_CORE:g}: peaks may be low)"
    return "medium", ""


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def measure_host(refresh: bool = False) -> dict[str, Any]:
    """This host's peaks (fp32/bf16 matmul TFLOP/s, copy bandwidth TB/s, memory GB) with
    when and under what load they were timed: the cached record for this CPU, torch
    version and thread count, timed again (~3 s) when there is none, ``refresh`` is set or
    :func:`remeasure_reason` says so."""
    path, key = host_cache_path(), host_key()
    cache = _read_cache(path)
    cached = cache.get(key)
    if not refresh and isinstance(cached, dict) and not remeasure_reason(cached, load_now()[2]):
        return cached
    cache[key] = _measure()
    atomic_write_json(path, cache, indent=1, sort_keys=True)
    return cache[key]
