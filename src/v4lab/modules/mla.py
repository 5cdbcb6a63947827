"""Multi-head latent attention (DeepSeek-V2/V3 MLA) with optional token-level sparse
attention (lightning indexer + top-k), VVPA and a quantised KV cache.

Shapes: H heads, r = kv_lora_rank, dn = qk_nope_head_dim, dr = qk_rope_head_dim,
dv = v_head_dim.

    q        = W_QB RMSNorm(W_QA x)                    [B, T, H, dn + dr]  (q_rope rotated at t)
    c_kv     = RMSNorm((W_KVA x)[:r])                  [B, T, r]
    k_rope   = R(s) (W_KVA x)[r:]                      [B, T, dr]  shared by all heads
    k_nope, v = W_UK c_kv, W_UV c_kv                    [B, T, H, dn], [B, T, H, dv]
    score    = (q_nope . k_nope + q_rope . k_rope) / sqrt(dn + dr)

The cache holds only [c_kv ; k_rope] per token (plus the indexer key when sparse).

Two paths that agree:
- training (no cache): up-project keys and values, one fused attention call;
- decode (cache): absorbed. W_UK is folded into the query (q_lat = q_nope W_UK, [H, r]),
  attention is MQA over the cached [c_kv ; k_rope] entries, W_UV is applied to the
  attended latent. The sparse decode path gathers only the k selected cache entries.
  A dense prefill of an empty cache (t > 1 at position 0) stores the cache entries and
  takes the training path, which computes the same outputs faster.

VVPA: the value of head h is [v ; k_rope] (k_rope rotated at the key position s) and
the head output becomes [o_nope ; R(-t) o_rope], so each value enters through R(s - t).

Cache numerics: training applies to c_kv and k_rope exactly the rounding the cache will
apply (bf16 round, or fp8/int8 block quantise-dequantise) with a straight-through
gradient; decode stores the real low-precision tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.modules.args import AttentionConfig, KVCacheConfig
from v4lab.modules.attention import STORAGE_DTYPES, round_through
from v4lab.modules.context import ForwardContext
from v4lab.modules.kv_quant import SCALE_DTYPES, STORE_DTYPES, dequantize, fake_quant, quantize
from v4lab.modules.norm import RMSNorm
from v4lab.modules.rope import apply_rope
from v4lab.modules.sparse import (
    LightningIndexer,
    head_summed_distribution,
    indexer_kl_biased,
    mask_bias,
    recall,
    select_topk_causal,
    topk_indices,
)


def rope_store_dtype(kv_dtype: str) -> torch.dtype:
    """Storage dtype of the rotary key (and the indexer key): fp32 only in an fp32 cache."""
    return torch.float32 if kv_dtype == "fp32" else torch.bfloat16


class MLACache:
    """Per-layer MLA decode cache: [c_kv ; k_rope] per token, plus indexer keys if sparse.

    kv:     [B, L, r] fp32 | bf16 | float8_e4m3fn | int8
    scale:  [B, L, r / block] fp32 or float8_e8m0fnu (ue8m0), fp8/int8 only
    k_rope: [B, L, dr] rotated rotary key, bf16 (fp32 in an fp32 cache)
    idx_k:  [B, L, d_I] lightning-indexer key (sparse only), same dtype as k_rope
    """

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 cfg: KVCacheConfig, index_dim: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.quantized = cfg.dtype in STORE_DTYPES
        kv_dtype = STORE_DTYPES[cfg.dtype] if self.quantized else STORAGE_DTYPES[cfg.dtype]
        self.kv = torch.zeros(batch, max_len, kv_lora_rank, dtype=kv_dtype, device=device)
        self.scale = None
        if self.quantized:
            self.scale = torch.ones(batch, max_len, kv_lora_rank // cfg.block_size,
                                    device=device).to(SCALE_DTYPES[cfg.scale_format])
        rdt = rope_store_dtype(cfg.dtype)
        self.k_rope = torch.zeros(batch, max_len, rope_dim, dtype=rdt, device=device)
        self.idx_k = (torch.zeros(batch, max_len, index_dim, dtype=rdt, device=device)
                      if index_dim else None)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.kv.shape[1]

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor, idx_k: torch.Tensor | None,
               start: int) -> None:
        """Store new entries c_kv [B, T, r], k_rope [B, T, dr] (, idx_k [B, T, d_I]) at start."""
        end = start + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.max_len}")
        if self.quantized:
            q, s = quantize(c_kv, self.cfg.dtype, self.cfg.block_size, self.cfg.scale_format)
            self.kv[:, start:end], self.scale[:, start:end] = q, s
        else:
            self.kv[:, start:end] = c_kv.to(self.kv.dtype)
        self.k_rope[:, start:end] = k_rope.to(self.k_rope.dtype)
        if self.idx_k is not None:
            self.idx_k[:, start:end] = idx_k.to(self.idx_k.dtype)
        self.length = end

    def _dequant(self, kv: torch.Tensor, scale: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
        return dequantize(kv, scale, dtype) if self.quantized else kv.to(dtype)

    def latent(self, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All entries so far: c_kv [B, end, r], k_rope [B, end, dr] in ``dtype``."""
        scale = self.scale[:, :end] if self.quantized else None
        return self._dequant(self.kv[:, :end], scale, dtype), self.k_rope[:, :end].to(dtype)

    def gather(self, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the selected entries: idx [B, T, k] -> c_kv [B, T, k, r], k_rope [B, T, k, dr]."""
        b = torch.arange(idx.shape[0], device=idx.device)[:, None, None]
        kv = self.kv.view(torch.uint8)[b, idx].view(self.kv.dtype) if self.quantized \
            else self.kv[b, idx]
        scale = None
        if self.quantized:
            scale = self.scale.view(torch.uint8)[b, idx].view(self.scale.dtype) \
                if self.scale.element_size() == 1 else self.scale[b, idx]
        return self._dequant(kv, scale, dtype), self.k_rope[b, idx].to(dtype)

    def index_keys(self, end: int) -> torch.Tensor:
        return self.idx_k[:, :end]

    def breakdown(self) -> dict[str, int]:
        """Bytes stored per token (this layer) per tensor, read off the stored tensors."""
        tensors = {"kv": self.kv, "scale": self.scale, "k_rope": self.k_rope, "idx_k": self.idx_k}
        return {name: t[0, 0].numel() * t.element_size()
                for name, t in tensors.items() if t is not None}

    def bytes_per_token(self) -> int:
        """Bytes stored per token (this layer), all cache tensors, from the stored tensors."""
        return sum(self.breakdown().values())


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA: q, k [B, H, T, dq], v [B, H, T, dv] -> [B, H, T, dv].

    On CPU, torch's fused (flash) SDPA kernel needs dq == dv; otherwise SDPA falls back to
    the math path, which materialises the full [B, H, T, T] scores (masked half included)
    and is about 1.5-2x slower forward + backward at T = 512. MLA has dq = dn + dr > dv,
    so the narrower side is zero-padded (exact: zero value columns give zero outputs, zero
    query/key columns add nothing to the scores) and the output sliced back.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    if q.device.type != "cpu" or dq == dv:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if dv < dq:
        o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, dq - dv)), is_causal=True, scale=scale)
        return o[..., :dv]
    pad = (0, dv - dq)
    return F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), v, is_causal=True, scale=scale)


class _BiasedAttention(torch.autograd.Function):
    """Attention under an additive bias, returning its probabilities too:
    q, k [B, H, T, dq], v [B, H, T, dv], bias [B, T, T] -> (o [B, H, T, dv], p [B, H, T, T]).

    The sparse training step needs both the attention output over the selected keys and
    those keys' probabilities (the indexer's KL target). Fused SDPA returns only the output,
    so the target used to recompute every score and softmax a second time; here one score
    product and one softmax serve both (about 3% of the full model's step on CPU). p is
    not differentiable (the target is detached). Backward, with P the probabilities and
    dO the output gradient: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K
    scale, dK = dS^T Q scale (rowsum(dO * O) = rowsum(P * dO V^T), the softmax backward).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):  # type: ignore[override]
        b, h, t, d = q.shape
        scores = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, t, d).transpose(1, 2))
        p = scores.view(b, h, t, t).mul_(scale).add_(bias[:, None]).softmax(-1)
        o = torch.bmm(p.view(b * h, t, t), v.reshape(b * h, t, -1)).view(b, h, t, -1)
        ctx.save_for_backward(q, k, v, p, o)
        ctx.scale = scale
        ctx.mark_non_differentiable(p)
        return o, p

    @staticmethod
    def backward(ctx, grad_o, _grad_p):  # type: ignore[override]
        q, k, v, p, o = ctx.saved_tensors
        b, h, t, d = q.shape
        p, grad_o = p.view(b * h, t, t), grad_o.reshape(b * h, t, -1)
        grad_v = torch.bmm(p.transpose(1, 2), grad_o)
        grad_s = torch.bmm(grad_o, v.reshape(b * h, t, -1).transpose(1, 2))
        grad_s.sub_((grad_o * o.view(b * h, t, -1)).sum(-1, keepdim=True)).mul_(p)
        grad_q = torch.bmm(grad_s, k.reshape(b * h, t, d)).mul_(ctx.scale)
        grad_k = torch.bmm(grad_s.transpose(1, 2), q.reshape(b * h, t, d)).mul_(ctx.scale)
        return grad_q.view_as(q), grad_k.view_as(k), grad_v.view_as(v), None, None


