"""FLOPs per token of a ModelConfig: forward by part, training, prefill and decode.

Counting rules: every matrix product costs 2 FLOPs per multiply-add; norms, softmax,
activations and the embedding lookup are not counted (as torch's FlopCounterMode does).
Training costs 3x the forward for matrix products (forward, input gradient, weight
gradient) and 3.5x for the attention core (a FlashAttention-style backward recomputes the
scores). Which keys a query attends to: :mod:`~v4lab.accounting.keys`.
"""

from __future__ import annotations

from typing import Any

from v4lab.accounting.keys import (
    mean_causal_keys,
    sparse_topk,
    v4_causal_key_counts,
    v4_key_counts,
    v4_layer_kinds,
    v4_mtp_kind,
)
from v4lab.accounting.params import attention_params, mla_v_dim


def _attention_core_flops(a: Any, keys: float, absorbed: bool) -> float:
    """Scores and weighted values of one layer, per query attending to ``keys`` entries."""
    h = a.n_heads
    if a.kind == "mha":
        return 4.0 * h * a.head_dim * keys
    if absorbed:  # over the latent entries: [c_kv ; k_rope] scores, latent (+ rope) out
        return (2.0 * h * (a.kv_lora_rank + a.qk_rope_head_dim) * keys
                + 2.0 * h * (a.kv_lora_rank + (a.qk_rope_head_dim if a.vvpa else 0)) * keys)
    return (2.0 * h * (a.qk_nope_head_dim + a.qk_rope_head_dim) * keys
            + 2.0 * h * mla_v_dim(a) * keys)


def _compressor_flops(dim: int, out_dim: int, overlap: bool) -> float:
    """Per token: the wkv and wgate projections and the token's share of the weighted
    pooling (one multiply-add per projected channel)."""
    width = 2 * out_dim if overlap else out_dim
    return 2.0 * 2 * dim * width + 2.0 * width


def _v4_attention_flops(dim: int, v: Any, kind: str, c: dict[str, float]) -> dict[str, float]:
    """Forward FLOPs per token of one V4 layer whose query uses the entries ``c``
    (:func:`v4_key_counts`). attn_core: scores and weighted sum over the shared K=V
    entries (window + compressed); compressor: the entries' compressor; indexer (CSA):
    its projections, its compressor and the scoring of c['scored'] keys."""
    h, d, r = v.n_heads, v.head_dim, v.q_lora_rank
    proj = dim * r + r * h * d + dim * d + v.o_lora_rank * h * d + v.o_groups * v.o_lora_rank * dim
    out = {"attn_proj": 2.0 * proj, "attn_core": 4.0 * h * d * (c["window"] + c["compressed"])}
    if kind == "hca":
        out["compressor"] = _compressor_flops(dim, d, False)
    elif kind == "csa":
        out["compressor"] = _compressor_flops(dim, d, v.overlap)
        ih, ihd = v.index_n_heads, v.index_head_dim
        out["indexer"] = (2.0 * (r * ih * ihd + dim * ih) + _compressor_flops(dim, ihd, v.overlap)
                          + 2.0 * (ih * ihd + ih) * c["scored"])
    return out


def _hc_site_flops(dim: int, n: int) -> float:
    """One hyper-connection site per token: the coefficient map, the pre-weighted read,
    the stream mixing H^T X and the post-weighted write (Sinkhorn on n x n not counted)."""
    return 2.0 * (2 + n) * n * n * dim + 2.0 * n * dim + 2.0 * n * n * dim + 2.0 * n * dim


def _block_flops(cfg: Any, i: int, keys: float, index_keys: float, absorbed: bool,
                 v4_counts: dict[str, dict[str, float]] | None, hc: bool, engram: bool) -> dict[str, float]:
    """Forward FLOPs per token of block ``i`` (index n_layers: the MTP block), by part."""
    a, d, m, e = cfg.attention, cfg.dim, cfg.moe, cfg.engram
    out: dict[str, float] = {}
    if a.kind == "v4":
        kind = v4_layer_kinds(cfg)[i] if i < cfg.n_layers else v4_mtp_kind(cfg)
        c = (v4_counts or {}).get(kind) or v4_key_counts(a.v4, kind, keys)
        out |= _v4_attention_flops(d, a.v4, kind, c)
    else:
        att = attention_params(cfg)
        out["attn_proj"] = 2.0 * att["proj"]
        out["attn_core"] = _attention_core_flops(a, keys, absorbed)
        if "indexer" in att:
            s = a.sparse
            out["indexer"] = 2.0 * att["indexer"] + 2.0 * s.index_n_heads * s.index_head_dim * index_keys
    if m.enabled and i >= m.first_dense_layers:
        out["moe"] = 2.0 * (3 * d * m.expert_dim * (m.top_k + m.n_shared_experts) + d * m.n_routed_experts)
    else:
        out["ffn"] = 2.0 * 3 * d * cfg.ffn_dim
    if engram and e.enabled and i in e.layers:
        width = (cfg.hc.n_streams if hc else 1) * d
        e_dim = len(e.ngram_orders) * e.heads_per_order * e.head_dim
        out["engram"] = 2.0 * (e_dim * width + e_dim * d + width * e.kernel_size)
    if hc:
        out["hc"] = 2 * _hc_site_flops(d, cfg.hc.n_streams)
    return out


