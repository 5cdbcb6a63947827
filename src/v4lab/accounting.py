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

What is counted (every parameter of the built model, so :func:`cross_check_model` can
compare exactly): MHA and MLA (+ the sparse-MLA indexer); DeepSeek-V4 attention per layer
kind (sliding / CSA / HCA: query path, shared K=V head, compressors, CSA indexer, sinks,
grouped output projection); DeepSeekMoE including hash-routed layers (their frozen
token -> experts table and the balancing bias are buffers, not parameters); Engram;
mHC (two hyper-connection sites per block and the head); the MTP block (its projection,
norms and one more block; embedding and LM head are shared and counted once).

Published sizes (671B / 37B for V3, 284B / 13B for V4-Flash) do not include the MTP
module: :func:`param_counts` reports it separately (``mtp``, ``mtp_active``) and the
``main_*`` keys without it.

Attention over key counts: a query attends to ``keys`` cache entries. For V4 attention
a query's keys are its sliding window plus compressed entries (HCA: every complete
block; CSA: the indexer's top-k of the complete blocks, the indexer scoring all of
them), counted per layer kind by :func:`v4_key_counts`.
"""

from __future__ import annotations

import math
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


def compressor_params(dim: int, out_dim: int, ratio: int, overlap: bool) -> int:
    """One V4 block compressor: wkv and wgate [dim -> width], position bias [ratio, width]
    and the entry RMSNorm [out_dim]; width = 2 out_dim with CSA's overlap, else out_dim."""
    width = 2 * out_dim if overlap else out_dim
    return 2 * dim * width + ratio * width + out_dim


def v4_layer_kinds(cfg: Any) -> list[str]:
    """'sliding' | 'csa' | 'hca' of every main layer (kind v4), as the model builds them."""
    return cfg.attention.layer_kinds("model.attention", cfg.n_layers)


def v4_mtp_kind(cfg: Any) -> str:
    """Kind of the MTP block's V4 attention layer (model.v4_layer_kind at index n_layers)."""
    return "sliding" if cfg.attention.v4.use_window else v4_layer_kinds(cfg)[-1]


def v4_attention_params(dim: int, v: Any, kind: str) -> dict[str, int]:
    """Parameters of one V4 attention layer of ``kind``, by part.

    proj: wq_a, q_norm, wq_b, wkv, kv_norm, wo_a (o_groups blocks [o_lora_rank, H d / g]),
    wo_b, sinks (the per-head query norm has no gain); compressor: HCA's (m', no overlap)
    or CSA's (m, overlap as configured); indexer (CSA): its own compressor (width
    index_head_dim), query projection from c_Q and per-head weight projection.
    """
    h, d, r = v.n_heads, v.head_dim, v.q_lora_rank
    proj = (dim * r + r + r * h * d + dim * d + d + v.o_lora_rank * h * d
            + v.o_groups * v.o_lora_rank * dim + (h if v.sink else 0))
    parts = {"proj": proj}
    if kind == "hca":
        parts["compressor"] = compressor_params(dim, d, v.hca_ratio, False)
    elif kind == "csa":
        parts["compressor"] = compressor_params(dim, d, v.csa_ratio, v.overlap)
        parts["indexer"] = (compressor_params(dim, v.index_head_dim, v.csa_ratio, v.overlap)
                            + r * v.index_n_heads * v.index_head_dim + dim * v.index_n_heads)
    return parts


def layer_attention_params(cfg: Any, layer_idx: int) -> dict[str, int]:
    """Parameters of block ``layer_idx``'s attention (index n_layers: the MTP block's)."""
    if cfg.attention.kind != "v4":
        return attention_params(cfg)
    kind = v4_layer_kinds(cfg)[layer_idx] if layer_idx < cfg.n_layers else v4_mtp_kind(cfg)
    return v4_attention_params(cfg.dim, cfg.attention.v4, kind)


def hc_site_params(dim: int, n: int) -> int:
    """One hyper-connection site: W [(2+n) n, n dim], b [(2+n) n], 3 scales."""
    return (2 + n) * n * n * dim + (2 + n) * n + 3


def hc_head_params(dim: int, n: int) -> int:
    """The hyper-connection head: W [n, n dim], b [n], 1 scale."""
    return n * n * dim + n + 1


def attention_params(cfg: Any) -> dict[str, int]:
    """Parameters of one MHA / MLA attention module (without the pre-norm), by part (kind
    v4: :func:`layer_attention_params`, which depends on the layer)."""
    a, d = cfg.attention, cfg.dim
    if a.kind == "v4":
        raise ValueError("attention.kind='v4' differs per layer: use layer_attention_params(cfg, i)")
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


