"""Does Engram help on fixed N-gram facts? Train the `tiny` model with and without Engram
on NGramFacts sequences and report value-token accuracy on held-out sequences (the facts
are the same; filler and placement are new).

Usage: PYTHONPATH=src python3 scripts/engram_facts_demo.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from v4lab.data.ngram_facts import NGramFacts
from v4lab.model import Transformer
from v4lab.modules.context import ForwardContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from engram_share import load_cfg  # noqa: E402


def run(cfg, facts: NGramFacts, steps: int, seed: int, lr: float) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    groups = model.optimizer_groups(0.1)
    for g in groups:
        g["lr"] = lr * g["lr_multiplier"]
    opt = torch.optim.AdamW(groups, lr=lr)
    t0 = time.perf_counter()
    for step in range(steps):
        ids, _, _ = facts.sample(16, 64, 8, seed=seed * 100_000 + step)
        ctx = ForwardContext(positions=torch.arange(63), step=step)
        logits = model(ids[:, :-1], ctx)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        ids, mask, _ = facts.sample(64, 64, 8, seed=10**9 + seed)
        acc = NGramFacts.accuracy(model(ids), ids, mask)
    return acc, loss.item(), elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-facts", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    facts = NGramFacts(vocab_size=4096, n_facts=args.n_facts, key_len=2, value_len=2, seed=0)
    on = load_cfg("tiny", 4096)
    off = copy.deepcopy(on)
    off.engram.enabled = False
    print("| model | value-token accuracy | final train loss | train time (s) |")
    print("|---|---|---|---|")
    for name, cfg in (("tiny, Engram on", on), ("tiny, Engram off", off)):
        acc, loss, sec = run(cfg, facts, args.steps, args.seed, args.lr)
        print(f"| {name} | {acc:.3f} | {loss:.3f} | {sec:.0f} |")


if __name__ == "__main__":
    main()
