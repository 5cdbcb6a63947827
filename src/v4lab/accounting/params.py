"""Parameter counts of a ModelConfig, total and active per token, piece by piece.

What is counted (every parameter of the built model, so
:func:`~v4lab.accounting.check.cross_check_model` can compare exactly): MHA and MLA (+ the
sparse-MLA indexer); DeepSeek-V4 attention per layer kind (sliding / CSA / HCA: query
path, shared K=V head, compressors, CSA indexer, sinks, grouped output projection);
DeepSeekMoE including hash-routed layers (their frozen token -> experts table and the
balancing bias are buffers, not parameters); Engram; mHC (two hyper-connection sites per
block and the head); the MTP block (its projection, norms and one more block; embedding
and LM head are shared and counted once).

Published sizes (671B / 37B for V3, 284B / 13B for V4-Flash) do not include the MTP
module: :func:`param_counts` reports it separately (``mtp``, ``mtp_active``) and the
``main_*`` keys without it.
"""

from __future__ import annotations

from typing import Any

from v4lab.accounting.keys import v4_layer_kinds, v4_mtp_kind
from v4lab.modules.engram import table_primes


def engram_table_rows(e: Any) -> int:
    """Rows of one layer's packed Engram table: the smallest distinct primes >= table_size,
    one per (order, head) (the sizes the Engram module builds)."""
    return sum(table_primes(e))


def mla_v_dim(a: Any) -> int:
    """Per-head width entering the output projection (VVPA adds the rotary part)."""
    return a.v_head_dim + (a.qk_rope_head_dim if a.vvpa else 0)


def compressor_params(dim: int, out_dim: int, ratio: int, overlap: bool) -> int:
    """One V4 block compressor: wkv and wgate [dim -> width], position bias [ratio, width]
    and the entry RMSNorm [out_dim]; width = 2 out_dim with CSA's overlap, else out_dim."""
    width = 2 * out_dim if overlap else out_dim
    return 2 * dim * width + ratio * width + out_dim


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
    out = h * mla_v_dim(a) * d
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
