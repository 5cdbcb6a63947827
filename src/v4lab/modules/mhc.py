"""Hyper-connections: the residual as n parallel streams (mHC, DeepSeek-V4 report §2.2).

The residual X [B, T, n, dim] holds n streams instead of one. Every sublayer f
(attention, FFN) has its own *site* with fp32 parameters W [(2+n)n, n*dim], b [(2+n)n]
and three scales s. Per token, from the flattened streams:

    z = RMSNorm(flatten(X))            (no learned gain)               [n*dim]
    a_pre, a_post, a_res = split(W z)                                  [n], [n], [n*n]
    pre  = sigmoid(s_pre  a_pre  + b_pre) + eps                        [n]
    post = 2 sigmoid(s_post a_post + b_post)                           [n]
    H    = Sinkhorn(s_res a_res + b_res)                               [n, n], doubly stochastic
    h    = sum_i pre_i X_i                                             what f reads
    X'_k = post_k f(h) + sum_j H[j, k] X_j                            the new streams

i.e. the old streams are mixed by H^T (column k of H says how much of each old stream
goes to new stream k). A doubly stochastic H keeps the mixed residual a convex
combination of the streams, so the product of the H's across depth cannot blow up; that
is the "manifold constraint".

Sinkhorn, in the order of V4's reference: row softmax of the logits, + eps; normalise the
columns; then (iters - 1) rounds of rows then columns; every division adds eps to the
sum. The columns are normalised last, so they sum to 1 up to eps; the rows to within the
convergence left after ``iters`` rounds.

Unconstrained hyper-connections (``constrained=False``, the ablation): H = I + (s_res
a_res + b_res), no softmax or Sinkhorn. The identity keeps a plain residual path at
initialisation (b = 0 and small W give H close to I; Sinkhorn of the same logits gives
the uniform 1/n matrix instead); nothing bounds the gain of the product across depth.
This choice of parametrisation is ours (Zhu et al.'s HC initialises its static part to
the identity too); pre and post are the same as mHC's.

The output head (:class:`HyperHead`) collapses the streams with pre weights of its own
(no post, no Sinkhorn): y = sum_i (sigmoid(s W' z + b')_i + eps) X_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.modules.args import HyperConnectionConfig

__all__ = ["HyperConnection", "HyperConnectionConfig", "HyperHead", "expand_streams", "sinkhorn"]


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Doubly stochastic matrices from logits [..., n, n] (rows and columns sum to 1)."""
    p = logits.softmax(dim=-1) + eps
    p = p / (p.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(dim=-1, keepdim=True) + eps)
        p = p / (p.sum(dim=-2, keepdim=True) + eps)
    return p


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """The embedding copied into every stream: [B, T, dim] -> [B, T, n, dim]."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def _normed_flat(x: torch.Tensor, dtype: torch.dtype, eps: float) -> torch.Tensor:
    """RMSNorm without gain of the flattened streams: [B, T, n, dim] -> [B, T, n*dim]."""
    z = x.flatten(-2).to(dtype)
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    """One hyper-connection site (before one sublayer).

    read(X [B, T, n, dim]) -> (h [B, T, dim], mix): the sublayer's input and the
      coefficients (post [B, T, n], H [B, T, n, n]) that :meth:`write` needs.
    write(X, y [B, T, dim], mix) -> X' [B, T, n, dim].
    The coefficients are computed in fp32 (or the parameters' dtype if wider), outside
    autocast; the stream arithmetic runs in X's dtype as the reference does.
    """

    def __init__(self, dim: int, cfg: HyperConnectionConfig, norm_eps: float = 1e-6) -> None:
        super().__init__()
        n = cfg.n_streams
        self.n, self.dim = n, dim
        self.iters, self.eps, self.constrained = cfg.sinkhorn_iters, cfg.eps, cfg.constrained
        self.norm_eps = norm_eps
        self.weight = nn.Parameter(torch.empty((2 + n) * n, n * dim))
        self.bias = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))  # pre, post, residual
        self.init_weights(0.02)

    def init_weights(self, std: float) -> None:
        """W ~ Normal(0, std), b = 0, s = 1 (the model calls this with its init_std)."""
        nn.init.normal_(self.weight, std=std)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.scale)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre [B, T, n], post [B, T, n], H [B, T, n, n] from the streams x [B, T, n, dim]."""
        n = self.n
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = F.linear(_normed_flat(x, dtype, self.norm_eps), self.weight.to(dtype))
        a_pre, a_post, a_res = a.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_res = self.bias.to(dtype).split([n, n, n * n])
        s_pre, s_post, s_res = self.scale.to(dtype).unbind(0)
        pre = torch.sigmoid(a_pre * s_pre + b_pre) + self.eps
        post = 2 * torch.sigmoid(a_post * s_post + b_post)
        logits = (a_res * s_res + b_res).unflatten(-1, (n, n))
        if self.constrained:
            res = sinkhorn(logits, self.iters, self.eps)
        else:
            res = logits + torch.eye(n, dtype=dtype, device=x.device)
        return pre, post, res

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        pre, post, res = self.coefficients(x)
        h = (pre.unsqueeze(-1) * x).sum(dim=-2).to(x.dtype)
        return h, (post, res)

    def write(self, x: torch.Tensor, y: torch.Tensor,
              mix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        post, res = mix
        return (post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2)
                + res.to(x.dtype).transpose(-1, -2) @ x)


class HyperHead(nn.Module):
    """Collapse the streams before the final norm: X [B, T, n, dim] -> [B, T, dim]."""

    def __init__(self, dim: int, cfg: HyperConnectionConfig, norm_eps: float = 1e-6) -> None:
        super().__init__()
        n = cfg.n_streams
        self.n, self.eps, self.norm_eps = n, cfg.eps, norm_eps
        self.weight = nn.Parameter(torch.empty(n, n * dim))
        self.bias = nn.Parameter(torch.empty(n))
        self.scale = nn.Parameter(torch.empty(1))
        self.init_weights(0.02)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = F.linear(_normed_flat(x, dtype, self.norm_eps), self.weight.to(dtype))
        pre = torch.sigmoid(a * self.scale.to(dtype) + self.bias.to(dtype)) + self.eps
        return (pre.unsqueeze(-1) * x).sum(dim=-2).to(x.dtype)
