"""Train a model on a probe task with a plain torch loop (no Lightning, no corpus).

The probes (``v4lab.data.probes``) are small enough that a 2-layer model learns them on
one CPU thread. Loss and accuracy count only the asked positions: the logits at t must
give ``targets[t]``, greedy argmax over the whole vocabulary.
Accuracy is measured on held-out sequences drawn from a separate stream of the same seed
(one full forward pass, or token by token through the decode caches), with a
Clopper-Pearson interval.

    model = Transformer(ModelConfig(vocab_size=probe.vocab_size, ...))
    result = train_probe(model, AssocRecall(seq_len=64, n_pairs=8), steps=300)
    result.accuracy, result.interval, result.steps_to(0.9)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from v4lab.data.probes import IGNORE
from v4lab.errors import require, require_positive
from v4lab.modules.context import ForwardContext
from v4lab.stats import clopper_pearson

TRAIN_STREAM, EVAL_STREAM = 0x7121, 0xE7A1  # independent data streams of one seed


@dataclass
class ProbeResult:
    """Outcome of :func:`train_probe`. curve: (step, held-out accuracy) at each evaluation."""

    steps: int
    correct: int
    total: int
    chance: float
    baseline: float
    wall_s: float
    losses: list[float] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def interval(self) -> tuple[float, float]:
        """95% Clopper-Pearson interval of the held-out accuracy."""
        return clopper_pearson(self.correct, self.total)

    def steps_to(self, level: float) -> int | None:
        """First evaluated step with held-out accuracy >= level (None if never)."""
        return next((s for s, a in self.curve if a >= level), None)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the asked positions: logits [B, T, V], targets [B, T]
    (IGNORE elsewhere)."""
    m = targets != IGNORE
    return F.cross_entropy(logits[m].float(), targets[m])


@torch.no_grad()
def decode_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` [B, T] fed one token at a time through the model's
    decode caches (``new_caches`` / ``forward_cached``): what generation sees, including
    a quantised KV cache's rounding."""
    caches = model.new_caches(ids.shape[0], ids.shape[1])
    out = [model.forward_cached(ids[:, t:t + 1], caches, t, history=ids[:, :t + 1])
           for t in range(ids.shape[1])]
    return torch.cat(out, dim=1)


@torch.no_grad()
def answer_hits(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                decode: bool = False) -> torch.Tensor:
    """Per-answer correctness (bool, answers in row-major order) of greedy prediction.

    decode: through the cached decode path, one token at a time, instead of one full
    forward pass (the input is the probe's sequence either way: answers are not fed back).
    """
    logits = decode_logits(model, ids) if decode else model(ids)
    m = targets != IGNORE
    return logits[m].argmax(-1) == targets[m]


def _tensors(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(batch.ids), torch.from_numpy(batch.targets)


def probe_hits(model: nn.Module, probe, seed: int, n_sequences: int, batch: int = 256,
               decode: bool = False) -> torch.Tensor:
    """Per-answer correctness on ``n_sequences`` held-out sequences of ``probe``: the same
    sequences, in the same order, for a given seed whichever the model (so two models'
    hits pair up answer by answer; see :func:`answer_hits`)."""
    rng = np.random.default_rng([seed, EVAL_STREAM])
    was_training = model.training
    model.eval()
    hits = []
    for start in range(0, n_sequences, batch):
        ids, targets = _tensors(probe.sample(rng, min(batch, n_sequences - start)))
        hits.append(answer_hits(model, ids, targets, decode))
    model.train(was_training)
    return torch.cat(hits)


def evaluate_probe(model: nn.Module, probe, seed: int, n_sequences: int, batch: int = 256,
                   decode: bool = False) -> tuple[int, int]:
    """(correct, total) answers of :func:`probe_hits`."""
    hits = probe_hits(model, probe, seed, n_sequences, batch, decode)
    return int(hits.sum()), hits.numel()


def train_probe(model: nn.Module, probe, steps: int = 300, batch: int = 64, lr: float = 3e-3,
                weight_decay: float = 0.0, warmup: int = 0, seed: int = 0, eval_sequences: int = 256,
                eval_every: int = 0, betas: tuple[float, float] = (0.9, 0.95),
                clip: float | None = 1.0) -> ProbeResult:
    """AdamW (``betas``, the model's own parameter groups when it has them) on the answer
    loss at a constant ``lr`` after a linear warm-up of ``warmup`` steps, gradients clipped
    at norm ``clip`` (None: off). Fresh sequences every step from ``seed``'s training
    stream; held-out accuracy every ``eval_every`` steps (0: only at the end) on
    ``eval_sequences`` sequences of the evaluation stream. wall_s counts the evaluations.

    The model's initialisation is the caller's (seed torch before building it).
    """
    for key in ("steps", "batch", "eval_sequences"):
        require_positive(f"probe_train.{key}", locals()[key])
    require(lr > 0, "probe_train.lr", lr, "> 0")
    require(isinstance(warmup, int) and 0 <= warmup <= steps, "probe_train.warmup", warmup,
            f"0..steps={steps}")
    require(isinstance(eval_every, int) and eval_every >= 0, "probe_train.eval_every", eval_every,
            ">= 0 (0 = evaluate at the end only)")
    groups = model.optimizer_groups(weight_decay) if hasattr(model, "optimizer_groups") else \
        [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
    rng = np.random.default_rng([seed, TRAIN_STREAM])
    result = ProbeResult(steps, 0, 0, probe.chance, probe.baseline, 0.0)
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        scale = min(1.0, step / warmup) if warmup else 1.0
        for g in opt.param_groups:
            g["lr"] = lr * scale * g.get("lr_multiplier", 1.0)
        ids, targets = _tensors(probe.sample(rng, batch))
        # A training forward (step set): sparse attention's indexer warm-up and loss, MoE's
        # balance losses and load count, as in the corpus runs (lit.LitLM). No costly
        # statistics (indexer recall, the dense softmax it needs, ...): nothing reads them
        # here, and they feed no loss, so the weights are the same without them.
        ctx = ForwardContext(positions=torch.arange(ids.shape[1]), step=step - 1, phase="train",
                             diagnose=False)
        loss = answer_loss(model(ids, ctx), targets)
        total = loss + sum(ctx.aux_losses.values(), torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        total.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if hasattr(model, "on_train_step_end"):
            model.on_train_step_end()
        result.losses.append(loss.item())
        if eval_every and (step % eval_every == 0) and step < steps:
            c, n = evaluate_probe(model, probe, seed, eval_sequences)
            result.curve.append((step, c / n))
    result.correct, result.total = evaluate_probe(model, probe, seed, eval_sequences)
    result.curve.append((steps, result.accuracy))
    result.wall_s = time.perf_counter() - t0
    return result
