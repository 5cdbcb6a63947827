"""What keeping freed memory in the process (``v4lab.allocator``) buys a training step.

    PYTHONPATH=src python benchmarks/allocator.py [--rounds 10] [--steps 3] [--publish NAME]

The model is built once, with glibc's default malloc (this script sets
``V4LAB_SYSTEM_MALLOC`` before v4lab is imported), and warmed up. Then, round after round,
the process forks one child per policy, in alternating order: ``glibc default`` steps on as
it is; ``retain`` first calls :func:`v4lab.allocator.retain_freed_memory`. Each child runs
one untimed step and ``--steps`` timed ones (``common.training_step``, one thread) and
reports its median step time, minor page faults per step and peak resident memory. Both
start from the same heap, so the rounds are paired; the table gives medians over rounds
and the paired ratio. A square fp32 GEMM burst (``common.matmul_flops``) runs in the parent
every round, for the model FLOP utilisation (MFU) of each.
"""

from __future__ import annotations

import os

os.environ["V4LAB_SYSTEM_MALLOC"] = "1"  # the parent keeps glibc's defaults (see above)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import common  # noqa: E402
import piece_cost  # noqa: E402
import torch  # noqa: E402

from v4lab.allocator import retain_freed_memory  # noqa: E402
from v4lab.io import git_rev  # noqa: E402

POLICIES = ("glibc default", "retain")


def child(step, policy: str, steps: int) -> dict:
    """In a forked child: apply ``policy``, step, and measure."""
    if policy == "retain" and not retain_freed_memory({}):
        raise RuntimeError("retain_freed_memory did not apply (not glibc?)")
    step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"s": statistics.median(times), "faults": (use.ru_minflt - f0) / steps,
            "rss_mib": use.ru_maxrss / 1024}


def forked(step, policy: str, steps: int) -> dict:
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into the parent's loop
        code = 1
        try:
            os.write(wr, json.dumps(child(step, policy, steps)).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(wr)
    with os.fdopen(rd) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not out:
        raise RuntimeError(f"the {policy!r} child failed (wait status {status})")
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child")
    ap.add_argument("--experiments", nargs="+", default=["full", "baseline"])
    ap.add_argument("--publish", default="", metavar="NAME", help="write benchmarks/results/NAME.md")
    a = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    models = {e: piece_cost.build(e, []) for e in a.experiments}
    for step, _, _ in models.values():
        step(), step()
    res = {(e, p): [] for e in a.experiments for p in POLICIES}
    rates = []
    for r in range(a.rounds):
        for e, (step, _, _) in models.items():
            for p in (POLICIES if r % 2 == 0 else POLICIES[::-1]):
                res[e, p].append(forked(step, p, a.steps))
        rates.append(common.matmul_flops(torch.float32, budget_s=0.5))
    report(a, models, res, statistics.median(rates), (load0, os.getloadavg()[0]))


def report(a, models, res, rate: float, load: tuple[float, float]) -> None:
    t = next(iter(models.values()))[2]
    lines = [
        "# Keeping freed memory in the process: training step with and without `v4lab.allocator`",
        "",
        f"Command: `PYTHONPATH=src python benchmarks/allocator.py --rounds {a.rounds} "
        f"--steps {a.steps}"
        f"{' --experiments ' + ' '.join(a.experiments) if a.experiments != ['full', 'baseline'] else ''}"
        f"` (code at git {git_rev()})",
        "",
        f"- torch {torch.__version__}, 1 thread, {torch.backends.cpu.get_cpu_capability()}; "
        f"batch {t.batch_size} x {t.seq_len}; {a.rounds} rounds, each forks one child per "
        f"policy (alternating order) from the same warmed-up process, {a.steps} timed steps "
        f"each; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end",
        f"- measured fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s (median over rounds)",
        "",
        "| experiment | malloc policy | ms / step | MFU | minor page faults / step | "
        "peak RSS, MiB | default / retain, paired (median, min-max) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for e, (_, flops, _) in models.items():
        ratios = [d["s"] / k["s"] for d, k in zip(res[e, POLICIES[0]], res[e, POLICIES[1]])]
        for p in POLICIES:
            s = statistics.median(x["s"] for x in res[e, p])
            cell = "—" if p == POLICIES[0] else \
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            lines.append(
                f"| {e} | {p} | {s * 1e3:.1f} | {flops / s / rate:.1%} | "
                f"{statistics.median(x['faults'] for x in res[e, p]):,.0f} | "
                f"{max(x['rss_mib'] for x in res[e, p]):,.0f} | {cell} |")
    lines += ["", "Values are the same under both policies "
              "(`tests/test_allocator.py`: the full model trains bit-identically)."]
    common.publish_result(a.publish, lines)


if __name__ == "__main__":
    main()
