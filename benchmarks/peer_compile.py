"""Does torch.compile close the training-step gap? v4lab vs transformers, eager and compiled.

    PYTHONPATH=src python3 benchmarks/peer_compile.py [--threads 1] [--repeats 5]

Same models, weights, batch and step as ``benchmarks/peer_speed.py`` (fp32, forward +
backward of the LM loss at its default config: hidden 256, 4 layers, 16 routed experts
top-4, batch 8 x 512). Each model is also wrapped in ``torch.compile`` (inductor, default
mode); the first call of each compiled model compiles and is timed separately. Then the
four variants alternate run by run and the medians are compared: speed-ups against eager
transformers and against compiled transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import peer_speed as ps
import torch

from v4lab.peer import to_v4lab

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "reports/perf_compile.md"))
    a = ap.parse_args()
    import transformers

    torch.set_num_threads(a.threads)
    cfg_args = argparse.Namespace(
        hidden=256, layers=4, heads=4, nope=64, rope=32, v=64, rank=128, ffn=683, experts=16,
        topk=4, shared=1, expert_dim=64, groups=4, topk_groups=2, dense_layers=1, vocab=4096,
        prompt=2048, new=256, seq=512)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(ps.hf_config(cfg_args)).train()
    v4 = to_v4lab(hf)[0].train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg_args.vocab, (8, cfg_args.seq), generator=g)
    y = torch.randint(0, cfg_args.vocab, (8, cfg_args.seq), generator=g)
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
    load1 = os.getloadavg()
    med = {n: statistics.median(t) for n, t in times.items()}
    tokens = x.numel()
    lines = [
        "# torch.compile and the training step: v4lab vs transformers",
        "",
        f"Command: `PYTHONPATH=src python3 benchmarks/peer_compile.py --threads {a.threads} "
        f"--repeats {a.repeats}`",
        "",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} logical CPUs, torch.set_num_threads({a.threads}); load average "
        f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end",
        "- config: benchmarks/peer_speed.py defaults (hidden 256, 4 layers, 16 routed experts "
        "top-4 + 1 shared, q/kv ranks 128), fp32, batch 8 x 512, forward + backward",
        f"- compile time (first step of each compiled model): transformers "
        f"{compile_s['transformers']:.0f} s, v4lab {compile_s['v4lab']:.0f} s",
        "",
        f"Median of {a.repeats} alternating runs after a warm-up round:",
        "",
        "| implementation | s / step | tokens/s | min-max s | vs eager transformers "
        "| vs compiled transformers |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {med[name]:.3f} | {tokens / med[name]:,.0f} | {min(t):.3f}-{max(t):.3f} "
                     f"| {med['transformers'] / med[name]:.2f}x "
                     f"| {med['transformers (torch.compile)'] / med[name]:.2f}x |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
