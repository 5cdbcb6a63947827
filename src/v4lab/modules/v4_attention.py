"""DeepSeek-V4 attention (released model): shared K=V MQA over a sliding window plus
compressed entries (CSA: top-k of lightly compressed blocks; HCA: all heavily compressed
blocks), with a per-head attention sink and a grouped output projection.

Shapes: H heads of width d (the last ``rope_dim`` channels carry RoPE), r = q_lora_rank.

    c_Q  = RMSNorm(x W_QA)                               [B, T, r]   (also the indexer's query latent)
    q    = R(t) RMSNorm_head(c_Q W_QB)                   [B, T, H, d] (unweighted RMS per head)
    kv   = R(s) RMSNorm(x W_KV)                          [B, T, d]   one head, both key and value
    keys = [kv of the window (t - W, t] ; compressed entries usable by t]
    o_h  = softmax([q_h . keys / sqrt(d) ; sink_h]) @ keys, sink column dropped
    o_h  = R(-t) on the rope channels (each key enters through R(s - t))
    out  = W_OB [ W_OA_g (o of the heads of group g) for g in groups ]

Layer kinds: ``sliding`` (window only), ``csa`` (window + top-k of the CSA entries chosen
by the lightning indexer), ``hca`` (window + every complete HCA block). Sliding layers use
RoPE base ``rope_theta``; CSA/HCA layers, their compressors and the indexer use
``compress_rope_theta`` with YaRN.

One code path serves training and decoding: a forward call takes an optional
:class:`V4LayerCache`; without one it runs on a fresh, discarded cache. The cache holds the
last W - 1 window entries, the compressors' states (incomplete block, overlap half,
emitted entries) and the next position, so decoding token by token (or in chunks) gives
the full forward's outputs. One fp32 token without autograd takes a lean path
(:mod:`v4lab.modules.v4_decode_step`: the same attention with a third of the operators).

Ablation switches (config): ``use_window`` (no_window), ``sink`` (no_sink), ``overlap``
(no_overlap: CSA blocks pool their own m tokens only), ``csa_topk``.

Training the CSA indexer (its top-k passes no gradient): in a training or validation
forward (``ctx.step`` set, no cache) the indexer's scores I [B, T, N] are pulled towards the
main attention over the compressed entries, as the lab's sparse MLA trains its indexer:

    p(t, .) = sum_h softmax_s(q_h(t) . e_s / sqrt(d), s in S(t)) / H     (no gradient)
    KL      = mean_t KL(p(t, .) || softmax_s(I(t, s), s in S(t)))         ("v4/indexer_kl")

S(t): every complete entry during ``index_warmup_steps`` (when CSA also attends densely),
then the indexer's own top-k. The indexer reads x and c_Q detached, so the KL trains only
the indexer (its compressor, query and weight projections). Logged: the KL and
``v4/recall``, the share of the main attention's own top-k entries the indexer picked.
"""

from __future__ import annotations

import torch
from torch import nn

from v4lab.errors import require
from v4lab.modules import v4_decode_step
from v4lab.modules.compressor import (
    BlockCompressor,
    LightningIndexerV4,
    rope_cos_sin,
    rope_inv_freq,
    rope_tail,
    topk_entry_bias,
    usable_entries,
)
from v4lab.modules.context import ForwardContext
from v4lab.modules.norm import RMSNorm
from v4lab.modules.sparse import head_summed_distribution, indexer_kl, recall
from v4lab.modules.v4_cache import EntryStore, V4LayerCache
from v4lab.modules.v4_config import LAYER_KINDS, V4AttentionConfig

__all__ = ["LAYER_KINDS", "V4AttentionConfig", "V4Attention", "V4LayerCache", "attend_with_sink"]


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim without a gain (the per-head query norm)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def keep_bias(keep: torch.Tensor) -> torch.Tensor:
    """Additive attention bias: 0 where ``keep``, -inf elsewhere (same shape, fp32)."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, float("-inf"))


def attend_with_sink(q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor,
                     sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of every head over shared K=V entries, one extra sink logit per head.

    q: [B, T, H, d]; keys: [B, S, d] (also the values); bias: [B or 1, T, S] (0 or -inf);
    sinks: [H] or None. Returns [B, T, H, d]. The sink takes probability mass but carries
    no value. Without sinks, a query with no visible key (possible with no_window) gets a
    zero output instead of NaN: its sink column is then 0 and every other logit -inf.
    """
    b, t, h, d = q.shape
    logits = torch.einsum("bthd,bsd->bhts", q.float(), keys.float()) * d ** -0.5 + bias[:, None].float()
    if sinks is not None:
        sink = sinks.float().view(1, h, 1, 1).expand(b, h, t, 1)
    else:
        empty = torch.isinf(bias).all(-1)[:, None, :, None].expand(b, h, t, 1)
        sink = torch.where(empty, 0.0, float("-inf"))
    probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bhts,bsd->bthd", probs, keys.float()).to(q.dtype)


