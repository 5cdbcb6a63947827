"""SwiGLU feed-forward network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """FFN(x) = W2 (SiLU(W1 x) * W3 x).

    x: [..., dim] -> [..., dim]; hidden width ``hidden_dim``.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
