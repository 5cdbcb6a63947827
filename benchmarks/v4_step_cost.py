"""Training-step cost of mHC and of Muon, as ratios measured side by side (issue 15).

Four variants of the `v4` experiment at the cpu profile's model and batch (MTP off in all
four, so only the residual and the optimizer differ): plain residual + AdamW (the
reference), mHC + AdamW, plain residual + Muon, mHC + Muon. One thread; the variants take
turns step by step (round robin), so machine noise hits all of them alike; the median
step time of each is reported with its ratio to the reference.

    python benchmarks/v4_step_cost.py [--steps 20] [overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "residual + AdamW": ["model.hc.enabled=false", "trainer.optimizer=adamw"],
    "mHC + AdamW": ["trainer.optimizer=adamw"],
    "residual + Muon": ["model.hc.enabled=false"],
    "mHC + Muon": [],
}


def make_step(overrides: list[str]):
    """One training step (forward, backward, optimizer) of the configured model."""
    from v4lab.config import load_run_config
    from v4lab.io import compose
    from v4lab.lit import LitLM

    cfg = load_run_config(compose(["+experiment=v4", "model.mtp.depth=0", *overrides]))
    t = cfg.trainer
    torch.manual_seed(0)
    lit = LitLM(cfg.model, t, torch.ones(cfg.model.vocab_size, dtype=torch.long))
    opt = lit.configure_optimizers()["optimizer"]
    batch = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    step = common.training_step(lit, opt, batch)

    return step, t.batch_size * t.seq_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "v4_step_cost.md"))
    a, overrides = ap.parse_known_args()
    torch.set_num_threads(1)
    steps = {name: make_step([*o, *overrides]) for name, o in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step, _ in steps.values():  # warm-up: one untimed step each
        step()
    for _ in range(a.steps):
        for name, (step, _) in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["residual + AdamW"])
    tokens = next(iter(steps.values()))[1]
    lines = ["# Training-step cost of mHC and Muon (v4 at the cpu profile, MTP off)", "",
             f"torch {torch.__version__}, 1 thread, {torch.backends.cpu.get_cpu_capability()}; "
             f"{tokens} tokens per step; median of {a.steps} steps per variant, taken in turns.", "",
             "| variant | ms / step | tokens/s | vs residual + AdamW |", "|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med * 1e3:.1f} | {tokens / med:,.0f} | {med / ref:.2f}x |")
    common.publish(a.out, lines)


if __name__ == "__main__":
    main()
