"""DeepSeek-V4 attention layer (modules/v4_attention.py): reference, naive loop, decode, bad input.

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

import itertools

import pytest
import torch
from v4_reference import (
    ATOL,
    DIM,
    HEAD_DIM,
    IDX_DIM,
    M_CSA,
    M_HCA,
    ROPE,
    TOPK,
    WINDOW,
    copy_attention,
    make_layer,
    naive_attention,
    randomize,
    ref_modules,
    sliding_mask,
    v4_config,
)

from v4lab.modules.compressor import CompressorState, rope_cos_sin, topk_entry_bias, usable_entries
from v4lab.modules.norm import RMSNorm
from v4lab.modules.v4_attention import V4Attention


@pytest.mark.peer
@pytest.mark.parametrize("kind,layer_idx", [("sliding", 0), ("csa", 1), ("hca", 2)])
def test_attention_layer_matches_reference(kind, layer_idx):
    cfg, ref = ref_modules()
    theirs = ref.DeepseekV4Attention(cfg, layer_idx).eval()
    randomize(theirs, 10 + layer_idx)
    mine = make_layer(kind, 0)
    copy_attention(mine, theirs)
    n_tok = 3 * M_HCA + 3  # ends mid-block for both ratios
    x = torch.randn(2, n_tok, DIM, generator=torch.Generator().manual_seed(11))
    pos = torch.arange(n_tok)[None].expand(2, -1)
    rot = ref.DeepseekV4RotaryEmbedding(cfg)
    emb = {k: rot(x, pos, layer_type=k) for k in ("main", "compress")}
    caught = {}
    if kind == "csa":  # the reference's picks and scores
        theirs.compressor.register_forward_hook(lambda mod, a, out: caught.update(bias=out[1][:, 0]))
        theirs.compressor.indexer.scorer.register_forward_hook(lambda mod, a, out: caught.update(sc=out))
    with torch.no_grad():
        want = theirs(x, emb, pos, sliding_mask(n_tok, WINDOW).expand(2, -1, -1, -1))[0]
        got = mine(x)
    scale = want.abs().max().item()
    same = torch.ones(2, n_tok, dtype=torch.bool)
    if kind == "csa":
        same = csa_selections_agree(mine, x, caught["bias"], caught["sc"])
    err = (got - want).abs()[same].max().item()
    assert err < ATOL * scale, (err, scale)


def csa_selections_agree(mine: V4Attention, x: torch.Tensor, ref_bias: torch.Tensor,
                         ref_scores: torch.Tensor) -> torch.Tensor:
    """[B, T] rows where our top-k entries are the reference's. Elsewhere the two picks must
    differ only among tied scores (the reference's torch.topk breaks ReLU ties at 0 in no
    fixed order, ours in index order): the picked score multisets are equal."""
    n_tok = x.shape[1]
    with torch.no_grad():
        q_latent = mine.q_norm(mine.wq_a(x))
        keys = mine.indexer.keys(x, CompressorState())
        scores = mine.indexer.scores(x, q_latent, keys, *rope_cos_sin(torch.arange(n_tok), mine.inv_freq))
    assert (scores - ref_scores).abs().max() < ATOL
    usable = usable_entries(torch.arange(n_tok), keys.shape[1], M_CSA)
    ours = torch.isfinite(topk_entry_bias(scores, usable, TOPK))
    theirs = torch.isfinite(ref_bias)
    assert ours.sum(-1).max() == TOPK and (ours.sum(-1) < usable.sum(-1)).any()  # top-k really selects
    assert (ours.sum(-1) == theirs.sum(-1)).all()
    for b, t in (ours != theirs).any(-1).nonzero().tolist():
        mine_picked = scores[b, t][ours[b, t]].sort().values
        ref_picked = scores[b, t][theirs[b, t]].sort().values
        torch.testing.assert_close(mine_picked, ref_picked, atol=ATOL, rtol=0)
    same = (ours == theirs).all(-1)
    assert same.float().mean() > 0.75, same
    return same


FLAGS = [{}, {"use_window": False}, {"sink": False}, {"overlap": False}, {"csa_topk": 1},
         {"use_window": False, "sink": False}, {"overlap": False, "csa_topk": 5, "window": 1}]


def flag_id(flags: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in flags.items()) or "default"


def valid_cases(flag_sets: list[dict]) -> list:
    """(kind, flags) pairs that make a layer: a sliding-only layer needs its window (that
    combination is a config error, tested below)."""
    return [pytest.param(kind, flags, id=f"{kind}-{flag_id(flags)}")
            for kind in ("sliding", "csa", "hca") for flags in flag_sets
            if not (kind == "sliding" and flags.get("use_window") is False)]


@pytest.mark.parametrize("kind,flags", valid_cases(FLAGS))
def test_attention_layer_matches_naive_loop(kind, flags):
    layer = make_layer(kind, 20, **flags)
    x = torch.randn(2, 3 * M_HCA + 3, DIM, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        got = layer(x)
    for b in range(2):
        want = naive_attention(layer, x[b])
        torch.testing.assert_close(got[b], want, atol=ATOL * want.abs().max().item(), rtol=0)
    assert torch.isfinite(got).all()


def test_switches_change_the_output():
    """Each switch reaches the computation (guards against a flag that is silently ignored)."""
    x = torch.randn(1, 3 * M_HCA + 3, DIM, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        base = {k: make_layer(k, 23)(x) for k in ("csa", "hca")}
        for flags in FLAGS[1:]:
            for kind in ("csa", "hca"):
                out = make_layer(kind, 23, **flags)(x)
                if kind == "hca" and set(flags) <= {"overlap", "csa_topk"}:
                    torch.testing.assert_close(out, base[kind])  # CSA-only switches leave HCA alone
                else:
                    assert (out - base[kind]).abs().max() > 1e-3, (kind, flags)


# ---------------------------------------------------------------- decoding with the cache

EVERY_SWITCH = [dict(use_window=w, sink=s, overlap=o, csa_topk=k)
                for w, s, o, k in itertools.product([True, False], [True, False], [True, False], [1, TOPK])]


@pytest.mark.parametrize("kind,flags", valid_cases(EVERY_SWITCH))
def test_decode_token_by_token_equals_full_forward(kind, flags):
    """Token by token and in uneven chunks, every switch combination; 27 tokens end
    mid-block for m = 4 and m' = 8. CSA decode steps read only their top-k entries."""
    layer = make_layer(kind, 30, **flags)
    x = torch.randn(2, 3 * M_HCA + 3, DIM, generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache()
        gathered = []
        read_topk = cache.entries.gather
        cache.entries.gather = lambda idx: gathered.append(idx.shape[1]) or read_topk(idx)
        steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])], 1)
        cache2 = layer.new_cache()
        chunks = torch.cat([layer(x[:, a:b], cache=cache2)
                            for a, b in [(0, 5), (5, 6), (6, 17), (17, 27)]], 1)
    assert cache.pos == cache2.pos == 27
    if layer.compressor is not None:
        assert cache.comp.count == 27 // layer.ratio and cache.comp.buf_kv.shape[1] == 27 % layer.ratio
    if flags.get("use_window", True):
        assert len(cache.window) == layer.cfg.window - 1  # only the last W - 1 entries are kept
    assert (max(gathered) == flags["csa_topk"]) if kind == "csa" else not gathered
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input

