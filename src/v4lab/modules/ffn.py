"""SwiGLU feed-forward network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """SiLU(gate) * up. With ``limit`` > 0, DeepSeek-V4's clamp first: gate <= limit and
    up in [-limit, limit], which bounds the activations that reach the down projection
    (gate is only bounded above: SiLU of a large negative value is already ~0)."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """FFN(x) = W2 (SiLU(W1 x) * W3 x), optionally clamped (see :func:`swiglu`).

    x: [..., dim] -> [..., dim]; hidden width ``hidden_dim``.
    """

    def __init__(self, dim: int, hidden_dim: int, limit: float = 0.0) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))
