"""DeepSeek-V4 KV compression (modules/compressor.py): RoPE, HCA/CSA compressors, indexer.

Every numerical piece is checked two ways:
  (a) against transformers' DeepSeek-V4 modules (marked ``peer``) with weights copied
      into ours, fp32;
  (b) against a naive per-block / per-query loop (tests/v4_reference.py) from the formulas
      (RoPE as complex multiplication, explicit softmax sums), sharing no code with src.

Tolerances: fp32 sums of at most a few hundred terms of O(1) values; the observed
differences are 0 to ~1e-6, the bounds (atol 2e-5 on O(1) outputs) leave room for BLAS
reduction order but would catch any wrong slot, position, scale or mask.
"""

from __future__ import annotations

import pytest
import torch
from v4_reference import (
    ATOL,
    CTHETA,
    DIM,
    HEAD_DIM,
    IDX_DIM,
    IDX_HEADS,
    M_CSA,
    M_HCA,
    QRANK,
    ROPE,
    THETA,
    YARN,
    compress_freq,
    copy_compressor,
    copy_indexer,
    naive_compress,
    naive_index_scores,
    naive_rope,
    randomize,
    ref_modules,
)

from v4lab.modules.compressor import (
    BlockCompressor,
    CompressorState,
    LightningIndexerV4,
    rope_cos_sin,
    rope_inv_freq,
    rope_tail,
    usable_entries,
)

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
    state, outs = CompressorState(), []
    for a, b in [(0, 1), (1, 6), (6, 7), (7, 8), (8, 17), (17, 23)]:
        outs.append(comp(x[:, a:b], state))
        assert state.count == b // M_CSA and outs[-1].shape[1] == b // M_CSA - a // M_CSA
    assert state.buf_kv.shape[1] == 23 % M_CSA
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-6, rtol=0)


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