def _block_params(cfg: Any, i: int, hc: bool, engram: bool) -> dict[str, int]:
    """total / active / routed / engram_table parameters of block ``i`` (the model's Block:
    [Engram], attention, two RMSNorms, FFN or MoE, [two hyper-connection sites])."""
    d, m, e = cfg.dim, cfg.moe, cfg.engram
    dense = sum(layer_attention_params(cfg, i).values()) + 2 * d  # + attn_norm, ffn_norm
    if hc:
        dense += 2 * hc_site_params(d, cfg.hc.n_streams)
    out = {"total": dense, "active": dense, "routed": 0, "engram_table": 0}
    if m.enabled and i >= m.first_dense_layers:
        # hash-routed layers have the same parameters: the token -> experts table and the
        # balancing bias are buffers
        expert = 3 * d * m.expert_dim
        shared_gate = 3 * d * m.expert_dim * m.n_shared_experts + d * m.n_routed_experts
        out["total"] += m.n_routed_experts * expert + shared_gate
        out["active"] += m.top_k * expert + shared_gate
        out["routed"] = m.n_routed_experts * expert
    else:
        out["total"] += 3 * d * cfg.ffn_dim
        out["active"] += 3 * d * cfg.ffn_dim
    if engram and e.enabled and i in e.layers:
        n_tables = len(e.ngram_orders) * e.heads_per_order
        e_dim = n_tables * e.head_dim
        width = (cfg.hc.n_streams if hc else 1) * d  # with mHC: a key, norms, conv per stream
        dense_e = e_dim * width + e_dim * d + 3 * width + width * e.kernel_size  # w_k, w_v, norms, conv
        table = engram_table_rows(e) * e.head_dim
        out["total"] += dense_e + table
        out["active"] += dense_e + n_tables * e.head_dim
        out["engram_table"] = table
    return out


def param_counts(cfg: Any) -> dict[str, int]:
    """Analytic parameter counts of the model ``cfg`` describes (no model is built).

    Keys: total, active (per token: top_k of the routed experts, the looked-up Engram
    rows, one embedding row), engram_table (all layers), device (total minus an Engram
    table kept in host memory), routed_experts (all routed expert weights, main and MTP
    blocks), mtp / mtp_active (the MTP module's own parameters: projection, its three
    norms and its block; 0 without MTP), main_total / main_active (without the MTP
    module: what published model sizes count). total and active include the MTP module
    (it is built, trained and, for speculative decoding, run on every token).
    """
    d, n_layers = cfg.dim, cfg.n_layers
    emb = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = emb + head + d  # + final norm
    # one embedding row (none extra when tied: the head is the same matrix), head, final norm
    active = (0 if cfg.tie_embeddings else d) + cfg.vocab_size * d + d
    routed_total = engram_table = 0
    if cfg.hc.enabled:
        total += hc_head_params(d, cfg.hc.n_streams)
        active += hc_head_params(d, cfg.hc.n_streams)
    for i in range(n_layers):
        b = _block_params(cfg, i, cfg.hc.enabled, True)
        total, active = total + b["total"], active + b["active"]
        routed_total += b["routed"]
        engram_table += b["engram_table"]
    mtp = mtp_active = 0
    if cfg.mtp.enabled:  # enorm, hnorm, proj [dim, 2 dim], norm, one block (one stream, no Engram)
        b = _block_params(cfg, n_layers, False, False)
        own = 3 * d + 2 * d * d
        mtp, mtp_active = own + b["total"], own + b["active"]
        routed_total += b["routed"]
    total, active = total + mtp, active + mtp_active
    device = total - (engram_table if cfg.engram.enabled and cfg.engram.host_memory else 0)
    return {"total": total, "active": active, "engram_table": engram_table,
            "device": device, "routed_experts": routed_total, "mtp": mtp,
            "mtp_active": mtp_active, "main_total": total - mtp, "main_active": active - mtp_active}


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


