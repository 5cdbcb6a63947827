"""The released DeepSeek-V4 assembled as switches of the one model (issues 14 and 15):
V4 attention as ``model.attention.kind=v4``, the MTP block, the V4 experiments.

Decode checks: the model's token-by-token decode (``forward_cached``) and ``generate``
against its own full forward, for every V4 attention switch combination on sequences
that end mid-block. fp32 throughout: the two paths differ only by fp32 round-off of
batched vs one-row matmuls and sums of a few hundred O(1) terms (observed max 5.1e-6 on
logits of magnitude ~4 over all switch combinations); the bound 5e-5 (abs and rel) would
catch any wrong entry, mask, position or cache state (those move logits by >= 1e-2).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from v4lab import decode
from v4lab.errors import ConfigError
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import (
    AttentionConfig,
    EngramConfig,
    HyperConnectionConfig,
    MoEConfig,
    v4_layer_ratios,
)
from v4lab.modules.mtp import MTPConfig
from v4lab.modules.v4_config import V4AttentionConfig

V = 97
T = 27  # ends mid-block for m = 4 (27 = 6 * 4 + 3) and m' = 8 (27 = 3 * 8 + 3)
FP32_TOL = 5e-5


def v4_cfg(**kw) -> V4AttentionConfig:
    base = dict(n_heads=4, head_dim=16, rope_dim=8, q_lora_rank=24, window=6, csa_ratio=4,
                hca_ratio=8, index_n_heads=2, index_head_dim=8, csa_topk=3, o_groups=2,
                o_lora_rank=12, kv_dtype="fp32", kv_block=4)
    return V4AttentionConfig(**(base | kw))


def model_cfg(v4: V4AttentionConfig | None = None, ratios: list[int] | None = None, **kw) -> ModelConfig:
    v4 = v4 or v4_cfg()
    if ratios is None:
        ratios = [0, 4, 8] if v4.use_window else [4, 8, 4]
    base = dict(vocab_size=V, dim=32, n_layers=3, ffn_dim=48, max_seq_len=64,
                attention=AttentionConfig(kind="v4", v4=v4, compress_ratios=ratios),
                moe=MoEConfig(enabled=False), engram=EngramConfig(enabled=False))
    return ModelConfig(**(base | kw))


def randomize(model: torch.nn.Module, seed: int = 0, only: str = "") -> None:
    """A trained-looking model: matrices ~ N(0, 1/fan_in), norm gains ~ 1 +- 0.1, sinks
    and the compressors' position biases ~ N(0, 1) (zero at init). ``only``: parameters
    whose name contains it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only not in name:
                continue
            if name.endswith(("sinks", "position_bias")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomize(model, seed)
    return model


def decode_steps(model: Transformer, ids: torch.Tensor, first: int = 1) -> torch.Tensor:
    """Logits of a prefill of ``first`` tokens, then one token at a time through the caches."""
    caches = model.new_caches(ids.shape[0], ids.shape[1])
    out = [model.forward_cached(ids[:, :first], caches, 0, history=ids[:, :first])]
    out += [model.forward_cached(ids[:, i:i + 1], caches, i, history=ids[:, :i + 1])
            for i in range(first, ids.shape[1])]
    return torch.cat(out, 1)


# ---------------------------------------------------------------- wiring

def test_layer_kinds_follow_compress_ratios_and_the_v4_flash_pattern():
    model = build(model_cfg(ratios=[0, 8, 4]))
    assert [b.attn.kind for b in model.blocks] == ["sliding", "hca", "csa"]
    assert [b.attn.ratio for b in model.blocks] == [0, 8, 4]
    v4 = v4_cfg()
    # V4-Flash: two sliding-only layers, then CSA / HCA alternating (at 43 layers)
    flash = v4_layer_ratios(43, v4, 2, ["csa", "hca"])
    assert flash[:6] == [0, 0, 4, 8, 4, 8] and len(flash) == 43 and flash.count(0) == 2
    # shallow models keep room for one round of the cycle; no window: no sliding layer
    assert v4_layer_ratios(2, v4, 2, ["csa", "hca"]) == [4, 8]
    assert v4_layer_ratios(4, v4, 2, ["hca"]) == [0, 0, 8, 8]
    assert v4_layer_ratios(4, v4_cfg(use_window=False), 2, ["csa", "hca"]) == [4, 8, 4, 8]
    empty = build(model_cfg(ratios=[]))  # [] = the pattern
    assert [b.attn.kind for b in empty.blocks] == ["sliding", "csa", "hca"]


def test_gpt2_init_scales_the_v4_output_projection():
    cfg = model_cfg(n_layers=3, init_std=0.02)
    torch.manual_seed(0)
    model = Transformer(cfg)
    want = 0.02 / math.sqrt(2 * 3)
    for blk in model.blocks:
        assert abs(blk.attn.wo_b.weight.std().item() - want) < 0.15 * want
        assert abs(blk.attn.wq_b.weight.std().item() - 0.02) < 0.15 * 0.02


def test_kv_bytes_per_token_measured_from_the_caches():
    """fp8 cache: an entry is 8 e4m3 nope bytes + 2 fp32 scales (blocks of 4) + 8 bf16 rope
    values = 32 B; CSA adds a bf16 indexer key (8 x 2 B) per block. Per token of context:
    sliding 0 (constant window), CSA (32 + 16) / 4, HCA 32 / 8."""
    model = build(model_cfg(v4_cfg(kv_dtype="fp8")))
    assert model.kv_probe_tokens() == 8
    caches = model.new_caches(1, 10)
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, model.kv_probe_tokens(), dtype=torch.long), caches, 0)
    assert model.kv_bytes_per_token(caches) == (32 + 16) / 4 + 32 / 8


