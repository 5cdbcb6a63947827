"""Depthwise dilated convolution over time as K shifted products (Engram's causal conv).

    y[:, t] = sum_i w[:, i] * x[:, t + i * dilation]        x: [B, T + (K-1) dilation, C]

The forward is the K shifted products (as fast as F.conv1d's depthwise kernel on CPU);
the backward is written out: autograd would give every shifted slice a zero-filled
gradient of x's full size and add them up (K allocations, fills and additions of
[B, T + pad, C]), where one zero gradient and K in-place multiply-adds suffice.
"""

from __future__ import annotations

import torch


class _ShiftedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor,  # type: ignore[override]
                dilation: int, t: int) -> torch.Tensor:
        out = x[:, :t] * w[:, 0]
        for i in range(1, w.shape[1]):
            out = out + x[:, i * dilation: i * dilation + t] * w[:, i]
        ctx.save_for_backward(x, w)
        ctx.dilation = dilation
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        d, t = ctx.dilation, grad.shape[1]
        grad_x = torch.zeros_like(x)
        grad_w = torch.empty_like(w)
        for i in range(w.shape[1]):
            grad_x[:, i * d: i * d + t].addcmul_(grad, w[:, i])
            grad_w[:, i] = (grad * x[:, i * d: i * d + t]).sum((0, 1))
        return grad_x, grad_w, None, None


def shifted_conv(x: torch.Tensor, w: torch.Tensor, dilation: int, t: int) -> torch.Tensor:
    """y [B, t, C] from the (left-padded) input x [B, t + (K-1) dilation, C] and depthwise
    weights w [C, K]: y[:, s] = sum_i w[:, i] x[:, s + i dilation]."""
    return _ShiftedConv.apply(x, w, dilation, t)