def v4_entry_bytes(v: Any) -> int:
    """Bytes of one stored V4 entry (window or compressed) of width head_dim in format
    ``v.kv_dtype`` (modules/v4_cache.py): fp32 / bf16 whole; fp8: the nope part in e4m3,
    one fp32 scale per kv_block values, the rope part in bf16."""
    d = v.head_dim
    if v.kv_dtype in ("fp32", "bf16"):
        return d * DTYPE_BYTES[v.kv_dtype]
    nope = d - v.rope_dim
    return nope + (nope // v.kv_block) * SCALE_BYTES["fp32"] + v.rope_dim * 2


def v4_index_key_bytes(v: Any) -> int:
    """Bytes of one CSA indexer key: fp32 in an fp32 cache, else bf16."""
    return v.index_head_dim * (4 if v.kv_dtype == "fp32" else 2)


def v4_ratio(v: Any, kind: str) -> int:
    """Block length of a V4 layer kind (0: sliding only)."""
    return {"sliding": 0, "csa": v.csa_ratio, "hca": v.hca_ratio}[kind]


def v4_layer_bytes_per_token(v: Any, kind: str, include_indexer: bool = True) -> float:
    """How fast one V4 layer's cache grows, bytes per token of context: one compressed
    entry (+ one indexer key for CSA) per ``ratio`` tokens; 0 for a sliding-only layer
    (its window is a constant, :func:`v4_window_bytes`)."""
    if kind == "sliding":
        return 0.0
    idx = v4_index_key_bytes(v) if kind == "csa" and include_indexer else 0
    return (v4_entry_bytes(v) + idx) / v4_ratio(v, kind)


def v4_window_bytes(cfg: Any) -> int:
    """Fixed bytes of the V4 sliding windows, all main layers, once they have filled: the
    last W - 1 entries each layer keeps between steps (the current token's entry is made
    by the step itself); 0 with use_window=false. Not per token: it does not grow."""
    v = cfg.attention.v4
    if cfg.attention.kind != "v4" or not v.use_window:
        return 0
    return cfg.n_layers * (v.window - 1) * v4_entry_bytes(v)


def kv_bytes_per_token_layer(cfg: Any) -> int:
    """Main KV-cache bytes per token and layer for ``cfg`` (what decode reads per entry);
    MHA and MLA (kind v4 differs per layer: :func:`v4_layer_bytes_per_token`)."""
    a = cfg.attention
    if a.kind == "v4":
        raise ValueError("attention.kind='v4' differs per layer: use v4_layer_bytes_per_token")
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


def kv_bytes_per_token(cfg: Any, include_indexer: bool = True) -> float:
    """KV-cache bytes per token of context, summed over the main layers (``cost/kv_bytes_per_token``).

    MHA / MLA: every token's cache entry (+ the sparse indexer's key).
    V4 attention: the *growth rate* of the cache: per compressed layer one entry (+ one
    indexer key for CSA) per ``ratio`` tokens, so fractions of a byte occur; sliding-only
    layers add 0. The sliding windows are a bounded ring, not per token: their fixed bytes
    are :func:`v4_window_bytes` (reported separately), and the compressors' buffers of
    at most one incomplete block are not counted. Bytes held by a sequence of L tokens:
    :func:`kv_bytes_held`. The MTP block's cache (speculative decoding) is not included.
    """
    a = cfg.attention
    if a.kind == "v4":
        return sum(v4_layer_bytes_per_token(a.v4, k, include_indexer) for k in v4_layer_kinds(cfg))
    idx = indexer_bytes_per_token_layer(cfg) if include_indexer else 0
    return cfg.n_layers * (kv_bytes_per_token_layer(cfg) + idx)


def kv_bytes_held(cfg: Any, context: int, include_indexer: bool = True) -> int:
    """KV bytes one sequence holds after ``context`` tokens, all main layers (exact counts).

    MHA / MLA: context x the per-token bytes. V4 attention, per layer: min(W - 1, context)
    window entries, floor(context / ratio) compressed entries (+ as many indexer keys
    for CSA); the compressors' incomplete-block buffers are not counted."""
    a = cfg.attention
    if a.kind != "v4":
        return int(context * kv_bytes_per_token(cfg, include_indexer))
    return sum(v4_layer_bytes_held(a.v4, kind, context, include_indexer) for kind in v4_layer_kinds(cfg))


def v4_layer_bytes_held(v: Any, kind: str, context: int, include_indexer: bool = True) -> int:
    """Bytes one V4 layer's cache holds after ``context`` tokens (V4LayerCache.nbytes):
    min(W - 1, context) window entries, floor(context / ratio) compressed entries and, for
    CSA, as many indexer keys."""
    held = min(v.window - 1, context) * v4_entry_bytes(v) if v.use_window else 0
    if kind != "sliding":
        idx = v4_index_key_bytes(v) if kind == "csa" and include_indexer else 0
        held += (context // v4_ratio(v, kind)) * (v4_entry_bytes(v) + idx)
    return held


def decode_kv_read_bytes(cfg: Any, context: int) -> float:
    """Cache bytes one decoded token reads at ``context`` cached tokens, all main layers:
    MHA / dense MLA every entry; sparse MLA its top-k entries + every indexer key; V4 the
    window, the compressed entries it attends (HCA all, CSA top-k) and every CSA indexer key."""
    a = cfg.attention
    if a.kind != "v4":
        keys = min(a.sparse.topk, context) if a.kind == "mla" and a.sparse.enabled else context
        return cfg.n_layers * (keys * kv_bytes_per_token_layer(cfg)
                               + context * indexer_bytes_per_token_layer(cfg))
    v, total = a.v4, 0.0
    for kind in v4_layer_kinds(cfg):
        c = v4_key_counts(v, kind, context)
        total += (c["window"] + c["compressed"]) * v4_entry_bytes(v) + c["scored"] * v4_index_key_bytes(v)
    return total


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


def _floor_sum(n: int, m: int) -> int:
    """sum_{i=1}^{n} floor(i / m) (complete blocks seen by queries at 1..n visible tokens)."""
    q, r = divmod(n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def v4_key_counts(v: Any, kind: str, context: float) -> dict[str, float]:
    """Entries one query of a V4 layer of ``kind`` uses when it sees ``context`` tokens
    (itself included): window keys min(W, context); compressed entries attended (HCA:
    every complete block, floor(context / m'); CSA: min(top-k, floor(context / m)));
    indexer keys scored (CSA: every complete block)."""
    window = float(min(v.window, context)) if v.use_window else 0.0
    if kind == "sliding":
        return {"window": window, "compressed": 0.0, "scored": 0.0}
    blocks = float(math.floor(context / v4_ratio(v, kind)))
    if kind == "hca":
        return {"window": window, "compressed": blocks, "scored": 0.0}
    return {"window": window, "compressed": min(float(v.csa_topk), blocks), "scored": blocks}


def v4_causal_key_counts(v: Any, kind: str, seq_len: int) -> dict[str, float]:
    """:func:`v4_key_counts` averaged over the queries t = 0 .. seq_len - 1 of a causal
    sequence (query t sees t + 1 tokens), in closed form."""
    window = mean_causal_keys(seq_len, v.window) if v.use_window else 0.0
    if kind == "sliding":
        return {"window": window, "compressed": 0.0, "scored": 0.0}
    m = v4_ratio(v, kind)
    blocks = _floor_sum(seq_len, m) / seq_len
    if kind == "hca":
        return {"window": window, "compressed": blocks, "scored": 0.0}
    k = v.csa_topk  # min(k, floor(n / m)) reaches k at n = k m
    last = min(seq_len, k * m - 1)
    attended = (_floor_sum(last, m) + k * max(0, seq_len - k * m + 1)) / seq_len
    return {"window": window, "compressed": attended, "scored": blocks}


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
    topk = _sparse_topk(cfg)
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
    topk = _sparse_topk(cfg)
    keys = float(min(topk, context) if topk else context)
    f = forward_flops_per_token(cfg, keys, float(context), absorbed=True,
                                v4_counts=_v4_counts(cfg, context, False))
    f.pop("mtp", None)
    return sum(f.values())


def prefill_flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs per token when prefilling a ``context``-token prompt (no MTP)."""
    f = forward_flops_per_token(cfg, mean_causal_keys(context, _sparse_topk(cfg)),
                                mean_causal_keys(context), v4_counts=_v4_counts(cfg, context, True))
    f.pop("mtp", None)
    return sum(f.values())


# ---- against a built model ----------------------------------------------------------------
def cross_check_model(model: Any, include_indexer: bool = True) -> dict[str, tuple[float, float]]:
    """Analytic vs measured counts of a built Transformer: {name: (analytic, measured)}
    for total and active params and KV bytes per token (from real caches, which after a
    short decode hold real fp8/int8 tensors). ``include_indexer``: whether the MLA
    cache's bytes_per_token counts the sparse indexer's key cache.

    V4 attention: the decode first runs enough tokens to complete one block of every
    compressed layer and fill every window, and ``kv_window_bytes`` (the windows' fixed
    bytes, :func:`v4_window_bytes`) is compared as well."""
    cfg = model.cfg
    p = param_counts(cfg)
    v4 = cfg.attention.kind == "v4"
    n = model.kv_probe_tokens()
    if v4 and cfg.attention.v4.use_window:
        n = max(n, cfg.attention.v4.window - 1)
    caches = model.new_caches(1, max(8, n))
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, n, dtype=torch.long), caches, 0)
    measured_kv = model.kv_bytes_per_token(caches)
    out = {"params_total": (p["total"], model.num_params()),
           "params_active": (p["active"], model.num_active_params()),
           "kv_bytes_per_token": (kv_bytes_per_token(cfg, include_indexer), measured_kv)}
    if v4:
        out["kv_window_bytes"] = (v4_window_bytes(cfg),
                                  sum(c["attn"].window_bytes() for c in caches))
    return out
