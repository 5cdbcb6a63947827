"""DeepSeek-V4 KV compression: interleaved partial RoPE (with YaRN), the block compressor
behind HCA and CSA, and the lightning indexer that picks CSA's top-k compressed entries.

Block compression (one entry per complete block of m tokens, stride m):

    C = x W_KV, Z = x W_Z + B[j]          per token, j = its slot in the block   [.., C_out]
    entry_w = RMSNorm( sum_j softmax_j(Z_j) * C_j ) then RoPE at position w * m   [D]

The softmax runs per channel over the slots of one entry. HCA uses m' tokens of the block
itself (C_out = D). CSA with overlap uses 2m slots: every token projects to 2D channels,
[Ca | Cb]; entry w pools the *previous* block's Ca halves with the *current* block's Cb
halves, so an entry sees 2m tokens while the stride stays m. The slots before block 0 have
zero value and -inf gate (weight 0).

Everything runs incrementally through :class:`CompressorState`: tokens of an incomplete
block wait in a buffer, the previous block's Ca half is kept for the overlap, and emitted
entries accumulate. A full-sequence forward is one call on a fresh state, so decoding
token by token and the full forward share the same code.

RoPE here pairs *adjacent* channels (2i, 2i+1) and rotates the *last* ``rope_dim``
channels of a vector ([nope | rope] layout), unlike the half-split :mod:`v4lab.modules.rope`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.modules.norm import RMSNorm
from v4lab.modules.sparse import select_topk


def rope_inv_freq(dim: int, theta: float, yarn_factor: float = 1.0, yarn_original_len: int = 0,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """Inverse frequencies [dim / 2] (fp32) of a RoPE of width ``dim`` and base ``theta``.

    With ``yarn_factor > 1`` the YaRN blend: high-frequency pairs (more than ``beta_fast``
    turns over ``yarn_original_len`` positions) keep their frequency, low-frequency pairs
    (fewer than ``beta_slow`` turns) are slowed by ``yarn_factor``, a linear ramp in
    between. V4 uses no YaRN attention scaling (cos/sin are not multiplied by an mscale).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if yarn_factor <= 1.0:
        return inv_freq

    def pair_index(turns: float) -> float:  # the pair whose wavelength gives `turns` rotations
        return dim * math.log(yarn_original_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return inv_freq / yarn_factor * (1 - keep) + inv_freq * keep


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, rope_dim / 2] in fp32."""
    ang = positions.float()[:, None] * inv_freq.float()[None, :]
    return ang.cos(), ang.sin()


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2 * cos.shape[-1] channels of x in adjacent pairs.

    x: [B, T, d] or [B, T, H, d]; cos, sin: [T, r / 2]. Pass ``-sin`` for R(-t).
    Computed in fp32, returned in x's dtype.
    """
    r = 2 * cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos[:, None, :], sin[:, None, :]
    nope, rot = x[..., :-r], x[..., -r:].float()
    a, b = rot[..., 0::2], rot[..., 1::2]
    rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat([nope, rot.to(x.dtype)], dim=-1)


