"""Multi-token prediction (MTP), depth 1, as in DeepSeek-V3 (section 2.2) and V4.

Besides the next token, the model learns to predict the token after it. At position t the
MTP module combines the main model's hidden state h_t (which has seen tokens <= t) with the
embedding of token t+1 and predicts token t+2:

    x_t    = W_p [RMSNorm(Emb(tok_{t+1})); RMSNorm(h_t)]       W_p: [dim, 2 dim]
    x      = Block(x)                                          one causal transformer block
    logits = Head(RMSNorm(x))                                  predicts tok_{t+2}

Emb and Head are the main model's own modules (shared: the same parameter tensors); the
two input norms, the projection, the block and the output norm are the module's own. The
concatenation puts the embedding first, as DeepSeek-V3's released MTP weights (eh_proj)
do; the paper writes h first, which only permutes W_p's columns.

h is the main model's last block output before its final norm (V3's h^0; the MTP's own
hnorm normalises it). The training loss is ``loss_weight`` times the mean cross-entropy
over positions t = 0 .. T-2 of a window tokens[0 .. T] (V4: 0.3, then 0.1 once the
learning rate decays; the weight is an attribute the trainer may change).

The module is pure torch and takes its block from the caller (``model.Block`` for the lab
model), so modules/ does not import model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.errors import require
from v4lab.modules.context import ForwardContext
from v4lab.modules.norm import RMSNorm

MAX_BUILT_DEPTH = 1


@dataclass
class MTPConfig:
    """depth: predicted tokens beyond the next (0 = no MTP module; only depth 1 is built);
    loss_weight: lambda, the MTP loss's weight in the objective until the learning rate
    decays, decay_loss_weight after (V4: 0.3, then 0.1)."""

    depth: int = 0
    loss_weight: float = 0.3
    decay_loss_weight: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.depth > 0

    def validate(self, path: str = "model.mtp") -> MTPConfig:
        require(isinstance(self.depth, int) and 0 <= self.depth <= MAX_BUILT_DEPTH,
                f"{path}.depth", self.depth,
                f"an integer in [0, {MAX_BUILT_DEPTH}] (0 = off; only depth {MAX_BUILT_DEPTH} is built)")
        require(self.loss_weight >= 0, f"{path}.loss_weight", self.loss_weight, ">= 0")
        require(self.decay_loss_weight >= 0, f"{path}.decay_loss_weight", self.decay_loss_weight, ">= 0")
        return self


class MTP(nn.Module):
    """Depth-1 MTP head.

    forward(h [B, S, dim], next_ids [B, S], ctx) -> logits [B, S, vocab]: position s
    combines h[:, s] with the embedding of next_ids[:, s] (the token after s) and
    predicts the token after that. ``ctx`` (positions [S]) is built when None.
    """

    def __init__(self, dim: int, block: nn.Module, embed: nn.Embedding, head: nn.Module,
                 norm_eps: float = 1e-6, loss_weight: float = 0.3) -> None:
        super().__init__()
        self.embed = embed    # the main model's modules: parameters shared, not copied
        self.head = head
        self.enorm = RMSNorm(dim, norm_eps)
        self.hnorm = RMSNorm(dim, norm_eps)
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = block
        self.norm = RMSNorm(dim, norm_eps)
        self.loss_weight = loss_weight

    def forward(self, h: torch.Tensor, next_ids: torch.Tensor,
                ctx: ForwardContext | None = None) -> torch.Tensor:
        if ctx is None:
            ctx = ForwardContext(positions=torch.arange(h.shape[1], device=h.device),
                                 input_ids=next_ids)
        x = self.proj(torch.cat([self.enorm(self.embed(next_ids)), self.hnorm(h)], dim=-1))
        return self.head(self.norm(self.block(x, ctx)))

    def loss(self, h: torch.Tensor, tokens: torch.Tensor,
             ctx: ForwardContext | None = None) -> torch.Tensor:
        """Weighted MTP loss for a training window: ``loss_weight`` * :meth:`ce`."""
        return self.loss_weight * self.ce(h, tokens, ctx)

    def ce(self, h: torch.Tensor, tokens: torch.Tensor,
           ctx: ForwardContext | None = None) -> torch.Tensor:
        """Mean MTP cross-entropy (nats) for a training window, unweighted.

        h: [B, T, dim] main hidden states for inputs tokens[:, :T]; tokens: [B, T+1].
        Position t < T-1 reads h_t and token t+1 and is scored on token t+2. ``ctx``
        (positions [T-1]) is built when None.
        """
        t = h.shape[1]
        if tokens.shape[1] != t + 1:
            raise ValueError(f"MTP loss: tokens {tuple(tokens.shape)} must be [B, T+1] = "
                             f"[B, {t + 1}] for hidden states of length T={t}")
        logits = self.forward(h[:, :-1], tokens[:, 1:-1], ctx)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 2:].reshape(-1))