def forward_flops_per_token(cfg: Any, keys: float, index_keys: float, absorbed: bool = False,
                            v4_counts: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Forward matmul FLOPs per token, by part, when each query attends to ``keys`` cache
    entries and the indexer scores ``index_keys`` entries.

    Parts: attn_proj, attn_core, indexer (sparse MLA or V4's CSA indexer), compressor
    (V4's CSA / HCA compressors), ffn, moe, engram, hc (mHC sites and head), mtp (the
    whole MTP module: projection, block and its pass through the shared LM head; it runs
    in training, not in plain decoding), lm_head.
    ``absorbed``: MLA decode path (attention over the 576-wide latent entries).
    V4 attention: ``v4_counts`` {kind: :func:`v4_key_counts`-style entries used per query};
    when None, each query sees ``keys`` tokens (a decode step at context ``keys``).
    """
    d, L = cfg.dim, cfg.n_layers
    out: dict[str, float] = {"attn_proj": 0.0, "attn_core": 0.0}
    for i in range(L):
        for k, val in _block_flops(cfg, i, keys, index_keys, absorbed, v4_counts,
                                   cfg.hc.enabled, True).items():
            out[k] = out.get(k, 0.0) + val
    if cfg.moe.enabled and "ffn" not in out:
        out["ffn"] = 0.0
    if cfg.hc.enabled:
        n = cfg.hc.n_streams
        out["hc"] += 2.0 * n * n * d + 2.0 * n * d  # the head's coefficients and collapse
    if cfg.mtp.enabled:
        blk = _block_flops(cfg, L, keys, index_keys, absorbed, v4_counts, False, False)
        out["mtp"] = sum(blk.values()) + 2.0 * 2 * d * d + 2.0 * d * cfg.vocab_size
    out["lm_head"] = 2.0 * d * cfg.vocab_size
    return out


def _v4_counts(cfg: Any, tokens: int, causal: bool) -> dict[str, dict[str, float]] | None:
    """Per-kind entries used per query (kind v4): the causal means over a sequence of
    ``tokens``, or every query seeing ``tokens`` tokens."""
    a = cfg.attention
    if a.kind != "v4":
        return None
    count = v4_causal_key_counts if causal else v4_key_counts
    return {k: count(a.v4, k, tokens) for k in ("sliding", "csa", "hca")}


def train_flops_per_token(cfg: Any, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

    Matmuls cost 3x forward (forward, input gradient, weight gradient); the attention core
    3.5x (FlashAttention-style backward recomputes the scores). ``causal=False`` prices
    every query against all ``seq_len`` keys (how torch counts an ``is_causal`` SDPA).
    V4 attention counts the entries each query uses (window, complete blocks, top-k), not
    the masked dense products the lab's CPU implementation computes; the MTP module is
    included (it is trained on every position).
    """
    topk = sparse_topk(cfg)
    if causal:
        keys, index_keys = mean_causal_keys(seq_len, topk), mean_causal_keys(seq_len)
    else:
        keys = float(min(topk, seq_len) if topk else seq_len)
        index_keys = float(seq_len)
    f = forward_flops_per_token(cfg, keys, index_keys, v4_counts=_v4_counts(cfg, seq_len, causal))
    core = f.pop("attn_core")
    return 3.0 * sum(f.values()) + 3.5 * core


def decode_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs of one decoded token at ``context`` cached tokens (MLA absorbed; the
    MTP module not run)."""
    topk = sparse_topk(cfg)
    keys = float(min(topk, context) if topk else context)
    f = forward_flops_per_token(cfg, keys, float(context), absorbed=True,
                                v4_counts=_v4_counts(cfg, context, False))
    f.pop("mtp", None)
    return sum(f.values())


def prefill_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs per token when prefilling a ``context``-token prompt (no MTP)."""
    f = forward_flops_per_token(cfg, mean_causal_keys(context, sparse_topk(cfg)),
                                mean_causal_keys(context), v4_counts=_v4_counts(cfg, context, True))
    f.pop("mtp", None)
    return sum(f.values())
