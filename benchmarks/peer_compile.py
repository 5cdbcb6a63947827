"""Does torch.compile close the training-step gap? v4lab vs transformers, eager and compiled.

    PYTHONPATH=src python3 benchmarks/peer_compile.py [--threads 1] [--repeats 5]

Same models, weights, batch and step as ``benchmarks/peer_speed.py`` (fp32, forward +
backward of the LM loss at its default config: hidden 256, 4 layers, 16 routed experts
top-4, batch 8 x 512 unless ``--batch``/``--seq`` say otherwise). Each model is also
wrapped in ``torch.compile`` (inductor, default mode); the first call of each compiled
model compiles and is timed separately. Then the four variants alternate run by run and
the medians are compared: speed-ups against eager transformers and against compiled
transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import common
import peer_speed as ps
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "reports/perf_compile.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg, hf, v4 = ps.default_pair(seq=a.seq)
    hf.train(), v4.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab, (a.batch, cfg.seq), generator=g)
    y = torch.randint(0, cfg.vocab, (a.batch, cfg.seq), generator=g)
    # A compiled module wraps the original one: dispatch on what it wraps.
    ps.is_hf = lambda m: not isinstance(getattr(m, "_orig_mod", m), ps.Transformer)
    models = {"transformers": hf, "v4lab": v4}
    compile_s = {}
    for name in list(models):
        t0 = time.perf_counter()
        compiled = torch.compile(models[name])
        ps.train_step(compiled, x, y, False)
        compile_s[name] = time.perf_counter() - t0
        models[f"{name} (torch.compile)"] = compiled
        print(f"compiled {name}: first step {compile_s[name]:.1f} s", flush=True)
    load0 = os.getloadavg()
    times = {n: [] for n in models}
    for rep in range(a.repeats + 1):  # round 0 warms up
        for name, m in models.items():
            dt = ps.train_step(m, x, y, False)
            if rep:
                times[name].append(dt)
        print(f"round {rep}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    lines = ps.report_header(
        "torch.compile and the training step: v4lab vs transformers",
        f"PYTHONPATH=src python3 benchmarks/peer_compile.py --threads {a.threads} --repeats {a.repeats}"
        + ("" if (a.batch, a.seq) == (8, 512) else f" --batch {a.batch} --seq {a.seq}"),
        a.threads, load0, os.getloadavg())
    lines += [
        f"- batch {a.batch} x {a.seq}; compile time (first step of each compiled model): transformers "
        f"{compile_s['transformers']:.0f} s, v4lab {compile_s['v4lab']:.0f} s",
        "", f"Median of {a.repeats} alternating runs after a warm-up round:", "",
        "| implementation | s / step | tokens/s | min-max s | vs eager transformers "
        "| vs compiled transformers |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {med[name]:.3f} | {x.numel() / med[name]:,.0f} | {min(t):.3f}-{max(t):.3f} "
                     f"| {med['transformers'] / med[name]:.2f}x "
                     f"| {med['transformers (torch.compile)'] / med[name]:.2f}x |")
    common.publish(a.out, lines)


if __name__ == "__main__":
    main()