def rotate_tail_(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """In place, what :func:`rope_tail` returns, for fp32 x: the last 2 * turn.shape[-1]
    channels, in adjacent pairs (re, im), times ``turn`` = cos + i sin (complex64, shaped to
    broadcast over the pairs; its conjugate for R(-t)). Returns x. Three dispatches instead
    of a dozen: decoding one token is dominated by per-operator overhead. The complex
    product is (a cos - b sin, a sin + b cos) as in rope_tail, to fp32 round-off."""
    r = 2 * turn.shape[-1]
    torch.view_as_complex(x[..., -r:].view(*x.shape[:-1], -1, 2)).mul_(turn)
    return x


@dataclass
class CompressorState:
    """Incremental state of one :class:`BlockCompressor` (batch B, out width D).

    buf_kv, buf_gate: [B, r, C] projected tokens of the incomplete block (r < m)
    prev_kv, prev_gate: [B, m, D] Ca half of the last complete block (overlap only)
    count: entries emitted so far (entry w covers tokens < (w + 1) m)
    """

    buf_kv: torch.Tensor | None = None
    buf_gate: torch.Tensor | None = None
    prev_kv: torch.Tensor | None = None
    prev_gate: torch.Tensor | None = None
    count: int = 0


class BlockCompressor(nn.Module):
    """Compresses every complete block of ``ratio`` tokens into one entry of width ``out_dim``.

    overlap=True is CSA's two-series layout (2 * ratio slots per entry, projections to
    2 * out_dim); overlap=False pools the block's own tokens (HCA, or CSA's no_overlap).
    ``forward(x [B, T, dim], state)`` -> the entries of the blocks x completes [B, n, out_dim]
    (on a fresh state: all complete blocks of x).
    """

    def __init__(self, dim: int, out_dim: int, ratio: int, overlap: bool, inv_freq: torch.Tensor,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.out_dim, self.ratio, self.overlap = out_dim, ratio, overlap
        width = 2 * out_dim if overlap else out_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(out_dim, eps)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _overlap_slots(self, kv: torch.Tensor, gate: torch.Tensor,
                       state: CompressorState) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n, m, 2D] -> [B, n, 2m, D]: previous block's Ca slots, then this block's Cb."""
        d = self.out_dim
        ca_kv, cb_kv = kv[..., :d], kv[..., d:]
        ca_gate, cb_gate = gate[..., :d], gate[..., d:]
        if state.prev_kv is None:  # before block 0: zero value, -inf gate -> weight 0
            first_kv = torch.zeros_like(ca_kv[:, :1])
            first_gate = torch.full_like(ca_gate[:, :1], float("-inf"))
        else:
            first_kv, first_gate = state.prev_kv[:, None], state.prev_gate[:, None]
        prev_kv = torch.cat([first_kv, ca_kv[:, :-1]], dim=1)
        prev_gate = torch.cat([first_gate, ca_gate[:, :-1]], dim=1)
        state.prev_kv, state.prev_gate = ca_kv[:, -1], ca_gate[:, -1]
        return torch.cat([prev_kv, cb_kv], dim=2), torch.cat([prev_gate, cb_gate], dim=2)

    def forward(self, x: torch.Tensor, state: CompressorState) -> torch.Tensor:
        return self.pool(self.wkv(x), self.wgate(x), state)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState) -> torch.Tensor:
        """forward() from the projections kv = x W_KV, gate = x W_Z [B, T, C] (decoding
        computes them in one matmul with the layer's other projections of x)."""
        if kv.shape[1] == 1 and state.buf_kv is not None and state.buf_kv.shape[1] + 1 < self.ratio:
            # decoding inside a block: the token waits in the buffer (the general path below
            # does the same, with more operators)
            state.buf_kv = torch.cat([state.buf_kv, kv], 1)
            state.buf_gate = torch.cat([state.buf_gate, gate], 1)
            return kv.new_zeros(kv.shape[0], 0, self.out_dim)
        if state.buf_kv is not None:
            kv, gate = torch.cat([state.buf_kv, kv], 1), torch.cat([state.buf_gate, gate], 1)
        m = self.ratio
        n = kv.shape[1] // m
        state.buf_kv, state.buf_gate = kv[:, n * m:], gate[:, n * m:]
        if n == 0:
            return kv.new_zeros(kv.shape[0], 0, self.out_dim)
        kv = kv[:, : n * m].unflatten(1, (n, m))
        gate = gate[:, : n * m].unflatten(1, (n, m)) + self.position_bias
        if self.overlap:
            kv, gate = self._overlap_slots(kv, gate, state)
        weights = gate.float().softmax(dim=2).to(kv.dtype)  # per channel, over the slots
        pooled = self.norm((kv * weights).sum(dim=2))  # [B, n, D]
        positions = (torch.arange(n, device=kv.device) + state.count) * m  # each block's first token
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        state.count += n
        return rope_tail(pooled, cos, sin)


def usable_entries(positions: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """[T, N] bool: entry w is usable by the query at position t once its block is complete,
    i.e. (w + 1) * ratio <= t + 1."""
    w = torch.arange(n_entries, device=positions.device)
    return w[None, :] < ((positions + 1) // ratio)[:, None]


class LightningIndexerV4(nn.Module):
    """CSA's lightning indexer over compressed entries.

    Its own :class:`BlockCompressor` (width ``head_dim``) makes the index keys K_s; its
    queries come from the shared query latent c_Q, RoPE'd at the query position:

        I(t, s) = sum_h w(t, h) * ReLU(q(t, h) . K_s) / sqrt(head_dim),
        w(t, h) = (x_t W_w)_h / sqrt(n_heads)

    ``keys(x, state)`` -> keys of the blocks x completes [B, n, head_dim];
    ``scores(x, q_latent, keys [B, N, head_dim], cos, sin)`` -> [B, T, N].
    """

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int,
                 overlap: bool, inv_freq: torch.Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.compressor = BlockCompressor(dim, head_dim, ratio, overlap, inv_freq, eps)
        self.wq = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        # MXFP4 fake quantiser of q and K (set by v4lab.modules.fp4 under trainer.quantize)
        self.qk_quant: nn.Module | None = None

    def keys(self, x: torch.Tensor, state: CompressorState) -> torch.Tensor:
        return self.compressor(x, state)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = rope_tail(self.wq(q_latent).view(b, t, self.n_heads, self.head_dim), cos, sin)
        if self.qk_quant is not None:  # the RoPE'd q and K, as they enter the matmul
            q, keys = self.qk_quant(q), self.qk_quant(keys)
        dots = F.relu(torch.einsum("bthd,bsd->bths", q.float(), keys.float())) * self.head_dim ** -0.5
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B, T, H]
        return torch.einsum("bths,bth->bts", dots, w)


def topk_entry_bias(scores: torch.Tensor, usable: torch.Tensor, topk: int) -> torch.Tensor:
    """Additive bias [B, T, N] (0 or -inf) that keeps each query's top-k usable entries.

    scores: [B, T, N] indexer scores; usable: [T, N] (or [B, T, N]) causal availability.
    k = min(topk, N), ties at the k-th score taken in index order (ReLU scores tie at 0);
    a query with fewer than k complete blocks keeps just those.
    """
    if scores.shape[-1] == 0:
        return scores.clone()
    keep = select_topk(scores.masked_fill(~usable, float("-inf")), topk) & usable
    return torch.zeros_like(scores).masked_fill(~keep, float("-inf"))
