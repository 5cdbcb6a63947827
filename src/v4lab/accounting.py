"""The model's arithmetic: parameters, KV-cache bytes and FLOPs of a ModelConfig.

The one FLOP model of the project: the chips' roofline projection, the run's
``cost/train_flops_per_token`` and the benchmarks' MFU figures all count with these
functions. Nothing here builds a model; :func:`cross_check_model` compares the counts with
a built one (tests point it at every experiment).

Counting rules: every matrix product costs 2 FLOPs per multiply-add; norms, softmax,
activations and the embedding lookup are not counted (as torch's FlopCounterMode does).
Training costs 3x the forward for matrix products (forward, input gradient, weight
gradient) and 3.5x for the attention core (a FlashAttention-style backward recomputes the
scores).
"""

from __future__ import annotations

from typing import Any

import torch

from v4lab.modules.engram import table_primes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
SCALE_BYTES = {"fp32": 4, "ue8m0": 1}


# ---- parameters -------------------------------------------------------------------------
def engram_table_rows(e: Any) -> int:
    """Rows of one layer's packed Engram table: the smallest distinct primes >= table_size,
    one per (order, head) (the sizes the Engram module builds)."""
    return sum(table_primes(e))


def _mla_v_dim(a: Any) -> int:
    """Per-head width entering the output projection (VVPA adds the rotary part)."""
    return a.v_head_dim + (a.qk_rope_head_dim if a.vvpa else 0)


def attention_params(cfg: Any) -> dict[str, int]:
    """Parameters of one attention module (without the pre-norm), by part."""
    a, d = cfg.attention, cfg.dim
    if a.kind == "mha":
        inner = a.n_heads * a.head_dim
        return {"proj": 4 * d * inner}
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    h = a.n_heads
    if a.q_lora_rank > 0:
        q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * qk  # wq_a, q_norm, wq_b
    else:
        q = d * h * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank  # wkv_a, kv_norm
    kv += a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)  # wkv_b
    out = h * _mla_v_dim(a) * d
    parts = {"proj": q + kv + out}
    if a.sparse.enabled:
        s = a.sparse
        q_in = a.q_lora_rank if a.q_lora_rank > 0 else d
        # query heads from the query latent, one shared key head (+ LayerNorm), head weights
        parts["indexer"] = (q_in * s.index_n_heads * s.index_head_dim
                            + d * s.index_head_dim + 2 * s.index_head_dim
                            + d * s.index_n_heads)
    return parts


def param_counts(cfg: Any) -> dict[str, int]:
    """Analytic parameter counts of the model ``cfg`` describes (no model is built).

    Keys: total, active (per token: top_k of the routed experts, the looked-up Engram
    rows, one embedding row), engram_table (all layers), device (total minus an Engram
    table kept in host memory), routed_experts (all routed expert weights).
    """
    d, n_layers = cfg.dim, cfg.n_layers
    emb = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = emb + head + d  # + final norm
    # one embedding row (none extra when tied: the head is the same matrix), head, final norm
    active = (0 if cfg.tie_embeddings else d) + cfg.vocab_size * d + d
    routed_total = engram_table = 0
    m, e = cfg.moe, cfg.engram
    for i in range(n_layers):
        att = sum(attention_params(cfg).values()) + 2 * d  # + attn_norm, ffn_norm
        total += att
        active += att
        if m.enabled and i >= m.first_dense_layers:
            expert = 3 * d * m.expert_dim
            shared = 3 * d * m.expert_dim * m.n_shared_experts
            gate = d * m.n_routed_experts
            total += m.n_routed_experts * expert + shared + gate
            active += m.top_k * expert + shared + gate
            routed_total += m.n_routed_experts * expert
        else:
            total += 3 * d * cfg.ffn_dim
            active += 3 * d * cfg.ffn_dim
        if e.enabled and i in e.layers:
            n_tables = len(e.ngram_orders) * e.heads_per_order
            e_dim = n_tables * e.head_dim
            dense = 2 * e_dim * d + 3 * d + d * e.kernel_size  # w_k, w_v, 3 norms, conv
            table = engram_table_rows(e) * e.head_dim
            total += dense + table
            active += dense + n_tables * e.head_dim
            engram_table += table
    device = total - (engram_table if e.enabled and e.host_memory else 0)
    return {"total": total, "active": active, "engram_table": engram_table,
            "device": device, "routed_experts": routed_total}


