"""Training-step speed against sequence length, v4lab vs transformers, same tokens per batch.

    PYTHONPATH=src python3 benchmarks/peer_seq_sweep.py [--threads 1] [--repeats 3]

The model of ``benchmarks/peer_speed.py`` (hidden 256, 4 layers, 16 routed experts top-4,
fp32, random weights shared by both), one forward + backward of the LM loss on batches of
4,096 tokens: 8 x 512, 4 x 1,024, 2 x 2,048 (and 1 x 4,096 with ``--long``). Per shape the
two implementations alternate run by run; medians after a warm-up round. Where the time
goes as the context grows: the matrix products per token stay the same, attention grows
with the context (v4lab: CPU flash kernel; transformers: its sdpa call falls back to the
math path, which builds the T x T scores, because MLA's q/k and v head widths differ).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import common
import peer_speed as ps
import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_shape(text: str) -> tuple[int, int]:
    """``"8x512"`` -> (8, 512)."""
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not BxT (e.g. 8x512)") from None
    return batch, seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="also 1 x 4096")
    ap.add_argument("--shapes", nargs="+", default=["8x512", "4x1024", "2x2048"], metavar="BxT",
                    help="batch x sequence length of each shape")
    ap.add_argument("--out", default=str(ROOT / "reports/perf_seq.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = [parse_shape(s) for s in a.shapes] + ([(1, 4096)] if a.long else [])
    cfg_args, hf, v4 = ps.default_pair(seq=max(s for _, s in shapes))
    models = {"transformers": hf.train(), "v4lab": v4.train()}
    load0 = os.getloadavg()
    rows = []
    for batch, seq in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg_args.vocab, (batch, seq), generator=g)
        y = torch.randint(0, cfg_args.vocab, (batch, seq), generator=g)
        times = {n: [] for n in models}
        for rep in range(a.repeats + 1):
            for name, m in models.items():
                dt = ps.train_step(m, x, y, False)
                if rep:
                    times[name].append(dt)
        med = {n: statistics.median(t) for n, t in times.items()}
        flops = batch * seq * common.train_flops(v4.cfg, seq)
        rows.append((batch, seq, med, flops))
        print(f"{batch} x {seq}: " + ", ".join(f"{n} {v:.3f}s" for n, v in med.items())
              + f"  ratio {med['transformers'] / med['v4lab']:.2f}x", flush=True)
    shapes_arg = "" if a.shapes == ap.get_default("shapes") else " --shapes " + " ".join(a.shapes)
    tokens = " / ".join(sorted({f"{b * t:,}" for b, t in shapes}))  # one figure by default
    lines = ps.report_header(
        "Training step against sequence length: v4lab vs transformers",
        f"PYTHONPATH=src python3 benchmarks/peer_seq_sweep.py --threads {a.threads} "
        f"--repeats {a.repeats}{shapes_arg}{' --long' if a.long else ''}", a.threads, load0,
        os.getloadavg())
    lines += [
        f"- {tokens} tokens per batch; median of {a.repeats} alternating runs after a warm-up round",
        "",
        "| batch x seq | transformers s | v4lab s | transformers tokens/s | v4lab tokens/s "
        "| model GFLOP / step | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, seq, med, flops in rows:
        tok = batch * seq
        lines.append(f"| {batch} x {seq:,} | {med['transformers']:.3f} | {med['v4lab']:.3f} "
                     f"| {tok / med['transformers']:,.0f} | {tok / med['v4lab']:,.0f} "
                     f"| {flops / 1e9:.1f} | {med['transformers'] / med['v4lab']:.2f}x |")
    common.publish(a.out, lines)


if __name__ == "__main__":
    main()