def test_bad_config_is_rejected_naming_key_value_and_rule():
    from v4lab.errors import ConfigError

    cfg = v4_config()
    with pytest.raises(ConfigError, match=r"m\.compress_ratios\[1\]=5 .*0 \(sliding only\), csa_ratio \(4\)"):
        cfg.validate_layers("m.compress_ratios", [0, 5, 8], 3)
    with pytest.raises(ConfigError, match=r"m\.compress_ratios=\[0, 4\] .*3 ratios"):
        cfg.validate_layers("m.compress_ratios", [0, 4], 3)
    assert cfg.validate_layers("m.compress_ratios", [0, 4, 8], 3) == ["sliding", "csa", "hca"]
    with pytest.raises(ConfigError, match=r"m\.window=6 .*<= the sequence length 5"):
        cfg.validate_sequence("m", 5, ["sliding"])
    with pytest.raises(ConfigError, match=r"m\.hca_ratio=8 .*sequence length 7"):
        v4_config(window=2).validate_sequence("m", 7, ["hca"])
    with pytest.raises(ConfigError, match=r"m\.csa_topk=3 .*11 // 4 = 2"):
        cfg.validate_sequence("m", 11, ["csa"])
    cfg.validate_sequence("m", 12, ["sliding", "csa", "hca"])
    with pytest.raises(ConfigError, match=r"use_window=false"):
        v4_config(use_window=False).validate_layers("m.compress_ratios", [0, 4, 8], 3)
    with pytest.raises(ConfigError, match=r"x\.o_groups=3 .*divisor of n_heads \(4\)"):
        v4_config(o_groups=3)
    with pytest.raises(ConfigError, match=r"x\.rope_dim=7"):
        v4_config(rope_dim=7)
    with pytest.raises(ConfigError, match=r"x\.hca_ratio=4 .*different from csa_ratio"):
        v4_config(hca_ratio=4)
    with pytest.raises(ConfigError, match=r"x\.window=0 "):
        v4_config(window=0)
    with pytest.raises(ConfigError, match=r"kind='sliding' .*use_window=false"):
        V4Attention(DIM, v4_config(use_window=False), "sliding")
    with pytest.raises(ConfigError, match=r"kind='dense' "):
        V4Attention(DIM, v4_config(), "dense")