# ---- KV-cache bytes -----------------------------------------------------------------------
def mla_kv_bytes(kv_lora_rank: int, rope_dim: int, dtype: str, scale_format: str = "fp32",
                 block_size: int = 128) -> int:
    """Bytes per token and layer of an MLA cache ``[c_kv ; k_rope]`` (DESIGN.md §2).

    fp32/bf16: both parts in that dtype. fp8/int8: the latent in 1-byte values plus one
    scale (fp32: 4 bytes, ue8m0: 1 byte) per ``block_size`` values; k_rope stays bf16.
    """
    if dtype in ("fp32", "bf16"):
        return (kv_lora_rank + rope_dim) * DTYPE_BYTES[dtype]
    n_scales = kv_lora_rank // block_size
    return kv_lora_rank * 1 + n_scales * SCALE_BYTES[scale_format] + rope_dim * 2


def kv_bytes_per_token_layer(cfg: Any) -> int:
    """Main KV-cache bytes per token and layer for ``cfg`` (what decode reads per entry)."""
    a = cfg.attention
    if a.kind == "mha":
        return 2 * a.n_heads * a.head_dim * DTYPE_BYTES[a.kv_cache.dtype]
    return mla_kv_bytes(a.kv_lora_rank, a.qk_rope_head_dim, a.kv_cache.dtype,
                        a.kv_cache.scale_format, a.kv_cache.block_size)


def indexer_bytes_per_token_layer(cfg: Any) -> int:
    """Lightning-indexer key-cache bytes per token and layer (0 without sparse attention).
    Stored like the rotary key (modules/mla.py): fp32 in an fp32 cache, else bf16.
    (DeepSeek-V3.2 keeps its indexer keys in FP8; v4lab does not quantise them yet.)"""
    a = cfg.attention
    if a.kind != "mla" or not a.sparse.enabled:
        return 0
    return a.sparse.index_head_dim * (4 if a.kv_cache.dtype == "fp32" else 2)


def kv_bytes_per_token(cfg: Any, include_indexer: bool = True) -> int:
    """KV-cache bytes per token summed over layers (main cache + indexer keys)."""
    idx = indexer_bytes_per_token_layer(cfg) if include_indexer else 0
    return cfg.n_layers * (kv_bytes_per_token_layer(cfg) + idx)


# ---- FLOPs ------------------------------------------------------------------------------
def mean_causal_keys(seq_len: int, topk: int | None = None) -> float:
    """Mean number of keys a query attends to in a causal sequence of ``seq_len``
    (query t sees t + 1 keys, or min(topk, t + 1) with top-k sparse attention)."""
    if topk is None or topk >= seq_len:
        return (seq_len + 1) / 2
    # t + 1 <= topk for t < topk, then topk
    return (topk * (topk + 1) / 2 + (seq_len - topk) * topk) / seq_len


def _sparse_topk(cfg: Any) -> int | None:
    """Keys a query keeps under sparse attention (None: dense)."""
    a = cfg.attention
    return a.sparse.topk if (a.kind == "mla" and a.sparse.enabled) else None


def _attention_core_flops(a: Any, keys: float, absorbed: bool) -> float:
    """Scores and weighted values of one layer, per query attending to ``keys`` entries."""
    h = a.n_heads
    if a.kind == "mha":
        return 4.0 * h * a.head_dim * keys
    if absorbed:  # over the latent entries: [c_kv ; k_rope] scores, latent (+ rope) out
        return (2.0 * h * (a.kv_lora_rank + a.qk_rope_head_dim) * keys
                + 2.0 * h * (a.kv_lora_rank + (a.qk_rope_head_dim if a.vvpa else 0)) * keys)
    return (2.0 * h * (a.qk_nope_head_dim + a.qk_rope_head_dim) * keys
            + 2.0 * h * _mla_v_dim(a) * keys)


