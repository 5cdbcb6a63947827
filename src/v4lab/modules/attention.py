"""Plain multi-head causal attention with RoPE and a KV cache (the baseline attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.modules.args import AttentionConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.rope import apply_rope

# torch dtype of a float KV cache (fp8 / int8 caches: modules/kv_quant.py STORE_DTYPES)
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _RoundThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def round_through(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` and back (bit-exactly), with a straight-through gradient.

    Training uses this on cached tensors so it sees the values decoding will read.
    """
    if x.dtype == dtype:
        return x
    return _RoundThrough.apply(x, dtype)


def causal_mask(t_q: int, t_k: int, start: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [t_q, t_k]: query i (at position start+i) sees keys j <= start+i."""
    q_pos = torch.arange(t_q, device=device)[:, None] + start
    return torch.arange(t_k, device=device)[None, :] <= q_pos


class KVCache:
    """Per-layer cache of keys and values for MHA.

    k, v: [B, max_len, H, head_dim] in the storage dtype. ``update`` writes the new
    entries at ``start`` and returns the filled prefix [B, start+T, H, head_dim].
    """

    def __init__(self, batch: int, max_len: int, n_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.k = torch.zeros(batch, max_len, n_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        if end > self.k.shape[1]:
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.k.shape[1]}")
        self.k[:, start:end] = k.to(self.k.dtype)
        self.v[:, start:end] = v.to(self.v.dtype)
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def bytes_per_token(self) -> int:
        """Bytes stored per token (this layer), from the stored tensors."""
        return (self.k[0, 0].numel() * self.k.element_size()
                + self.v[0, 0].numel() * self.v.element_size())


class MultiHeadAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on the full head width.

    x: [B, T, dim] -> [B, T, dim]. With a cache, x holds tokens at ``ctx.positions``
    and attends over everything cached so far plus itself.
    """

    def __init__(self, dim: int, cfg: AttentionConfig, rope_theta: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_theta = cfg.n_heads, cfg.head_dim, rope_theta
        self.store_dtype = STORAGE_DTYPES[cfg.kv_cache.dtype]
        inner = cfg.n_heads * cfg.head_dim
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wk = nn.Linear(dim, inner, bias=False)
        self.wv = nn.Linear(dim, inner, bias=False)
        self.wo = nn.Linear(inner, dim, bias=False)

    def new_cache(self, batch: int, max_len: int, device: torch.device | str = "cpu") -> KVCache:
        return KVCache(batch, max_len, self.n_heads, self.head_dim, self.store_dtype, device)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_heads, self.head_dim)
        cos, sin = ctx.rope(self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = round_through(k, self.store_dtype), round_through(v, self.store_dtype)
        start = int(ctx.positions[0]) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(k, v, start)
            k, v = k.to(q.dtype), v.to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        if k.shape[2] == t:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = causal_mask(t, k.shape[2], start, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))
