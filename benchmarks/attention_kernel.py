"""Causal MLA attention, forward + backward: the CPU flash kernel v4lab's training path
uses against SDPA's math path (the one transformers' sdpa call falls back to), side by side.

    PYTHONPATH=src python benchmarks/attention_kernel.py [--seconds 60] [--publish NAME]

Which is faster depends on the CPU and the context: the profiles in ``reports/perf_1thread*``
put v4lab's flash kernel behind transformers' unfused attention at 8 x 512 on an AMD EPYC
(AVX2) and ahead at 2 x 2048. Shapes: the peer benchmark's (4 heads, q/k width 96, v width
64, zero-padded to 96 for the flash kernel) at 8 x 512 and 2 x 2048, and the study model's
(4 heads, widths 48 and 48 with VVPA) at 8 x 256. One thread; the two paths alternate
round by round; medians and the paired median ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from v4lab.modules.mla import _causal_attention

SHAPES = {  # name: (batch, heads, seq, q/k width, v width)
    "peer 8 x 512": (8, 4, 512, 96, 64),
    "peer 2 x 2048": (2, 4, 2048, 96, 64),
    "study 8 x 256": (8, 4, 256, 48, 48),
}


def math_path(q, k, v, scale):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


PATHS = {"flash": _causal_attention, "math": math_path}  # v4lab's training call; the fallback


def step(path, q, k, v, scale, g) -> float:
    t0 = time.perf_counter()
    path(q, k, v, scale).backward(g)
    return time.perf_counter() - t0


def measure(shape, seconds: float) -> dict:
    b, h, t, dq, dv = shape
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, h, t, dq, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=gen).requires_grad_()
    g = torch.randn(b, h, t, dv, generator=gen)
    scale = dq ** -0.5
    diff = (_causal_attention(q, k, v, scale) - math_path(q, k, v, scale)).abs().max().item()
    times = {name: [] for name in PATHS}
    for path in PATHS.values():  # warm-up
        step(path, q, k, v, scale, g)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times["flash"]) < 3:
        for name, path in PATHS.items():
            times[name].append(step(path, q, k, v, scale, g))
    ratio = statistics.median(m / f for f, m in zip(times["flash"], times["math"]))
    return {n: statistics.median(ts) * 1e3 for n, ts in times.items()} | {
        "ratio": ratio, "rounds": len(times["flash"]), "diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget per shape")
    ap.add_argument("--publish", default="", metavar="NAME", help="write benchmarks/results/NAME.md")
    a = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    res = {name: measure(shape, a.seconds) for name, shape in SHAPES.items()}
    lines = [
        "# Causal MLA attention, forward + backward: CPU flash kernel vs SDPA math path", "",
        f"Command: `PYTHONPATH=src python benchmarks/attention_kernel.py --seconds {a.seconds:g}`",
        "",
        f"- {common.host_key()}, {torch.backends.cpu.get_cpu_capability()}; load average "
        f"{load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "",
        "| shape | B x H x T, widths | flash ms | math ms | math / flash (paired median) | rounds "
        "| max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        b, h, t, dq, dv = SHAPES[name]
        lines.append(f"| {name} | {b} x {h} x {t}, {dq}/{dv} | {r['flash']:.1f} | {r['math']:.1f} "
                     f"| {r['ratio']:.2f} | {r['rounds']} | {r['diff']:.1e} |")
    common.publish_result(a.publish, lines)


if __name__ == "__main__":
    main()