def forward_flops_per_token(cfg: Any, keys: float, index_keys: float,
                            absorbed: bool = False) -> dict[str, float]:
    """Forward matmul FLOPs per token, by part, when each query attends to ``keys``
    cache entries and the indexer scores ``index_keys`` entries.

    Parts: attn_proj, attn_core, indexer (sparse MLA), ffn, moe, engram, lm_head.
    ``absorbed``: MLA decode path (attention over the 576-wide latent entries).
    """
    a, d, L = cfg.attention, cfg.dim, cfg.n_layers
    att = attention_params(cfg)
    out: dict[str, float] = {"attn_proj": 2.0 * att["proj"] * L,
                             "attn_core": _attention_core_flops(a, keys, absorbed) * L}
    if "indexer" in att:
        s = a.sparse
        out["indexer"] = (2.0 * att["indexer"] + 2.0 * s.index_n_heads * s.index_head_dim
                          * index_keys) * L
    m, e = cfg.moe, cfg.engram
    n_moe = max(0, L - m.first_dense_layers) if m.enabled else 0
    out["ffn"] = 2.0 * 3 * d * cfg.ffn_dim * (L - n_moe)
    if n_moe:
        out["moe"] = 2.0 * n_moe * (3 * d * m.expert_dim * (m.top_k + m.n_shared_experts)
                                    + d * m.n_routed_experts)
    if e.enabled:
        e_dim = len(e.ngram_orders) * e.heads_per_order * e.head_dim
        out["engram"] = 2.0 * len(e.layers) * (2 * e_dim * d + d * e.kernel_size)
    out["lm_head"] = 2.0 * d * cfg.vocab_size
    return out


def train_flops_per_token(cfg: Any, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

    Matmuls cost 3x forward (forward, input gradient, weight gradient); the attention core
    3.5x (FlashAttention-style backward recomputes the scores). ``causal=False`` prices
    every query against all ``seq_len`` keys (how torch counts an ``is_causal`` SDPA).
    """
    topk = _sparse_topk(cfg)
    if causal:
        keys, index_keys = mean_causal_keys(seq_len, topk), mean_causal_keys(seq_len)
    else:
        keys = float(min(topk, seq_len) if topk else seq_len)
        index_keys = float(seq_len)
    f = forward_flops_per_token(cfg, keys, index_keys)
    core = f.pop("attn_core")
    return 3.0 * sum(f.values()) + 3.5 * core


def decode_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs of one decoded token at ``context`` cached tokens (MLA absorbed)."""
    topk = _sparse_topk(cfg)
    keys = float(min(topk, context) if topk else context)
    return sum(forward_flops_per_token(cfg, keys, float(context), absorbed=True).values())


def prefill_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs per token when prefilling a ``context``-token prompt."""
    return sum(forward_flops_per_token(cfg, mean_causal_keys(context, _sparse_topk(cfg)),
                                       mean_causal_keys(context)).values())


# ---- against a built model ----------------------------------------------------------------
def cross_check_model(model: Any, include_indexer: bool = True) -> dict[str, tuple[int, int]]:
    """Analytic vs measured counts of a built Transformer: {name: (analytic, measured)}
    for total params, active params and KV bytes per token (from real caches, which
    after a short decode hold real fp8/int8 tensors). ``include_indexer``: whether the
    MLA cache's bytes_per_token counts the sparse indexer's key cache."""
    cfg = model.cfg
    p = param_counts(cfg)
    caches = model.new_caches(1, 8)
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, 2, dtype=torch.long), caches, 0)
    measured_kv = model.kv_bytes_per_token(caches)
    return {"params_total": (p["total"], model.num_params()),
            "params_active": (p["active"], model.num_active_params()),
            "kv_bytes_per_token": (kv_bytes_per_token(cfg, include_indexer), measured_kv)}