def _scores_over_cache(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, d] . keys [B, S, d] -> [B, T, H, S].

    In fp32 one batched product against the transposed keys is fastest. In bf16/fp16 the
    CPU batched product first copies the transposed [B, d, S] keys (about 0.4 ms per layer
    and token at S = 2K, most of a decode step); multiplying the keys as they are stored
    by the small transposed query avoids that copy (2.7x faster at S = 2K, d = 128).
    """
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return torch.einsum("bthd,bsd->bths", q, keys)
    b, t, h, d = q.shape
    out = torch.matmul(keys, q.reshape(b, t * h, d).transpose(1, 2))  # [B, S, T*H]
    return out.transpose(1, 2).reshape(b, t, h, -1)


class MultiHeadLatentAttention(nn.Module):
    """MLA with optional sparse top-k attention, VVPA and a quantised cache.

    forward(x [B, T, dim], ctx, cache: MLACache | None) -> [B, T, dim].
    Without a cache x is a whole sequence at ``ctx.positions`` (training path); with one,
    x holds new tokens at ``ctx.positions`` that attend over the cache (decode path).
    """

    def __init__(self, dim: int, cfg: AttentionConfig, rope_theta: float, norm_eps: float) -> None:
        super().__init__()
        self.cfg, self.rope_theta = cfg, rope_theta
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.vvpa = cfg.vvpa
        self.scale = (self.dn + self.dr) ** -0.5
        h = self.n_heads
        if self.q_lora_rank:
            self.wq_a = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, h * (self.dn + self.dr), bias=False)
        else:
            self.wq = nn.Linear(dim, h * (self.dn + self.dr), bias=False)
        self.wkv_a = nn.Linear(dim, self.kv_lora_rank + self.dr, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, h * (self.dn + self.dv), bias=False)
        self.out_head_dim = self.dv + (self.dr if self.vvpa else 0)
        self.wo = nn.Linear(h * self.out_head_dim, dim, bias=False)
        self.sparse = cfg.sparse if cfg.sparse.enabled else None
        self.indexer = None
        if self.sparse is not None:
            self.indexer = LightningIndexer(dim, self.q_lora_rank or dim, cfg.sparse, rope_theta)
        self.kv_dtype = cfg.kv_cache.dtype
        self.rope_dtype = rope_store_dtype(self.kv_dtype)

    def new_cache(self, batch: int, max_len: int, device: torch.device | str = "cpu") -> MLACache:
        index_dim = self.sparse.index_head_dim if self.sparse is not None else 0
        return MLACache(batch, max_len, self.kv_lora_rank, self.dr, self.cfg.kv_cache,
                        index_dim, device)

    # ---- shared projections -------------------------------------------------------
    def _cache_numerics(self, c_kv: torch.Tensor,
                        k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv and k_rope rounded exactly as the cache stores them, straight-through gradient.

        The one place the training path applies the cache's numerics (tests replace it to
        feed the full forward the values a decode cache actually stored)."""
        kc = self.cfg.kv_cache
        if kc.dtype in STORE_DTYPES:
            c_kv = fake_quant(c_kv, kc.dtype, kc.block_size, kc.scale_format)
        else:
            c_kv = round_through(c_kv, STORAGE_DTYPES[kc.dtype])
        return c_kv, round_through(k_rope, self.rope_dtype)

    def forward(self, x: torch.Tensor, ctx: ForwardContext,
                cache: MLACache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_lora_rank:
            qr = self.q_norm(self.wq_a(x))
            q = self.wq_b(qr)
        else:
            qr, q = x, self.wq(x)
        q_nope, q_rope = q.view(b, t, self.n_heads, self.dn + self.dr).split([self.dn, self.dr], -1)
        cos, sin = ctx.rope(self.dr, self.rope_theta)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.dr], -1)
        c_kv = self.kv_norm(c_kv)
        k_rope = apply_rope(k_rope, cos, sin)  # [B, T, dr], rotated at the key position
        index = None
        if self.indexer is not None:
            # The indexer learns only from its KL loss: its input is cut from the graph.
            xi, qri = x.detach(), qr.detach()
            idx_q, idx_w = self.indexer.queries(xi, qri, ctx)
            idx_k = round_through(self.indexer.keys(xi, ctx), self.rope_dtype)
            index = (idx_q, idx_w, idx_k)
        if cache is None:
            o = self._train_path(q_nope, q_rope, c_kv, k_rope, index, ctx)
        elif t > 1 and int(ctx.positions[0]) == 0 and index is None:
            # Prefill of an empty cache: the chunk attends only to itself, so the training
            # path (up-projected keys, fused causal SDPA, the cache's rounding applied) gives
            # what the absorbed path would, at about half the cost for a 2K prompt.
            cache.update(c_kv, k_rope, None, 0)
            o = self._train_path(q_nope, q_rope, c_kv, k_rope, None, ctx)
        else:
            o = self._decode_path(q_nope, q_rope, c_kv, k_rope, index, ctx, cache)
        if self.vvpa:  # rotate the rotary part of each head's output back by the query position
            o = torch.cat([o[..., : self.dv], apply_rope(o[..., self.dv:], cos, -sin)], -1)
        return self.wo(o.reshape(b, t, -1))

    # ---- training path ------------------------------------------------------------
    def _train_path(self, q_nope, q_rope, c_kv, k_rope, index, ctx: ForwardContext) -> torch.Tensor:
        """Up-projected keys/values, one attention call. Returns o [B, T, H, out_head_dim]."""
        b, t, h, _ = q_nope.shape
        c_kv, k_rope = self._cache_numerics(c_kv, k_rope)
        k_nope, v = self.wkv_b(c_kv).view(b, t, h, self.dn + self.dv).split([self.dn, self.dv], -1)
        k_rope_h = k_rope[:, :, None, :].expand(b, t, h, self.dr)
        qh = torch.cat([q_nope, q_rope], -1).transpose(1, 2)  # [B, H, T, dn + dr]
        kh = torch.cat([k_nope, k_rope_h], -1).transpose(1, 2)
        vh = (torch.cat([v, k_rope_h], -1) if self.vvpa else v).transpose(1, 2)
        o = (_causal_attention(qh, kh, vh, self.scale) if index is None
             else self._sparse_train(qh, kh, vh, index, ctx))
        return o.transpose(1, 2)

    def _sparse_train(self, qh, kh, vh, index, ctx: ForwardContext) -> torch.Tensor:
        """Indexer scores, selection, attention over the selected keys, KL loss and stats
        for the training path. Returns o [B, H, T, dv]. Plain causal attention in the
        dense warm-up, or when top-k keeps every key."""
        idx_q, idx_w, idx_k = index
        t = qh.shape[2]
        topk = self.sparse.topk
        causal = torch.ones(t, t, dtype=torch.bool, device=qh.device).tril()
        causal_bias = torch.zeros(t, t, device=qh.device).masked_fill_(~causal, float("-inf"))
        scores = self.indexer.causal_scores(idx_q, idx_w, idx_k)  # [B, T, T], s <= t
        with torch.no_grad():
            selected = select_topk_causal(scores + causal_bias.to(scores.dtype), topk)
        dense_phase = ctx.step is not None and ctx.step < self.sparse.warmup_steps
        bias = None if (dense_phase or topk >= t) else mask_bias(selected, qh.dtype)
        if not ctx.records and not torch.is_grad_enabled():  # plain inference: no loss, no stats
            return (_causal_attention(qh, kh, vh, self.scale) if bias is None else
                    F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias[:, None], scale=self.scale))
        causal_bias = causal_bias.to(qh.dtype)
        if bias is None:
            o = _causal_attention(qh, kh, vh, self.scale)
            p_dense = target = self._dense_target(qh, kh, causal_bias)
        elif qh.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            o, probs = _BiasedAttention.apply(qh, kh, vh, bias, self.scale)
            target = head_summed_distribution(probs)
            p_dense = self._dense_target(qh, kh, causal_bias) if ctx.diagnose else None
        else:  # measured on CPU in fp32 only: elsewhere fused SDPA, and the target apart
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias[:, None], scale=self.scale)
            p_dense, target = self._kl_targets(qh, kh, causal_bias, bias, ctx.diagnose)
        kl = indexer_kl_biased(target, scores,
                               mask_bias(causal, scores.dtype) if bias is None else bias)
        if torch.is_grad_enabled():
            ctx.add_loss("sparse/indexer_kl", kl * self.sparse.kl_weight)
        ctx.add_stat("sparse/indexer_kl", kl)
        if ctx.diagnose:
            ctx.add_stat("sparse/recall", recall(p_dense, selected, causal, topk))
        return o

    def _dense_target(self, qh, kh, causal_bias: torch.Tensor) -> torch.Tensor:
        """Head-summed dense main attention [B, T, T] over the causal keys."""
        return self._kl_targets(qh, kh, causal_bias, None)[0]

    @torch.no_grad()
    def _kl_targets(self, qh, kh, causal_bias: torch.Tensor, bias: torch.Tensor | None,
                    dense: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Head-summed main attention [B, T, T]: dense over the causal keys (None when
        ``dense`` is off and ``bias`` is given: only the recall reads it), and over the keys
        of ``bias`` (the dense one again when None). The causal logits come from one
        product (-inf added above the diagonal); the selected softmax reuses their buffer."""
        b, h, t, _ = qh.shape
        logits = torch.baddbmm(causal_bias, qh.reshape(b * h, t, -1),
                               kh.reshape(b * h, t, -1).transpose(1, 2),
                               alpha=self.scale).view(b, h, t, t)
        if bias is None:
            p_dense = head_summed_distribution(logits.softmax(-1))
            return p_dense, p_dense
        p_dense = head_summed_distribution(logits.softmax(-1)) if dense else None
        return p_dense, head_summed_distribution(logits.add_(bias[:, None]).softmax(-1))

    # ---- decode path --------------------------------------------------------------
    def _decode_path(self, q_nope, q_rope, c_kv, k_rope, index, ctx: ForwardContext,
                     cache: MLACache) -> torch.Tensor:
        """Absorbed attention over the cached latent. Returns o [B, T, H, out_head_dim]."""
        b, t, h, _ = q_nope.shape
        start = int(ctx.positions[0])
        end = start + t
        cache.update(c_kv, k_rope, index[2] if index is not None else None, start)
        w = self.wkv_b.weight.view(h, self.dn + self.dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # [B, T, H, r]
        q_pos = torch.arange(start, end, device=q_nope.device)
        dtype = q_nope.dtype
        if index is not None and self.sparse.topk < end:
            idx_q, idx_w, _ = index
            scores = self.indexer.scores(idx_q, idx_w, cache.index_keys(end))  # [B, T, end]
            if t > 1:  # one new token sees every cached entry: no mask needed
                causal = torch.arange(end, device=q_nope.device)[None, :] <= q_pos[:, None]
                scores = scores.masked_fill(~causal, float("-inf"))
            sel = topk_indices(scores, self.sparse.topk)  # [B, T, k]
            kv, kr = cache.gather(sel, dtype)  # [B, T, k, r], [B, T, k, dr]
            logits = (torch.einsum("bthr,btkr->bthk", q_lat, kv)
                      + torch.einsum("bthd,btkd->bthk", q_rope, kr)) * self.scale
            if t > 1:
                valid = sel <= q_pos[None, :, None]  # [B, T, k]
                logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
            p = logits.softmax(-1)
            o_lat = torch.einsum("bthk,btkr->bthr", p, kv)
            o_rope = torch.einsum("bthk,btkd->bthd", p, kr) if self.vvpa else None
        else:
            kv, kr = cache.latent(end, dtype)  # [B, S, r], [B, S, dr]
            logits = (_scores_over_cache(q_lat, kv) + _scores_over_cache(q_rope, kr)) * self.scale
            if t > 1:
                causal = torch.arange(end, device=q_nope.device)[None, :] <= q_pos[:, None]
                logits = logits.masked_fill(~causal[None, :, None, :], float("-inf"))
            p = logits.softmax(-1)
            o_lat = torch.einsum("bths,bsr->bthr", p, kv)
            o_rope = torch.einsum("bths,bsd->bthd", p, kr) if self.vvpa else None
        o = torch.einsum("bthr,hdr->bthd", o_lat, w_uv)  # [B, T, H, dv]
        if o_rope is not None:
            o = torch.cat([o, o_rope], -1)
        return o