def window_keys(kv: torch.Tensor, store: EntryStore, window: int,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window entries visible to the chunk and their bias; the store keeps the last W - 1.

    kv: [B, T, d] this chunk's entries at ``positions`` [T]. Returns keys [B, S, d], bias [1, T, S].
    """
    keys = store.extend(kv, keep=window - 1)
    s_pos = torch.arange(keys.shape[1], device=kv.device) + positions[0] - (keys.shape[1] - kv.shape[1])
    seen = (s_pos[None, :] <= positions[:, None]) & (s_pos[None, :] > positions[:, None] - window)
    return keys, keep_bias(seen)[None]


class V4Attention(nn.Module):
    """One DeepSeek-V4 attention layer of kind 'sliding' | 'csa' | 'hca'.

    ``forward(x [B, T, dim], ctx=None, cache=None)`` -> [B, T, dim]; with a cache, x
    continues at ``cache.pos`` and the cache is advanced. The (x, ctx, cache) signature,
    ``new_cache(batch, max_len, device)`` and ``init_weights(std)`` follow the model's
    block protocol (as MLA does); ctx checks the positions and, with ``ctx.step`` set (training
    and validation), receives the CSA indexer's KL loss and statistics.
    """

    def __init__(self, dim: int, cfg: V4AttentionConfig, kind: str) -> None:
        super().__init__()
        require(kind in LAYER_KINDS, "kind", kind, f"one of {LAYER_KINDS}")
        require(kind != "sliding" or cfg.use_window, "kind", kind,
                "a compressed kind when use_window=false (a sliding-only layer would see nothing)")
        self.cfg, self.kind = cfg, kind
        h, d, r = cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
        self.wq_a = nn.Linear(dim, r, bias=False)
        self.q_norm = RMSNorm(r, cfg.norm_eps)
        self.wq_b = nn.Linear(r, h * d, bias=False)
        self.wkv = nn.Linear(dim, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.norm_eps)
        # grouped output: o_groups blocks [o_lora_rank, H d / g] then one projection to dim
        self.wo_a = nn.Parameter(torch.empty(cfg.o_groups, cfg.o_lora_rank, h * d // cfg.o_groups))
        nn.init.normal_(self.wo_a, std=(h * d // cfg.o_groups) ** -0.5)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h)) if cfg.sink else None
        if kind == "sliding":
            freq = rope_inv_freq(cfg.rope_dim, cfg.rope_theta)
        else:
            freq = rope_inv_freq(cfg.rope_dim, cfg.compress_rope_theta, cfg.yarn_factor,
                                 cfg.yarn_original_len)
        self.register_buffer("inv_freq", freq, persistent=False)
        self.compressor = self.indexer = None
        self.turns = torch.empty(0, 2, cfg.rope_dim // 2, dtype=torch.complex64)  # decoding's R(+-t) table
        if kind == "hca":
            self.compressor = BlockCompressor(dim, d, cfg.hca_ratio, False, freq, cfg.norm_eps)
        elif kind == "csa":
            self.compressor = BlockCompressor(dim, d, cfg.csa_ratio, cfg.overlap, freq, cfg.norm_eps)
            self.indexer = LightningIndexerV4(dim, r, cfg.index_n_heads, cfg.index_head_dim, cfg.csa_ratio,
                                              cfg.overlap, freq, cfg.norm_eps)

    def new_cache(self, batch: int | None = None, max_len: int | None = None,
                  device: torch.device | str | None = None) -> V4LayerCache:
        """An empty decode cache in this layer's storage format (it grows as tokens come:
        batch, max_len and device are taken from the inputs)."""
        return V4LayerCache.empty(self.cfg.kv_dtype, self.cfg.rope_dim, self.cfg.kv_block, self.ratio)

    def init_weights(self, std: float) -> None:
        """The model's init for the parameters that are not nn.Linear weights: the grouped
        output blocks like a linear layer; sinks and position biases start at zero."""
        nn.init.normal_(self.wo_a, std=std)

    @property
    def ratio(self) -> int:
        return self.compressor.ratio if self.compressor is not None else 0

    def _compressed(self, x, q, q_latent, cache, positions, cos, sin,
                    ctx: ForwardContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed entries [B, N, d] and their bias [B or 1, T, N] for this chunk's queries.

        Decoding one token without autograd reads only the CSA top-k entries from the cache
        (the dense mask over all N entries gives the same result at O(N) cost)."""
        new = self.compressor(x, cache.comp)
        if self.indexer is None:  # HCA: every complete block
            entries = cache.entries.extend(new)
            return entries, keep_bias(usable_entries(positions, entries.shape[1], self.ratio))[None]
        training = torch.is_grad_enabled()
        # the indexer learns (KL) in training/validation forwards of whole sequences
        learn = (ctx is not None and ctx.records and not cache.entries.keep
                 and self.cfg.index_kl_weight > 0)
        # without the KL the top-k choice needs no graph: no autograd for the indexer
        with torch.set_grad_enabled(training and learn):
            xi = x.detach()
            index_keys = cache.index_keys.extend(self.indexer.keys(xi, cache.index))
            usable = usable_entries(positions, index_keys.shape[1], self.ratio)
            scores = self.indexer.scores(xi, q_latent.detach(), index_keys, cos, sin)
        bias = topk_entry_bias(scores.detach(), usable, self.cfg.csa_topk)
        if x.shape[1] > 1 or training or index_keys.shape[1] == 0:
            entries = cache.entries.extend(new)
            if learn:
                dense = ctx.step < self.cfg.index_warmup_steps
                self._index_kl(q, entries, scores, usable, torch.isfinite(bias), dense, ctx)
                if dense:  # warm-up: CSA attends to every complete entry
                    bias = keep_bias(usable)[None]
            return entries, bias
        if new.shape[1]:
            cache.entries.append(new)
        keep = torch.isfinite(bias[:, 0])  # [B, N]: same count in every row (it depends on t only)
        idx = keep.nonzero()[:, 1].view(x.shape[0], -1)
        return cache.entries.gather(idx).to(x.dtype), bias.new_zeros(x.shape[0], 1, idx.shape[1])

    def _index_kl(self, q: torch.Tensor, entries: torch.Tensor, scores: torch.Tensor,
                  usable: torch.Tensor, selected: torch.Tensor, dense: bool,
                  ctx: ForwardContext) -> None:
        """The indexer's KL loss and statistics (module docstring) for a whole sequence.

        q: [B, T, H, d] (RoPE'd queries); entries: [B, N, d]; scores: [B, T, N] indexer
        scores (with gradient); usable: [T, N]; selected: [B, T, N] the indexer's top-k."""
        r0 = self.ratio - 1  # queries before the first complete block have no entry
        if q.shape[1] <= r0 or entries.shape[1] == 0:
            return
        q, scores, usable, selected = q[:, r0:], scores[:, r0:], usable[r0:], selected[:, r0:]
        with torch.no_grad():
            logits = torch.einsum("bthd,bsd->bhts", q.float(), entries.float()) * q.shape[-1] ** -0.5
            p_dense = None  # past the warm-up, only the recall reads it
            if dense or ctx.diagnose:
                p_dense = head_summed_distribution(
                    logits.masked_fill(~usable, float("-inf")).softmax(-1))
            if dense:
                target, mask = p_dense, usable
            else:
                target = head_summed_distribution(
                    logits.masked_fill(~selected[:, None], float("-inf")).softmax(-1))
                mask = selected
        kl = indexer_kl(target, scores, mask)
        if torch.is_grad_enabled():
            ctx.add_loss("v4/indexer_kl", kl * self.cfg.index_kl_weight)
        ctx.add_stat("v4/indexer_kl", kl)
        if ctx.diagnose:
            ctx.add_stat("v4/recall", recall(p_dense, selected, usable, self.cfg.csa_topk))

    # decoding one token: the lean path of v4_decode_step (methods, so tests can spy on them)
    def _lean_decode_applies(self, x: torch.Tensor) -> bool:
        return v4_decode_step.applies(self, x)

    def _decode_one(self, x: torch.Tensor, cache: V4LayerCache) -> torch.Tensor:
        return v4_decode_step.decode_one(self, x, cache)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None,
                cache: V4LayerCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        if cache is None:  # a whole sequence from position 0: state is built and dropped
            cache = V4LayerCache.empty(cfg.kv_dtype, cfg.rope_dim, cfg.kv_block, self.ratio, keep=False)
        if ctx is not None and int(ctx.positions[0]) != cache.pos:
            raise ValueError(f"V4 attention: chunk starts at position {int(ctx.positions[0])} but the "
                             f"cache holds {cache.pos} tokens (without a cache a chunk starts at 0)")
        if t == 1 and cache.entries.keep and self._lean_decode_applies(x):
            return self._decode_one(x, cache)
        positions = torch.arange(cache.pos, cache.pos + t, device=x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(b, t, cfg.n_heads, cfg.head_dim)
        q = rope_tail(unweighted_rms(q, cfg.norm_eps), cos, sin)
        kv = rope_tail(self.kv_norm(self.wkv(x)), cos, sin)

        keys, biases = [], []
        if cfg.use_window:
            k, bias = window_keys(kv, cache.window, cfg.window, positions)
            keys.append(k)
            biases.append(bias.expand(b, -1, -1))
        if self.compressor is not None:
            k, bias = self._compressed(x, q, q_latent, cache, positions, cos, sin, ctx)
            keys.append(k)
            biases.append(bias.expand(b, -1, -1))
        cache.pos += t

        o = attend_with_sink(q, torch.cat(keys, 1), torch.cat(biases, -1), self.sinks)
        o = rope_tail(o, cos, -sin)  # R(-t): each key's rope part now enters through R(s - t)
        o = torch.einsum("btgi,gri->btgr", o.reshape(b, t, cfg.o_groups, -1), self.wo_a)
        return self.wo_b(o.flatten(2))
