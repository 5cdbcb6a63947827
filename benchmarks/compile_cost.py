"""Would a ``trainer.compile`` option pay? Each block under torch.compile against eager.

    PYTHONPATH=src python benchmarks/compile_cost.py [--seconds 90] [--run-steps 40] [--publish NAME]
        [overrides...] [--experiments full baseline]

Issue 17 asks to consider compiling each block (inductor, default mode) as a measured,
opt-in ``trainer.compile``, with the cold-compile time reported. For each experiment, at one
thread, at the ``cpu`` profile's batch (8 x 256) unless overridden:

1. **What compiling costs.** A child process compiles every block and takes one training
   step in an empty inductor cache (cold: the first run on a machine), then a second child
   does the same with the cache the first one left (warm: every later run of a study). Each
   child also counts the graphs and graph breaks dynamo made.
2. **What it saves.** An eager and a compiled copy of the model, built with the same seed
   (same weights), take training steps in turns (``common.training_step``); paired ratios
   eager / compiled, median and range over rounds, and the MFU of each against the fp32
   matmul rate measured beside them (``common.matmul_flops``).
3. **Whether it changes the numbers.** The first forward's logits and loss, eager against
   compiled, before either takes a step.
4. **A run, start to end.** A run's step counter moves every step and crosses the sparse
   warm-up once, and the MoE's expert loads change as it learns; dynamo guards on such
   values and may compile again. So a child process takes ``--run-steps`` steps (step 0,
   1, ..., the sparse warm-up ending half-way) from a fresh model, eager, then another does
   it compiled from the warm cache: wall time of each, compile included, and the graphs
   dynamo compiled on the way.

``--publish NAME`` writes benchmarks/results/NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common
import piece_cost
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from v4lab.io import git_rev
from v4lab.modules.context import ForwardContext

STEP = common.PAST_WARMUP


def compile_blocks(lit) -> None:
    """Wrap each decoder block in torch.compile (inductor, default mode), in place."""
    blocks = lit.model.blocks
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block)


def first_step(experiment: str, overrides: list[str]) -> dict:
    """Child process: compile the blocks and time the first training step (compile
    included); dynamo's graph and break counts."""
    lit, opt, batch, _, _ = piece_cost.build_lit(experiment, overrides)
    compile_blocks(lit)
    t0 = time.perf_counter()
    common.training_step(lit, opt, batch)()
    breaks = {reason.splitlines()[0]: n for reason, n in counters["graph_break"].items()}
    return {"first_s": time.perf_counter() - t0, "graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(breaks.values()), "break_reasons": sorted(breaks)}


def run_steps(experiment: str, overrides: list[str], n: int, compiled: bool) -> dict:
    """Child process: steps 0 .. n - 1 of a fresh model, the sparse warm-up ending at n // 2
    (compile included when ``compiled``): wall time and the graphs dynamo compiled."""
    lit, opt, batch, _, _ = piece_cost.build_lit(
        experiment, [*overrides, f"model.attention.sparse.warmup_steps={n // 2}"])
    if compiled:
        compile_blocks(lit)
    t0 = time.perf_counter()
    for step in range(n):
        common.training_step(lit, opt, batch, step=step)()
    return {"wall_s": time.perf_counter() - t0, "graphs": counters["stats"]["unique_graphs"]}


def child(cache: str, *args: str) -> dict:
    """Run this script with ``args`` in a fresh process on the inductor cache ``cache``."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def logits_and_loss(lit, batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[:, :-1], batch[:, 1:]
    ctx = ForwardContext(positions=torch.arange(x.shape[1]), input_ids=x, step=STEP,
                         phase="train")
    logits = lit.model(x, ctx)  # grad mode on: the same compiled graph as training
    return logits.detach(), F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            y.reshape(-1)).detach()


def measure(experiment: str, overrides: list[str], seconds: float, n_run: int, cache: str) -> dict:
    cold, warm = (child(cache, "--child", "first", experiment, *overrides) for _ in range(2))
    run = {kind: child(cache, "--child", f"run{n_run}-{kind}", experiment, *overrides)
           for kind in ("eager", "compiled")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # this process compiles from the warm cache
    eager, opt_e, batch, flops, t = piece_cost.build_lit(experiment, overrides)
    comp, opt_c, _, _, _ = piece_cost.build_lit(experiment, overrides)
    compile_blocks(comp)
    (le, lose), (lc, losc) = logits_and_loss(eager, batch), logits_and_loss(comp, batch)
    numerics = {"logits_max_abs": (le - lc).abs().max().item(),
                "logits_scale": le.abs().max().item(), "loss_abs": (lose - losc).abs().item()}
    steps = {"eager": common.training_step(eager, opt_e, batch),
             "compiled": common.training_step(comp, opt_c, batch)}
    for step in steps.values():
        step(), step()  # warm-up
    times, rates = {k: [] for k in steps}, []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
        rates.append(common.matmul_flops(torch.float32, budget_s=0.5))
    return {"cold": cold, "warm": warm, "run": run, "numerics": numerics, "times": times,
            "rate": statistics.median(rates), "flops": flops, "t": t}


def rows(experiment: str, m: dict) -> tuple[str, str, str]:
    e, c = (statistics.median(m["times"][k]) for k in ("eager", "compiled"))
    ratios = [a / b for a, b in zip(m["times"]["eager"], m["times"]["compiled"])]
    cost = (f"| {experiment} | {m['cold']['first_s']:.0f} | {m['warm']['first_s']:.1f} | "
            f"{m['cold']['graphs']} | {m['cold']['breaks']} | "
            f"{'; '.join(m['cold']['break_reasons']) or '—'} |")
    speed = (f"| {experiment} | {e * 1e3:.1f} | {c * 1e3:.1f} | {statistics.median(ratios):.3f} "
             f"({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds) | "
             f"{m['flops'] / e / m['rate']:.1%} | {m['flops'] / c / m['rate']:.1%} |")
    n, run = m["numerics"], m["run"]
    other = (f"| {experiment} | {n['logits_max_abs']:.2e} (of max {n['logits_scale']:.2f}) | "
             f"{n['loss_abs']:.2e} | {run['eager']['wall_s']:.1f} | {run['compiled']['wall_s']:.1f} | "
             f"{run['eager']['wall_s'] / run['compiled']['wall_s']:.2f} | "
             f"{run['compiled']['graphs']} |")
    return cost, speed, other


def report(a, results: dict, load: tuple[float, float]) -> list[str]:
    t = next(iter(results.values()))["t"]
    rate = statistics.median(m["rate"] for m in results.values())
    table = {experiment: rows(experiment, m) for experiment, m in results.items()}
    lines = [
        "# torch.compile per block: what it costs and what it saves in a training step", "",
        f"Command: `PYTHONPATH=src python benchmarks/compile_cost.py --seconds {a.seconds:g} "
        f"--run-steps {a.run_steps} "
        f"{' '.join(a.overrides) + ' ' if a.overrides else ''}--experiments {' '.join(a.experiments)}`"
        f" (code at git {git_rev()})", "",
        f"- {common.host_key()}, {torch.backends.cpu.get_cpu_capability()}; batch "
        f"{t.batch_size} x {t.seq_len}; inductor, default mode, each block compiled; load average "
        f"{load[0]:.2f} at the start, {load[1]:.2f} at the end; fp32 matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s", "",
        "## Compiling (the first training step, compile included; separate processes)", "",
        "| experiment | cold cache, s | warm cache, s | graphs | graph breaks | break reasons |",
        "|---|---:|---:|---:|---:|---|",
        *(r[0] for r in table.values()), "",
        "## Steady state (steps in turns, one process)", "",
        "| experiment | eager ms / step | compiled ms / step | eager / compiled, paired median "
        "(range) | MFU eager | MFU compiled |",
        "|---|---:|---:|---|---:|---:|",
        *(r[1] for r in table.values()), "",
        "## Numerics, and a run start to end (separate processes, warm cache)", "",
        "| experiment | first forward logits, max abs diff | loss abs diff | "
        f"{a.run_steps} steps eager, s | {a.run_steps} steps compiled, s | eager / compiled | "
        "graphs compiled in the run |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(r[2] for r in table.values()),
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="time budget of the rounds, each")
    ap.add_argument("--experiments", nargs="+", default=["full", "baseline"])
    ap.add_argument("--publish", default="", metavar="NAME", help="write benchmarks/results/NAME.md")
    ap.add_argument("--run-steps", type=int, default=40, help="steps of the run start to end")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every experiment")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.child:  # first | run<N>-eager | run<N>-compiled, then the experiment
        experiment, *overrides = a.overrides
        if a.child == "first":
            print(json.dumps(first_step(experiment, overrides)))
        else:
            n, kind = a.child[3:].split("-")
            print(json.dumps(run_steps(experiment, overrides, int(n), kind == "compiled")))
        return
    load0 = os.getloadavg()[0]
    results = {}
    for experiment in a.experiments:
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            results[experiment] = measure(experiment, a.overrides, a.seconds, a.run_steps,
                                          cache)
        print(f"{experiment}: done", flush=True)
    common.publish_result(a.publish, report(a, results, (load0, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
