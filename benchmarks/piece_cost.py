"""What each piece of the full model costs in a training step, and where the time goes.

    PYTHONPATH=src python benchmarks/piece_cost.py [--seconds 60] [--publish NAME] [overrides...]
    PYTHONPATH=src python benchmarks/piece_cost.py [overrides...] --variants no_sparse_mla v4_attention full

Issue 17 asks why the full model (sparse MLA + VVPA + FP8 KV + MoE + Engram) runs at a
lower model FLOP utilisation than the baseline. Two views, both at one thread, at the
``cpu`` profile's batch (8 x 256) unless overridden:

1. **Leave one out.** The full model and each one-piece-off experiment (``no_sparse_mla``,
   ``bf16_kv``, ``dense_ffn``, ``no_engram``, ``no_vvpa``, and ``baseline``) take training
   steps in turns (forward, LM + auxiliary losses, backward, AdamW:
   ``common.training_step``), round after round, so machine load hits all alike; medians
   over rounds. A piece's cost is ``full - (full without it)`` in ms and in % of the full
   step; its FLOP share comes from ``v4lab.accounting`` (the project's one FLOP model), so
   the table shows which pieces cost more time than their FLOPs: ``excess ms`` = the
   piece's ms minus its FLOPs at the model's own achieved rate.
2. **By operator.** ``torch.profiler`` over a few full-model steps, self time per aten
   operator, grouped by what it is (matrix products, attention kernels, selection and
   masks, softmax, elementwise, copies, optimizer).

``--variants A B ...`` compares any experiments instead, each against the first (e.g. the V4
attention model against dense MLA at the same width, issue 14), and profiles each by operator.

A matmul burst (``common.matmul_flops``, square fp32 GEMMs) runs once per round beside the
steps; MFU = model FLOPs per step / step time / that rate.
``--publish NAME`` writes benchmarks/results/NAME.md; nothing is written without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import common
import torch
from torch.profiler import ProfilerActivity, profile

from v4lab.config import load_run_config
from v4lab.io import compose, git_rev
from v4lab.lit import LitLM

VARIANTS = {  # experiment -> the piece it removes from `full`
    "full": "",
    "no_sparse_mla": "sparse MLA indexer, top-k and its KL",
    "bf16_kv": "FP8 KV cache fake quantisation (bf16 rounding instead)",
    "dense_ffn": "DeepSeekMoE (dense SwiGLU instead)",
    "no_engram": "Engram",
    "no_vvpa": "VVPA (position in values)",
    "baseline": "all of them (plain MHA decoder)",
}
GROUPS = [  # (group, aten op name fragments): first match wins
    ("matrix products", ("aten::mm", "aten::bmm", "aten::addmm", "aten::linear", "aten::matmul")),
    ("attention kernels", ("scaled_dot_product",)),
    ("selection and masks", ("topk", "masked_fill", "cumsum", "aten::eq", "aten::gt", "aten::le",
                             "aten::lt", "aten::ge", "aten::where", "bitwise", "logical", "nonzero",
                             "aten::sort", "aten::index", "aten::index_select", "aten::index_put",
                             "_index_put_impl", "aten::index_add", "scatter", "gather", "aten::fill_",
                             "aten::zero_")),
    ("softmax / log-softmax / KL", ("softmax", "xlogy")),
    ("copies and layout", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous",
                           "_to_copy", "aten::stack", "aten::pad", "constant_pad")),
    ("optimizer", ("_fused_adam", "aten::lerp", "aten::addcdiv", "aten::addcmul", "_foreach",
                   "aten::sqrt")),
]


def build_lit(experiment: str, overrides: list[str]):
    """A freshly initialised LitLM of ``experiment`` (seed 0: two builds hold the same
    weights), its training's own optimizer (fused AdamW, or Muon), a random batch
    [B, T + 1], its training FLOPs per step (``v4lab.accounting``) and the trainer config."""
    cfg = load_run_config(compose([f"+experiment={experiment}", *overrides]))
    t = cfg.trainer
    torch.manual_seed(0)
    lit = LitLM(cfg.model, t, torch.ones(cfg.model.vocab_size, dtype=torch.long))
    opt = lit.configure_optimizers()["optimizer"]
    batch = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1))
    flops = t.batch_size * t.seq_len * common.train_flops(cfg.model, t.seq_len)
    return lit, opt, batch, flops, t


def build(experiment: str, overrides: list[str]):
    lit, opt, batch, flops, t = build_lit(experiment, overrides)
    return common.training_step(lit, opt, batch), flops, t


def group_of(name: str) -> str:
    """The group of an operator: an ``aten::`` entry of GROUPS matches the operator's exact
    name, in-place variant included (``aten::le`` is not ``aten::lerp_``), any other entry a
    part of the name (``topk``, ``softmax``, ...)."""
    base = name.rstrip("_")
    for group, frags in GROUPS:
        if any(base == f.rstrip("_") if f.startswith("aten::") else f in name for f in frags):
            return group
    return "elementwise and other"


def by_operator(step, n: int = 3) -> dict[str, float]:
    """Self CPU ms per step, per operator group, over ``n`` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    ms: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::") or "scaled_dot" in e.key:
            ms[group_of(e.key)] += e.self_cpu_time_total / 1e3 / n
    return dict(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget of the rounds")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="experiments to time, each against the first (default: full, leave one out)")
    ap.add_argument("--publish", default="", metavar="NAME", help="write benchmarks/results/NAME.md")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant")
    a = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    models = {e: build(e, a.overrides) for e in a.variants}
    for step, _, _ in models.values():
        step(), step()  # warm-up
    times: dict[str, list[float]] = defaultdict(list)
    rates = []
    t_end = time.perf_counter() + a.seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        for e, (step, _, _) in models.items():
            t0 = time.perf_counter()
            step()
            times[e].append(time.perf_counter() - t0)
        rates.append(common.matmul_flops(torch.float32, budget_s=0.5))
    ops = {e: by_operator(models[e][0]) for e in (a.variants if a.variants != list(VARIANTS)
                                                 else a.variants[:1])}
    load1 = os.getloadavg()[0]
    a.load = (load0, load1)
    report(a, models, {e: statistics.median(v) for e, v in times.items()},
           statistics.median(rates), len(rates), ops)


def report(a, models, ms_of, rate: float, rounds: int, ops: dict[str, dict[str, float]]) -> None:
    ref = a.variants[0]
    t = models[ref][2]
    ref_s, ref_flops = ms_of[ref], models[ref][1]
    achieved = ref_flops / ref_s
    loo = a.variants == list(VARIANTS)
    lines = [
        "# Training-step cost by piece: the full model, leave one out" if loo else
        f"# Training-step cost: {', '.join(a.variants[1:])} against {ref}",
        "",
        f"Command: `PYTHONPATH=src python benchmarks/piece_cost.py --seconds {a.seconds:g}"
        f"{' ' + ' '.join(a.overrides) if a.overrides else ''}"  # before --variants, which takes all after it
        f"{'' if loo else ' --variants ' + ' '.join(a.variants)}` (code at git {git_rev()})",
        "",
        f"- {common.host_key()}, {torch.backends.cpu.get_cpu_capability()}; "
        f"batch {t.batch_size} x {t.seq_len}; {rounds} rounds, every variant one step per round "
        f"(medians); load average {a.load[0]:.2f} at the start, {a.load[1]:.2f} at the end",
        f"- measured fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s; {ref}: {ref_s * 1e3:.1f} ms "
        f"per step, {ref_flops / 1e9:.2f} GFLOP (v4lab.accounting), MFU {achieved / rate:.1%}"
        + (" (acceptance: >= 35%)" if loo else ""),
        "",
        "| variant | what differs | ms / step | tokens/s | GFLOP / step | MFU | "
        f"{ref} - variant, ms | % of {ref} step | GFLOP difference | excess ms beyond its FLOPs | "
        f"step / {ref} step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in a.variants:
        s, flops = ms_of[e], models[e][1]
        row = f"| {e} | {(VARIANTS[e] if loo else '') or '—'} | {s * 1e3:.1f} | " \
              f"{t.batch_size * t.seq_len / s:,.0f} | {flops / 1e9:.2f} | {flops / s / rate:.1%} | "
        if e == ref:
            row += "— | — | — | — | 1.00 |"
        else:
            d_s, d_f = ref_s - s, ref_flops - flops
            row += f"{d_s * 1e3:+.1f} | {d_s / ref_s:+.1%} | {d_f / 1e9:+.2f} | " \
                   f"{(d_s - d_f / achieved) * 1e3:+.1f} | {s / ref_s:.2f} |"
        lines.append(row)
    lines += [
        "",
        f"`excess ms` prices the FLOP difference at {ref}'s own achieved rate "
        f"({achieved / 1e9:.1f} GFLOP/s): positive = the piece costs more time than its share of "
        "the arithmetic (overhead that is not FLOPs).",
    ]
    for e, groups in ops.items():
        total = sum(groups.values())
        lines += ["", f"## Where {e}'s step goes, by operator (torch.profiler, self time, "
                  f"{total:.0f} ms per step profiled)", "", "| operator group | ms / step | % |",
                  "|---|---:|---:|"]
        lines += [f"| {g} | {v:.1f} | {v / total:.1%} |"
                  for g, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    common.publish_result(a.publish, lines)


if __name__ == "__main__":
    main()