# ---------------------------------------------------------------- decode = full forward

SWITCHES = [dict(use_window=w, sink=s, overlap=o, csa_topk=k)
            for w, s, o, k in itertools.product([True, False], [True, False], [True, False], [1, 3])]


@pytest.mark.parametrize("flags", SWITCHES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_token_by_token_decoding_matches_full_forward(flags):
    model = build(model_cfg(v4_cfg(**flags)))
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        steps = decode_steps(model, ids)
        chunked = decode_steps(model, ids, first=10)  # a prefill ending mid-block, then steps
    assert full.abs().max() > 1
    torch.testing.assert_close(steps, full, atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(chunked, full, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_low_precision_cache_decoding_matches_full_forward(fmt):
    """Training rounds the attended entries as the cache stores them. Later layers see
    inputs that differ by fp32 round-off between the two paths, which can move a stored
    value across a rounding boundary (one bf16 / e4m3 step): bounded by 2e-3 relative to
    the logits' scale here (measured: bf16 5e-5, fp8 1.9e-4 on logits of magnitude 3.6), far
    below what a wrong entry gives (dropping one window entry mid-way moves logits by ~3.6)."""
    model = build(model_cfg(v4_cfg(kv_dtype=fmt)))
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        steps = decode_steps(model, ids)
    scale = full.abs().max().item()
    assert (steps - full).abs().max().item() <= 2e-3 * scale


def test_generate_equals_greedy_of_the_full_forward():
    """generate (chunked prefill ending mid-block, then cached steps) picks, at every step,
    the argmax of the full forward over the tokens so far."""
    model = build(model_cfg())
    prompt = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 17, prefill_chunk=3)
    assert out.shape == (2, 27) and torch.equal(out[:, :10], prompt)
    with torch.no_grad():
        full = model(out[:, :-1])
    assert torch.equal(out[:, 10:], full[:, 9:].argmax(-1))


def test_decode_equals_full_forward_with_mhc_hash_routing_moe_and_mtp():
    """The whole V4 recipe in one model (V4 attention, mHC, sqrt(softplus) MoE with a
    hash-routed first layer and the SwiGLU clamp, MTP): decoding ignores the MTP block."""
    cfg = model_cfg(hc=HyperConnectionConfig(enabled=True, n_streams=2),
                    moe=MoEConfig(enabled=True, n_routed_experts=4, n_shared_experts=1, top_k=2,
                                  expert_dim=16, first_dense_layers=0, score_func="sqrtsoftplus",
                                  route_scale=1.5, hash_layers=1, swiglu_limit=10.0),
                    mtp=MTPConfig(depth=1))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    randomize(model, 0, only=".attn.")  # mHC and MoE keep their own init
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        steps = decode_steps(model, ids, first=3)
        without = dataclasses.replace(cfg, mtp=MTPConfig(depth=0))
        plain = Transformer(without).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
        same = plain(ids)
    assert type(model.blocks[0].ffn.gate).__name__ == "HashGate"
    torch.testing.assert_close(steps, full, atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(same, full, atol=0, rtol=0)  # MTP does not touch the main path


# ---------------------------------------------------------------- bad input

def test_bad_v4_model_config_names_key_value_and_allowed():
    with pytest.raises(ConfigError, match=r"model\.attention\.compress_ratios=\[0, 4\] .*3 ratios"):
        Transformer(model_cfg(ratios=[0, 4]))
    with pytest.raises(ConfigError, match=r"model\.attention\.compress_ratios\[1\]=5 .*csa_ratio \(4\)"):
        Transformer(model_cfg(ratios=[0, 5, 8]))
    with pytest.raises(ConfigError, match=r"model\.attention\.compress_ratios\[0\]=0 .*use_window=false"):
        Transformer(model_cfg(v4_cfg(use_window=False), ratios=[0, 4, 8]))
    sparse = model_cfg()
    sparse.attention.sparse.enabled = True
    with pytest.raises(ConfigError, match=r"model\.attention\.sparse\.enabled=True .*CSA"):
        Transformer(sparse)
    sparse.attention.compress_ratios = [0, 8, 8]  # no CSA layer: allowed (sparse MLA unused)
    Transformer(sparse)
    with pytest.raises(ConfigError, match=r"model\.attention\.v4\.window=80 .*<= the sequence length 64 "
                                          r"\(model\.max_seq_len=64"):
        Transformer(model_cfg(v4_cfg(window=80)))
    with pytest.raises(ConfigError, match=r"model\.attention\.v4\.csa_topk=20 .*64 // 4 = 16"):
        Transformer(model_cfg(v4_cfg(csa_topk=20)))
    with pytest.raises(ConfigError, match=r"model\.attention\.v4_cycle=\['csa', 'dense'\]"):
        bad = model_cfg(ratios=[])
        bad.attention.v4_cycle = ["csa", "dense"]
        Transformer(bad)
    mla = AttentionConfig(kind="mla", compress_ratios=[0, 4])
    with pytest.raises(ConfigError, match=r"model\.attention\.compress_ratios=\[0, 4\] .*kind='v4'"):
        Transformer(ModelConfig(vocab_size=V, attention=mla))
    with pytest.raises(ConfigError, match=r"model\.mtp\.depth=2 .*only depth 1 is built"):
        Transformer(model_cfg(mtp=MTPConfig(depth=2)))


# ---------------------------------------------------------------- the CSA indexer's KL loss

def _csa_layer(seed: int = 50, **kw):
    from v4_reference import make_layer

    return make_layer("csa", seed, **kw)


def _naive_indexer_kl(layer, x: torch.Tensor, dense: bool) -> float:
    """Per (sequence, query) loop: the entries a query may use, the indexer's top-k of them
    (stable sort: ties in index order), the main attention per head over the chosen
    entries by explicit exp sums, averaged over heads, and sum p log(p / q) against the
    indexer's softmax over the same entries."""
    from v4lab.modules.compressor import CompressorState, rope_cos_sin, rope_tail
    from v4lab.modules.v4_attention import unweighted_rms

    cfg, m = layer.cfg, layer.ratio
    b, t, _ = x.shape
    with torch.no_grad():
        cos, sin = rope_cos_sin(torch.arange(t), layer.inv_freq)
        q_lat = layer.q_norm(layer.wq_a(x))
        q = rope_tail(unweighted_rms(layer.wq_b(q_lat).view(b, t, cfg.n_heads, -1), cfg.norm_eps), cos, sin)
        entries = layer.compressor(x, CompressorState()).double()
        keys = layer.indexer.keys(x, CompressorState())
        scores = layer.indexer.scores(x, q_lat, keys, cos, sin).double()
    kls = []
    for bi in range(b):
        for ti in range(t):
            usable = [w for w in range(entries.shape[1]) if (w + 1) * m <= ti + 1]
            if not usable:
                continue
            ranked = sorted(usable, key=lambda w: -scores[bi, ti, w].item())
            chosen = usable if dense else ranked[:cfg.csa_topk]
            p = {w: 0.0 for w in chosen}
            for h in range(cfg.n_heads):
                logit = {w: (q[bi, ti, h].double() @ entries[bi, w]).item() / cfg.head_dim ** 0.5
                         for w in chosen}
                top = max(logit.values())
                z = sum(math.exp(v - top) for v in logit.values())
                for w in chosen:
                    p[w] += math.exp(logit[w] - top) / z / cfg.n_heads
            top = max(scores[bi, ti, w].item() for w in chosen)
            z = sum(math.exp(scores[bi, ti, w].item() - top) for w in chosen)
            kls.append(sum(p[w] * math.log(p[w] / (math.exp(scores[bi, ti, w].item() - top) / z))
                           for w in chosen if p[w] > 0))
    return sum(kls) / len(kls)


@pytest.mark.parametrize("dense", [False, True])
def test_indexer_kl_equals_a_per_query_loop(dense):
    """fp32 softmaxes over <= 6 entries against a float64 loop: measured agreement 3e-8 on
    a KL of ~0.1-0.2; bound 1e-5."""
    from v4lab.modules.context import ForwardContext

    layer = _csa_layer(index_warmup_steps=10)
    x = torch.randn(2, T, layer.wq_a.in_features, generator=torch.Generator().manual_seed(51))
    ctx = ForwardContext(positions=torch.arange(T), step=0 if dense else 10)
    layer(x, ctx)
    got = ctx.aux_losses["v4/indexer_kl"].item()
    want = _naive_indexer_kl(layer, x, dense)
    assert want > 1e-2 and abs(got - want) < 1e-5, (got, want)
    assert 0 <= ctx.stat_tensors()["v4/recall"].item() <= 1


def test_indexer_kl_trains_only_the_indexer_and_warmup_is_dense():
    from v4lab.modules.context import ForwardContext

    layer = _csa_layer(index_warmup_steps=10)
    x = torch.randn(2, T, layer.wq_a.in_features, generator=torch.Generator().manual_seed(52))
    ctx = ForwardContext(positions=torch.arange(T), step=10)
    sparse_out = layer(x, ctx)
    ctx.aux_losses["v4/indexer_kl"].backward()
    for name, p in layer.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # x and c_Q enter the indexer detached
    with torch.no_grad():
        plain = layer(x)  # inference: no loss, sparse top-k
        torch.testing.assert_close(sparse_out.detach(), plain, atol=0, rtol=0)
        warm = layer(x, ForwardContext(positions=torch.arange(T), step=9))
        layer.cfg.csa_topk = 100  # every complete entry
        dense = layer(x)
    torch.testing.assert_close(warm, dense, atol=0, rtol=0)
    assert (warm - plain).abs().max() > 1e-3


def test_training_the_indexer_lowers_its_kl():
    from v4lab.modules.context import ForwardContext

    layer = _csa_layer()
    x = torch.randn(4, T, layer.wq_a.in_features, generator=torch.Generator().manual_seed(53))
    opt = torch.optim.Adam(layer.indexer.parameters(), lr=1e-2)
    kls = []
    for _ in range(40):
        ctx = ForwardContext(positions=torch.arange(T), step=100)
        layer(x, ctx)
        kl = ctx.aux_losses["v4/indexer_kl"]
        opt.zero_grad()
        kl.backward()
        opt.step()
        kls.append(kl.item())
    assert kls[-1] < 0.5 * kls[0], kls


# ---------------------------------------------------------------- self-speculative decoding

def _spec_models():
    """MHA, sparse MLA + Engram, and the V4 recipe (V4 attention, mHC, hash-routed MoE), each
    with an MTP block."""
    mha = ModelConfig(vocab_size=V, dim=32, n_layers=2, ffn_dim=48, max_seq_len=64,
                      attention=AttentionConfig(kind="mha", n_heads=2, head_dim=16),
                      moe=MoEConfig(enabled=False), engram=EngramConfig(enabled=False),
                      mtp=MTPConfig(depth=1))
    mla = dataclasses.replace(mha, attention=AttentionConfig(kind="mla", n_heads=2), engram=EngramConfig(
        enabled=True, layers=[1], ngram_orders=[2], heads_per_order=2, table_size=31, head_dim=4))
    mla.attention.sparse.enabled, mla.attention.sparse.topk = True, 4
    v4 = model_cfg(hc=HyperConnectionConfig(enabled=True, n_streams=2), mtp=MTPConfig(depth=1),
                   moe=MoEConfig(enabled=True, n_routed_experts=4, top_k=2, expert_dim=16,
                                 first_dense_layers=0, score_func="sqrtsoftplus", hash_layers=1))
    return {"mha": mha, "mla_sparse_engram": mla, "v4": v4}


@pytest.mark.parametrize("name", ["mha", "mla_sparse_engram", "v4"])
@pytest.mark.parametrize("drafts", ["mtp", "oracle", "wrong"])
def test_speculative_greedy_equals_plain_greedy(name, drafts, monkeypatch):
    """Exactly plain greedy's tokens, whether the drafts are the MTP block's, always right
    (every step takes the two-token path) or always wrong (every step puts the caches back
    and re-runs one token): the accept and the reject paths are both exercised."""
    torch.manual_seed(0)
    model = Transformer(_spec_models()[name]).eval()
    randomize(model, 1, only=".attn.")
    prompt = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(7))
    plain = model.generate(prompt, 20)
    if drafts != "mtp":
        real = decode.mtp_draft

        def forced(model, h, next_ids, mtp_caches, start):
            real(model, h, next_ids, mtp_caches, start)  # keep the MTP cache advancing as usual
            at = start + next_ids.shape[1] + 1  # next_ids[:, -1] sits at start + n; the draft after it
            ref = plain[:, at:at + 1] if at < plain.shape[1] else torch.zeros_like(next_ids[:, :1])
            return ref if drafts == "oracle" else (ref + 1) % V

        monkeypatch.setattr(decode, "mtp_draft", forced)
    spec = model.generate(prompt, 20, speculative=True, prefill_chunk=4)
    assert torch.equal(spec, plain)
    stats = model.speculative_stats
    if drafts == "oracle":
        assert stats["accepted"] == stats["drafted"] == 10  # 20 new tokens: 10 accepted pairs
    elif drafts == "wrong":
        assert stats["accepted"] == 0 and stats["drafted"] == 19  # the 20th needs no draft


def test_speculative_needs_greedy_and_an_mtp_block():
    model = Transformer(model_cfg()).eval()
    with pytest.raises(ValueError, match="MTP block"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4, speculative=True)
