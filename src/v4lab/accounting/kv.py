"""KV-cache bytes of a ModelConfig: per token of context, held after L tokens, and read
per decode step (MHA, MLA in every storage format, the sparse indexer's keys, V4's
windows and compressed entries)."""

from __future__ import annotations

from typing import Any

from v4lab.accounting.keys import v4_key_counts, v4_layer_kinds, v4_ratio

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
SCALE_BYTES = {"fp32": 4, "ue8m0": 1}


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
