"""Shared pieces of the DeepSeek-V4 attention tests (test_v4_compressor.py, test_v4_attention.py):
tiny sizes, the transformers reference built at those sizes with weight copying, and naive
per-block / per-query computations written from the formulas, sharing no code with src
(RoPE as complex multiplication, explicit softmax sums).

Tolerances: fp32 sums of at most a few hundred terms of O(1) values; the observed
differences are ~1e-6, the bound ATOL = 2e-5 (relative to the output scale) leaves room
for BLAS reduction order but catches any wrong slot, position, scale or mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from v4lab.modules.compressor import (
    BlockCompressor,
    LightningIndexerV4,
    rope_inv_freq,
)
from v4lab.modules.v4_attention import V4Attention, V4AttentionConfig

ATOL = 2e-5
# tiny sizes shared by every test
DIM, HEADS, HEAD_DIM, ROPE, QRANK = 32, 4, 16, 8, 24
M_CSA, M_HCA, WINDOW = 4, 8, 6
IDX_HEADS, IDX_DIM, TOPK = 2, 12, 3
THETA, CTHETA, YARN, YARN_LEN = 10000.0, 160000.0, 4.0, 16


def compress_freq() -> torch.Tensor:
    return rope_inv_freq(ROPE, CTHETA, YARN, YARN_LEN)


# ---------------------------------------------------------------- reference (transformers)

def ref_modules():
    pytest.importorskip("transformers")
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref

    cfg = DeepseekV4Config(
        vocab_size=64, hidden_size=DIM, num_hidden_layers=3, num_attention_heads=HEADS,
        head_dim=HEAD_DIM, q_lora_rank=QRANK, partial_rotary_factor=ROPE / HEAD_DIM,
        compress_rates={"compressed_sparse_attention": M_CSA, "heavily_compressed_attention": M_HCA},
        sliding_window=WINDOW, o_groups=2, o_lora_rank=8, index_n_heads=IDX_HEADS,
        index_head_dim=IDX_DIM, index_topk=TOPK, rope_theta=THETA, compress_rope_theta=CTHETA,
        max_position_embeddings=int(YARN * YARN_LEN),
        rope_parameters={"rope_type": "yarn", "factor": YARN, "original_max_position_embeddings": YARN_LEN},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        attn_implementation="eager", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    return cfg, ref


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (the reference leaves position_bias and sinks uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if ("bias" in name or "sinks" in name or "norm" in name) else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))


def copy_compressor(mine: BlockCompressor, ref) -> None:
    with torch.no_grad():
        mine.wkv.weight.copy_(ref.kv_proj.weight)
        mine.wgate.weight.copy_(ref.gate_proj.weight)
        mine.position_bias.copy_(ref.position_bias)
        mine.norm.weight.copy_(ref.kv_norm.weight)


def copy_indexer(mine: LightningIndexerV4, ref) -> None:
    copy_compressor(mine.compressor, ref)
    with torch.no_grad():
        mine.wq.weight.copy_(ref.q_b_proj.weight)
        mine.weights_proj.weight.copy_(ref.scorer.weights_proj.weight)


# ---------------------------------------------------------------- naive formulas (no src code)

def naive_rope(v: torch.Tensor, pos: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2 * len(inv_freq) channels of a vector [d]: adjacent pairs as complex numbers."""
    r = 2 * len(inv_freq)
    z = torch.view_as_complex(v[-r:].reshape(-1, 2).contiguous())
    z = z * torch.polar(torch.ones_like(inv_freq), pos * inv_freq)
    return torch.cat([v[:-r], torch.view_as_real(z).flatten()])


