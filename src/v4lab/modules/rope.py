"""Rotary position embedding (RoPE), half-split convention.

A vector of even width d is split into halves (x1, x2); pair i = (x1[i], x2[i]) is
rotated by angle pos * theta^(-2i/d). Angles are computed from explicit positions, so
any position (also a shifted one) can be used, and R(a)·R(b) = R(a+b) holds exactly
up to round-off.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles.

    positions: [T] (or [B, T]) integer or float positions.
    Returns cos, sin: [T, dim // 2] (or [B, T, dim // 2]) in fp32.
    """
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by the angles whose cos/sin are given.

    x: [B, T, H, d] (or [B, T, d]); cos, sin: [T, d/2] broadcastable to x's leading dims.
    Use ``sin = -sin`` for the inverse rotation. Returns x's shape and dtype.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    if x.dim() == 4 and cos.dim() == 2:  # [T, d/2] -> [1, T, 1, d/2]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    elif x.dim() == 4 and cos.dim() == 3:  # [B, T, d/2] -> [B, T, 1, d/2]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)
