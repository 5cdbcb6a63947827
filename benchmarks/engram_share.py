"""Engram's share of a training step.

Builds the configured model twice from conf/model/<model>.yaml — as configured (Engram on)
and with engram.enabled=false — and times full training steps (forward, backward, AdamW
step) of both, interleaved so machine noise hits both alike. Engram's share is
(t_on - t_off) / t_on on the median step times. A third variant times Engram on with its
logged statistics off (inference-mode stats path), to show what the per-step
bucket-collision statistic costs.

Usage: PYTHONPATH=src python3 benchmarks/engram_share.py [--model small] [--batch 8]
       [--seq 256] [--steps 10] [--vocab 4096] [--out benchmarks/results/engram_share.md]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import common
import torch
from omegaconf import OmegaConf

from v4lab.model import ModelConfig, Transformer
from v4lab.modules.context import ForwardContext
from v4lab.modules.engram import Engram, engram_params

ROOT = Path(__file__).resolve().parents[1]


def load_cfg(name: str, vocab: int) -> ModelConfig:
    conf = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    parents = list(conf.pop("defaults", []))
    for parent in parents:
        if parent != "_self_":
            conf = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "model" / f"{parent}.yaml"),
                                   conf)
    conf.vocab_size = vocab
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), conf))


def make_step(model: Transformer, ids: torch.Tensor, stats: bool):
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        ctx = ForwardContext(positions=torch.arange(ids.shape[1] - 1), step=0 if stats else None)
        model.train(stats)
        logits = model(ids[:, :-1], ctx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description="Engram's share of a training step")
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engram_share.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    on_cfg = load_cfg(args.model, args.vocab)
    if not on_cfg.engram.enabled:
        raise SystemExit(f"engram is disabled in conf/model/{args.model}.yaml")
    off_cfg = copy.deepcopy(on_cfg)
    off_cfg.engram.enabled = False
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    on, off = Transformer(on_cfg), Transformer(off_cfg)
    variants = {"engram on (stats logged)": make_step(on, ids, True),
                "engram on (no stats)": make_step(copy.deepcopy(on), ids, False),
                "engram off": make_step(off, ids, True)}
    for fn in variants.values():  # warm-up
        fn(), fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.steps):
        for k, fn in variants.items():
            times[k].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    t_on, t_nostat, t_off = med.values()
    eng = sum(isinstance(m, Engram) for m in on.modules())
    lines = [
        "# Engram's share of a training step",
        "",
        f"Command: `PYTHONPATH=src python3 benchmarks/engram_share.py --model {args.model} "
        f"--batch {args.batch} --seq {args.seq} --steps {args.steps} --vocab {args.vocab} "
        f"--threads {args.threads}`",
        "",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (shared machine: expect noise). Model "
        f"`{args.model}` (MoE as configured there), {eng} Engram layer(s), "
        f"engram/params = {engram_params(on):,} of {on.num_params():,}; batch "
        f"{args.batch} x {args.seq} tokens; median of {args.steps} interleaved steps "
        "(forward + backward + AdamW).",
        "",
        "| variant | median step (ms) | tokens/s |",
        "|---|---|---|",
    ]
    for k, t in med.items():
        lines.append(f"| {k} | {t * 1e3:.1f} | {args.batch * args.seq / t:,.0f} |")
    lines += [
        "",
        f"Engram's share of a training step, (t_on - t_off) / t_on: "
        f"**{(t_on - t_off) / t_on:.1%}** with the per-step statistics "
        f"(gate mean, bucket collision rate), {(t_nostat - t_off) / t_nostat:.1%} without them.",
        "",
    ]
    common.publish(args.out, lines)


if __name__ == "__main__":
    main()