def naive_rms(v: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    v = v / torch.sqrt((v * v).mean() + eps)
    return v if weight is None else v * weight


@torch.no_grad()
def naive_compress(x: torch.Tensor, wkv, wgate, bias, norm_w, m: int, overlap: bool,
                   inv_freq: torch.Tensor) -> torch.Tensor:
    """One entry per complete block, by explicit loops over blocks, slots and channels.

    x [T, dim] -> [T // m, D]."""
    kv, gate = x @ wkv.T, x @ wgate.T
    d = kv.shape[-1] // 2 if overlap else kv.shape[-1]
    out = []
    for w in range(x.shape[0] // m):
        slots = []  # (value [D], gate [D]) per slot
        for j in range(m):
            t = w * m + j
            if overlap:
                if w > 0:
                    s = (w - 1) * m + j
                    slots.append((kv[s, :d], gate[s, :d] + bias[j, :d]))
                slots.append((kv[t, d:], gate[t, d:] + bias[j, d:]))
            else:
                slots.append((kv[t], gate[t] + bias[j]))
        z = torch.stack([g for _, g in slots])
        e = torch.exp(z - z.max(0).values)
        pooled = sum(e[i] * v for i, (v, _) in enumerate(slots)) / e.sum(0)
        out.append(naive_rope(naive_rms(pooled, norm_w), float(w * m), inv_freq))
    return torch.stack(out)


@torch.no_grad()
def naive_index_scores(x, q_latent, keys, wq, ww, inv_freq) -> torch.Tensor:
    """I(t, s) = sum_h w(t, h) ReLU(q(t, h) . K_s) / sqrt(d_I): x [T, dim] -> [T, N]."""
    t_len, n = x.shape[0], keys.shape[0]
    out = torch.zeros(t_len, n)
    for t in range(t_len):
        q = (q_latent[t] @ wq.T).view(IDX_HEADS, IDX_DIM)
        w = (x[t] @ ww.T) / math.sqrt(IDX_HEADS)
        for s in range(n):
            for h in range(IDX_HEADS):
                qh = naive_rope(q[h], float(t), inv_freq)
                out[t, s] += w[h] * max(float(qh @ keys[s]), 0.0) / math.sqrt(IDX_DIM)
    return out



# ---------------------------------------------------------------- one attention layer

def v4_config(**overrides) -> V4AttentionConfig:
    cfg = V4AttentionConfig(n_heads=HEADS, head_dim=HEAD_DIM, rope_dim=ROPE, q_lora_rank=QRANK, window=WINDOW,
                            csa_ratio=M_CSA, hca_ratio=M_HCA, index_n_heads=IDX_HEADS,
                            index_head_dim=IDX_DIM, csa_topk=TOPK, o_groups=2, o_lora_rank=8,
                            rope_theta=THETA, compress_rope_theta=CTHETA, yarn_factor=YARN,
                            yarn_original_len=YARN_LEN)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate("x")
    return cfg


def make_layer(kind: str, seed: int, **overrides) -> V4Attention:
    torch.manual_seed(seed)
    layer = V4Attention(DIM, v4_config(**overrides), kind)
    randomize(layer, seed)
    return layer


def copy_attention(mine: V4Attention, ref) -> None:
    with torch.no_grad():
        mine.wq_a.weight.copy_(ref.q_a_proj.weight)
        mine.q_norm.weight.copy_(ref.q_a_norm.weight)
        mine.wq_b.weight.copy_(ref.q_b_proj.weight)
        mine.wkv.weight.copy_(ref.kv_proj.weight)
        mine.kv_norm.weight.copy_(ref.kv_norm.weight)
        mine.wo_a.copy_(ref.o_a_proj.weight.view_as(mine.wo_a))
        mine.wo_b.weight.copy_(ref.o_b_proj.weight)
        mine.sinks.copy_(ref.sinks)
    if mine.compressor is not None:
        copy_compressor(mine.compressor, ref.compressor)
    if mine.indexer is not None:
        copy_indexer(mine.indexer, ref.compressor.indexer)


@torch.no_grad()
def naive_attention(layer: V4Attention, x: torch.Tensor) -> torch.Tensor:
    """Per query, per head: gather the visible keys, explicit softmax with the sink. x [T, dim]."""
    cfg, freq, n_tok = layer.cfg, layer.inv_freq, x.shape[0]
    c_q = torch.stack([naive_rms(x[t] @ layer.wq_a.weight.T, layer.q_norm.weight) for t in range(n_tok)])
    kv = [naive_rope(naive_rms(x[s] @ layer.wkv.weight.T, layer.kv_norm.weight), float(s), freq)
          for s in range(n_tok)]
    entries, m = [], layer.ratio
    if layer.compressor is not None:
        c = layer.compressor
        entries = naive_compress(x, c.wkv.weight, c.wgate.weight, c.position_bias, c.norm.weight, m,
                                 c.overlap, freq)
    if layer.indexer is not None:
        ic = layer.indexer.compressor
        ikeys = naive_compress(x, ic.wkv.weight, ic.wgate.weight, ic.position_bias, ic.norm.weight, m,
                               ic.overlap, freq)
        iscores = naive_index_scores(x, c_q, ikeys, layer.indexer.wq.weight,
                                     layer.indexer.weights_proj.weight, freq)
    out = []
    for t in range(n_tok):
        keys = [kv[s] for s in range(max(0, t - cfg.window + 1), t + 1)] if cfg.use_window else []
        usable = [w for w in range(len(entries)) if (w + 1) * m <= t + 1]
        if layer.indexer is not None:  # top-k by score, ties to the lower index
            usable = sorted(usable, key=lambda w: (-float(iscores[t, w]), w))[: cfg.csa_topk]
        keys += [entries[w] for w in usable]
        q_all = (c_q[t] @ layer.wq_b.weight.T).view(cfg.n_heads, cfg.head_dim)
        heads = []
        for h in range(cfg.n_heads):
            q = naive_rope(naive_rms(q_all[h], None), float(t), freq)
            logits = [float(q @ k) / math.sqrt(cfg.head_dim) for k in keys]
            if cfg.sink:
                logits.append(float(layer.sinks[h]))
            top = max(logits) if logits else 0.0
            e = [math.exp(v - top) for v in logits]
            o = sum((e[i] / sum(e) * k for i, k in enumerate(keys)), torch.zeros(cfg.head_dim))
            heads.append(naive_rope(o, float(-t), freq))
        per_group = cfg.n_heads // cfg.o_groups
        groups = [layer.wo_a[g] @ torch.cat(heads[g * per_group:(g + 1) * per_group])
                  for g in range(cfg.o_groups)]
        out.append(torch.cat(groups) @ layer.wo_b.weight.T)
    return torch.stack(out)


def sliding_mask(n_tok: int, window: int) -> torch.Tensor:
    """[1, 1, T, T] additive causal sliding-window mask, as the reference model builds it."""
    t = torch.arange(n_tok)
    seen = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    return torch.zeros(n_tok, n_tok).masked_fill(~seen, float("-inf"))[None, None]

