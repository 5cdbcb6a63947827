"""Training throughput and model FLOP utilisation (MFU) of one experiment, on this machine.

Measured side by side in one process: the machine's dense matmul rate (fp32 and bf16,
square GEMMs of the model's width class) and a training step (forward + backward +
AdamW) of the experiment's model at its trainer batch. MFU = model FLOPs per step
(``v4lab.accounting``, the project's one FLOP model, causal attention; via
``benchmarks/common.py``) x steps per second / measured matmul rate (``common.matmul_flops``).
The FLOPs torch's FlopCounterMode counts in the step (causal attention priced as full,
the optimizer's elementwise work not at all) are shown beside them.

    python benchmarks/train_throughput.py                      # baseline at the cpu size
    python benchmarks/train_throughput.py --threads 1 +experiment=full profile=smoke

Threads: ``--threads auto`` (the default) takes the CPUs free now, as a run's
``trainer.num_threads=auto`` does (``v4lab.threads``), and the report says what it chose;
give a count to compare machines. Writes benchmarks/results/train_throughput_<experiment>.md
unless ``--out`` names another file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common
import torch

from v4lab import accounting
from v4lab.threads import choose_threads

ROOT = Path(__file__).resolve().parents[1]


def thread_count(text: str) -> int | str:
    """``--threads``: 'auto' or a count >= 0."""
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a count (0: torch's default) or auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="auto", type=thread_count,
                    help="torch threads: a count (0: torch's default), or auto (as "
                         "trainer.num_threads=auto: the CPUs free now)")
    ap.add_argument("--seconds", type=float, default=30.0, help="time budget of the rounds")
    ap.add_argument("--out", default="", help="report file (default: benchmarks/results/"
                                               "train_throughput_<experiment>.md)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default: +experiment=baseline)")
    a = ap.parse_args()
    overrides = a.overrides
    threads = choose_threads(a.threads)
    if threads.threads:
        torch.set_num_threads(threads.threads)
    from v4lab.config import load_run_config
    from v4lab.io import compose
    from v4lab.lit import LitLM

    cfg = load_run_config(compose(overrides or ["+experiment=baseline"]))
    t = cfg.trainer
    torch.manual_seed(0)
    lit = LitLM(cfg.model, t, torch.ones(cfg.model.vocab_size, dtype=torch.long))
    opt = lit.configure_optimizers()["optimizer"]  # the training's own (fused AdamW, or Muon)
    batch = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1))
    step = common.training_step(lit, opt, batch)

    with accounting.flop_counter() as counter:
        step()
    counted_per_step = counter.get_total_flops()
    flops_per_step = t.batch_size * t.seq_len * common.train_flops(cfg.model, t.seq_len)
    for _ in range(2):
        step()
    # Interleave the two measurements so both see the same machine load: rounds of one
    # training step and one matmul burst; medians over rounds.
    step_times, fp32_rates, bf16_rates = [], [], []
    t_end = time.perf_counter() + a.seconds
    while time.perf_counter() < t_end or len(step_times) < 3:
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)
        fp32_rates.append(common.matmul_flops(torch.float32, budget_s=0.5) / 1e12)
        bf16_rates.append(common.matmul_flops(torch.bfloat16, budget_s=0.5) / 1e12)
    step_s = statistics.median(step_times)
    fp32, bf16 = statistics.median(fp32_rates), statistics.median(bf16_rates)
    tokens = t.batch_size * t.seq_len
    achieved = flops_per_step / step_s / 1e12
    lines = [
        f"# Training throughput: {cfg.experiment} ({' '.join(overrides) or '+experiment=baseline'})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads ({threads.reason}), "
        f"{torch.backends.cpu.get_cpu_capability()}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| parameters (total / active) | {lit.model.num_params():,} / {lit.model.num_active_params():,} |",
        f"| batch x seq_len | {t.batch_size} x {t.seq_len} = {tokens} tokens |",
        f"| model FLOPs per step (v4lab.accounting, fwd+bwd) | {flops_per_step / 1e9:.2f} GFLOP |",
        f"| FLOPs per step (torch counter, causal as full) | {counted_per_step / 1e9:.2f} GFLOP |",
        f"| step time (median of {len(step_times)}) | {step_s * 1e3:.1f} ms |",
        f"| training tokens/s | {tokens / step_s:,.0f} |",
        f"| achieved | {achieved * 1e3:.1f} GFLOP/s |",
        f"| measured matmul fp32 / bf16 | {fp32 * 1e3:.1f} / {bf16 * 1e3:.1f} GFLOP/s |",
        f"| MFU vs fp32 matmul | {achieved / fp32:.1%} |",
        f"| MFU vs bf16 matmul | {achieved / bf16:.1%} |",
    ]
    if bf16 < fp32:  # e.g. AVX2 without AVX512-BF16/AMX: bf16 products are converted in software
        lines += ["", "bf16 matmul is slower than fp32 on this CPU (no native bf16 kernels): the "
                  "bf16 rate is no ceiling here, and the MFU against it means nothing."]
    common.publish(a.out or ROOT / "benchmarks" / "results" / f"train_throughput_{cfg.experiment}.md",
                   lines)


if __name__ == "__main__":
    main()
