"""DeepSeek-V4 attention (modules/compressor.py, modules/v4_attention.py).

Every numerical piece is checked two ways:
  (a) against transformers' DeepSeek-V4 modules (marked ``peer``) with weights copied
      into ours, fp32;
  (b) against a naive per-block / per-query loop written here from the formulas
      (RoPE as complex multiplication, explicit softmax sums), sharing no code with src.

Tolerances: fp32 sums of at most a few hundred terms of O(1) values; the observed
differences are ~1e-6, the bounds (atol 2e-5 on O(1) outputs) leave room for BLAS
reduction order but would catch any wrong slot, position, scale or mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from v4lab.modules.compressor import (
    BlockCompressor,
    CompressorState,
    LightningIndexerV4,
    rope_cos_sin,
    rope_inv_freq,
    usable_entries,
)

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


# ---------------------------------------------------------------- rope

@pytest.mark.peer
def test_rope_frequencies_match_reference_per_layer_kind():
    cfg, ref = ref_modules()
    rot = ref.DeepseekV4RotaryEmbedding(cfg)
    torch.testing.assert_close(rope_inv_freq(ROPE, THETA), rot.main_inv_freq, rtol=1e-6, atol=0)
    yarn = compress_freq()
    torch.testing.assert_close(yarn, rot.compress_inv_freq, rtol=1e-6, atol=0)
    plain = rope_inv_freq(ROPE, CTHETA)
    # the YaRN blend keeps the fastest pair and slows the slowest by the factor
    assert yarn[0] == plain[0] and torch.isclose(yarn[-1], plain[-1] / YARN)


def test_rope_tail_is_adjacent_pair_rotation():
    from v4lab.modules.compressor import rope_tail
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, HEAD_DIM, generator=g)
    freq = compress_freq()
    cos, sin = rope_cos_sin(torch.arange(3, 8), freq)
    y = rope_tail(x, cos, sin)
    for t in range(5):
        torch.testing.assert_close(y[0, t], naive_rope(x[0, t], float(t + 3), freq), atol=1e-6, rtol=0)
    torch.testing.assert_close(rope_tail(y, cos, -sin), x, atol=1e-6, rtol=0)  # R(-t) undoes R(t)


# ---------------------------------------------------------------- compressors

@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_compressor_matches_naive_block_loop(kind):
    m, overlap = (M_HCA, False) if kind == "hca" else (M_CSA, True)
    torch.manual_seed(1)
    comp = BlockCompressor(DIM, HEAD_DIM, m, overlap, compress_freq())
    randomize(comp, 1)
    x = torch.randn(2, 3 * m + m - 1, DIM)  # ends mid-block: the incomplete block emits nothing
    out = comp(x, CompressorState())
    assert out.shape == (2, 3, HEAD_DIM)
    for b in range(2):
        want = naive_compress(x[b], comp.wkv.weight, comp.wgate.weight, comp.position_bias,
                              comp.norm.weight, m, overlap, compress_freq())
        torch.testing.assert_close(out[b], want, atol=ATOL, rtol=0)


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_compressor_matches_reference(kind):
    cfg, ref = ref_modules()
    if kind == "hca":
        theirs, m, overlap = ref.DeepseekV4HCACompressor(cfg), M_HCA, False
    else:
        theirs, m, overlap = ref.DeepseekV4CSACompressor(cfg), M_CSA, True
    randomize(theirs, 2)
    mine = BlockCompressor(DIM, HEAD_DIM, m, overlap, compress_freq())
    copy_compressor(mine, theirs)
    x = torch.randn(2, 4 * m + 1, DIM, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(x.shape[1])[None].expand(2, -1)
    q_latent = torch.randn(2, x.shape[1], QRANK)
    with torch.no_grad():
        want = theirs(x, q_latent, pos, None, 0)[0][:, 0]
        got = mine(x, CompressorState())
    assert got.shape == want.shape == (2, 4, HEAD_DIM)
    err = (got - want).abs().max().item()
    assert err < ATOL, err


@pytest.mark.parametrize("overlap", [True, False])
def test_compressor_incremental_equals_full(overlap):
    """Feeding the tokens in uneven chunks (also single tokens) emits the same entries."""
    comp = BlockCompressor(DIM, HEAD_DIM, M_CSA, overlap, compress_freq())
    randomize(comp, 4)
    x = torch.randn(1, 23, DIM, generator=torch.Generator().manual_seed(5))
    full = comp(x, CompressorState())
    state = CompressorState()
    for a, b in [(0, 1), (1, 6), (6, 7), (7, 8), (8, 17), (17, 23)]:
        out = comp(x[:, a:b], state)
        assert out.shape[1] == b // M_CSA
    assert state.buf_kv.shape[1] == 23 % M_CSA
    torch.testing.assert_close(out, full, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- indexer

def make_indexer(seed: int) -> LightningIndexerV4:
    idx = LightningIndexerV4(DIM, QRANK, IDX_HEADS, IDX_DIM, M_CSA, True, compress_freq())
    randomize(idx, seed)
    return idx


def test_indexer_scores_match_naive():
    idx = make_indexer(6)
    g = torch.Generator().manual_seed(7)
    x, q_latent = torch.randn(1, 13, DIM, generator=g), torch.randn(1, 13, QRANK, generator=g)
    keys = idx.keys(x, CompressorState())
    cos, sin = rope_cos_sin(torch.arange(13), compress_freq())
    got = idx.scores(x, q_latent, keys, cos, sin)[0]
    want = naive_index_scores(x[0], q_latent[0], keys[0], idx.wq.weight, idx.weights_proj.weight,
                              compress_freq())
    assert (want == 0).any() and (want != 0).any()  # ReLU ties are exercised
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.peer
def test_indexer_keys_and_scores_match_reference():
    cfg, ref = ref_modules()
    theirs = ref.DeepseekV4Indexer(cfg)
    randomize(theirs, 8)
    mine = LightningIndexerV4(DIM, QRANK, IDX_HEADS, IDX_DIM, M_CSA, True, compress_freq())
    copy_indexer(mine, theirs)
    g = torch.Generator().manual_seed(9)
    x, q_latent = torch.randn(2, 18, DIM, generator=g), torch.randn(2, 18, QRANK, generator=g)
    caught = {}
    hook = theirs.scorer.register_forward_hook(
        lambda mod, args, out: caught.update(keys=args[1], scores=out))
    with torch.no_grad():
        theirs(x, q_latent, torch.arange(18)[None].expand(2, -1), None, 0)
        keys = mine.keys(x, CompressorState())
        cos, sin = rope_cos_sin(torch.arange(18), compress_freq())
        scores = mine.scores(x, q_latent, keys, cos, sin)
    hook.remove()
    assert (keys - caught["keys"]).abs().max() < ATOL
    assert (scores - caught["scores"]).abs().max() < ATOL
    # the reference masks not-yet-complete blocks the same way
    assert usable_entries(torch.arange(18), 4, M_CSA)[3].tolist() == [True, False, False, False]