# ---------------------------------------------------------------- cache formats and training

@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
def test_low_precision_cache_decode_equals_full_forward(kind, fmt):
    """Training rounds the attended entries exactly as the cache stores them, so decoding
    from the stored bf16 / fp8 tensors reproduces the full forward; the rounding is real
    (the output moves away from the fp32 one)."""
    layer = make_layer(kind, 40, kv_dtype=fmt, kv_block=4)
    x = torch.randn(2, 3 * M_HCA + 3, DIM, generator=torch.Generator().manual_seed(41))
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache()
        steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])], 1)
        layer.cfg.kv_dtype = "fp32"
        exact = layer(x)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    drift = (full - exact).abs().max().item() / exact.abs().max().item()
    assert 1e-4 < drift < 0.2, drift
    stored = cache.window.parts
    if fmt == "fp8":
        assert stored["nope"].dtype == torch.float8_e4m3fn and stored["rope"].dtype == torch.bfloat16
        # nope: 8 e4m3 bytes + 2 fp32 scales; rope: 8 bf16 values
        assert cache.window.bytes_per_entry() == (HEAD_DIM - ROPE) + 4 * (HEAD_DIM - ROPE) // 4 + 2 * ROPE
    else:
        assert stored["kv"].dtype == torch.bfloat16 and cache.window.bytes_per_entry() == 2 * HEAD_DIM
    if kind != "sliding":
        assert len(cache.entries) == x.shape[1] // layer.ratio
        assert cache.entries.bytes_per_entry() == cache.window.bytes_per_entry()
    assert cache.nbytes() == sum(s.nbytes() for s in (cache.window, cache.entries, cache.index_keys))
    index_bytes = {"sliding": 0, "hca": 0, "csa": 2 * IDX_DIM}[kind]  # bf16 indexer keys
    entry_bytes = cache.window.bytes_per_entry() if kind != "sliding" else 0
    assert cache.bytes_per_token() == (entry_bytes + index_bytes) / max(layer.ratio, 1)


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
def test_training_gradients_reach_every_parameter(kind):
    """Backward through the fp8-rounded cache values (straight-through) and the sparse mask;
    the indexer gets no gradient from the LM loss (top-k is not differentiable)."""
    layer = make_layer(kind, 50, kv_dtype="fp8", kv_block=4)
    x = torch.randn(2, 3 * M_HCA + 3, DIM, generator=torch.Generator().manual_seed(51), requires_grad=True)
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for name, p in layer.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


