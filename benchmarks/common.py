"""What the benchmarks share: the one matmul timer and the one FLOP model of the project.

    import common  # benchmarks/ is on sys.path when a benchmark runs as a script

- :func:`host_key`: the CPU model, torch version and thread count (what a result was
  measured on; the same key the ``cpu_host`` chip's cached peaks are filed under);
- :func:`matmul_flops`: achieved FLOP/s of a square GEMM in a dtype at the current thread
  count (``v4lab.chips.host``, the timer that measures the ``cpu_host`` chip's peaks);
- :func:`training_step`: one step (forward, LM + auxiliary losses, backward, optimizer) of
  a LitLM on a fixed batch, as every training benchmark times it;
- :func:`publish`: print a markdown report and write it atomically (``v4lab.io``);
- :func:`forward_flops`, :func:`train_flops`: FLOPs per token of a v4lab ModelConfig from
  ``v4lab.accounting`` (the count the chips' projection and every run's
  ``cost/train_flops_per_token`` use): 2 per multiply-add, matrix products and attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from v4lab.accounting import forward_flops_per_token, train_flops_per_token
from v4lab.chips.host import host_key, matmul_flops
from v4lab.io import atomic_write_text
from v4lab.modules.context import ForwardContext

__all__ = ["forward_flops", "host_key", "matmul_flops", "publish", "publish_result", "train_flops",
           "training_step"]


def forward_flops(cfg: Any, keys: float, absorbed: bool = False) -> float:
    """Forward FLOPs of one token that attends to ``keys`` entries (the indexer, if any,
    scores as many). ``absorbed``: MLA's decode algorithm (W_UK folded into the query,
    W_UV applied after attention); else keys and values are up-projected per key."""
    return sum(forward_flops_per_token(cfg, keys, keys, absorbed=absorbed).values())


def train_flops(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at ``seq_len``, causal attention:
    3x the forward for matrix products, 3.5x for the attention core."""
    return train_flops_per_token(cfg, seq_len)


def publish(out: str | Path, lines: list[str]) -> None:
    """Print a markdown report and write it to ``out`` atomically."""
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(out), text)
    print(text, end="")


def publish_result(name: str, lines: list[str]) -> None:
    """``--publish NAME``: write benchmarks/results/NAME.md (and print it); no name: print only."""
    if name:
        publish(Path(__file__).resolve().parent / "results" / f"{name}.md", lines)
    else:
        print("\n".join(lines))


PAST_WARMUP = 10**9  # a global step past every warm-up (sparse attention selects top-k)


def training_step(lit: Any, opt: torch.optim.Optimizer, batch: torch.Tensor,
                  step: int = PAST_WARMUP, diagnose: bool = False):
    """A closure running one training step of ``lit`` (a LitLM) on ``batch`` [B, T + 1].

    The forward runs in the ``train`` phase at global step ``step`` (default: past every
    warm-up, so sparse attention selects top-k as in most of a run), as a Lightning
    training step does: auxiliary losses and the pieces' cheap statistics are computed;
    the costly ones only with ``diagnose`` (default off: most of a run's steps skip them,
    ``lit.reads_stats``)."""
    x, y = batch[:, :-1], batch[:, 1:]

    def run() -> None:
        ctx = ForwardContext(positions=torch.arange(x.shape[1]), input_ids=x, step=step,
                             phase="train", diagnose=diagnose)
        logits = lit.model(x, ctx)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = loss + sum(ctx.aux_losses.values(), torch.zeros(()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run