# ---------------------------------------------------------------- a tiny stack

class TinyStack(torch.nn.Module):
    """Embedding -> [RMSNorm -> attention, residual] per layer -> RMSNorm -> logits."""

    def __init__(self, layers: list[torch.nn.Module], vocab: int = 50) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, DIM)
        self.norms = torch.nn.ModuleList(RMSNorm(DIM) for _ in layers)
        self.layers = torch.nn.ModuleList(layers)
        self.head = torch.nn.Linear(DIM, vocab, bias=False)

    def forward(self, ids: torch.Tensor, run_layer) -> torch.Tensor:
        x = self.emb(ids)
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            x = x + run_layer(i, layer, norm(x))
        return self.head(x)


@pytest.mark.peer
def test_tiny_attention_stack_logits_match_reference_and_decode():
    """Sliding, CSA and HCA layers in one residual stack: our logits equal the stack of the
    reference's attention modules (same embedding, norms, head); decoding it token by token
    through per-layer caches gives the same logits."""
    cfg, ref = ref_modules()
    cfg.index_topk = 6  # top-k = every entry at 27 tokens: no tie-breaking involved
    theirs = [ref.DeepseekV4Attention(cfg, i).eval() for i in range(3)]
    mine = []
    for i, (kind, t) in enumerate(zip(["sliding", "csa", "hca"], theirs)):
        randomize(t, 60 + i)
        mine.append(make_layer(kind, 0, csa_topk=6))
        copy_attention(mine[-1], t)
    stack = TinyStack(mine)
    ids = torch.randint(0, 50, (2, 27), generator=torch.Generator().manual_seed(61))
    pos = torch.arange(27)[None].expand(2, -1)
    rot = ref.DeepseekV4RotaryEmbedding(cfg)
    mask = sliding_mask(27, WINDOW).expand(2, -1, -1, -1)

    def run_ref(i, layer, h):
        emb = {k: rot(h, pos, layer_type=k) for k in ("main", "compress")}
        return theirs[i](h, emb, pos, mask)[0]

    with torch.no_grad():
        want = stack(ids, run_ref)
        got = stack(ids, lambda i, layer, h: layer(h))
        caches = [layer.new_cache() for layer in mine]
        steps = torch.cat([stack(ids[:, t:t + 1], lambda i, layer, h: layer(h, cache=caches[i]))
                           for t in range(27)], 1)
    assert (got - want).abs().max() < ATOL * want.abs().max()
    torch.testing.assert_close(steps, got, atol=1e-5, rtol=0)


def test_model_protocol_positions_are_checked():
    from v4lab.modules.context import ForwardContext

    layer = make_layer("hca", 70)
    x = torch.randn(1, 4, DIM)
    cache = layer.new_cache(1, 64, "cpu")
    layer(x, ForwardContext(positions=torch.arange(4)), cache)
    with pytest.raises(ValueError, match="starts at position 0 but the cache holds 4"):
        layer(x, ForwardContext(positions=torch.arange(4)), cache)


def test_cache_bytes_at_v4_flash_entry_shape():
    """Bytes per stored entry read off the tensors at V4-Flash's entry shape (d = 512,
    rope 64, fp8 blocks of 64 with fp32 scales; indexer keys 128 wide in bf16) equal the
    arithmetic: 448 e4m3 bytes + 7 scales * 4 + 64 bf16 * 2 = 604."""
    from v4lab.modules.v4_cache import V4LayerCache

    for ratio, per_token in [(4, (604 + 2 * 128) / 4), (128, 604 / 128)]:
        cache = V4LayerCache.empty("fp8", 64, 64, ratio)
        cache.entries.append(torch.randn(1, 3, 512))
        if ratio == 4:
            cache.index_keys.append(torch.randn(1, 3, 128))
        assert cache.entries.bytes_per_entry() == 604
        assert cache.bytes_per_token() == per_token
        assert cache.nbytes() == 3 * 604 + (3 * 256 if ratio == 4 else 0)
