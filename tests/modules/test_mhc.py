"""Hyper-connections (modules/mhc.py): against transformers' DeepSeek-V4 modules with copied
weights, against a float64 per-token computation of our own, Sinkhorn's doubly
stochastic output, the unconstrained variant, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from v4lab.errors import ConfigError
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import AttentionConfig, EngramConfig, KVCacheConfig, MoEConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.mhc import HyperConnection, HyperConnectionConfig, HyperHead, expand_streams, sinkhorn

DIM, N = 16, 4


def hc_cfg(**kw) -> HyperConnectionConfig:
    base = dict(enabled=True, n_streams=N, sinkhorn_iters=20, eps=1e-6, constrained=True)
    base.update(kw)
    cfg = HyperConnectionConfig(**base)
    cfg.validate("model.hc")
    return cfg


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that the coefficients are far from their init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.3)
        module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.5)
        module.scale.copy_(torch.rand(module.scale.shape, generator=g) + 0.5)


def streams(b: int = 2, t: int = 5, n: int = N, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, n, DIM, generator=g, dtype=dtype)


# ---- Sinkhorn ----------------------------------------------------------------------------------
def naive_sinkhorn(logits: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    """The same normalisation order in Python floats (float64)."""
    n = len(logits)
    p = []
    for row in logits:
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        p.append([math.exp(v - m) / z + eps for v in row])

    def cols(p):
        s = [sum(p[i][j] for i in range(n)) for j in range(n)]
        return [[p[i][j] / (s[j] + eps) for j in range(n)] for i in range(n)]

    def rows(p):
        return [[v / (sum(r) + eps) for v in r] for r in p]

    p = cols(p)
    for _ in range(iters - 1):
        p = cols(rows(p))
    return p


def test_sinkhorn_is_doubly_stochastic_and_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    # logits of the spread the model starts from (init std 0.02, n * dim of a few hundred)
    logits = torch.randn(64, N, N, generator=g) * 0.5
    p = sinkhorn(logits, 20, 1e-6)
    ref = torch.tensor([naive_sinkhorn(m.tolist(), 20, 1e-6) for m in logits.double()],
                       dtype=torch.float64)
    # fp32 softmax and 40 divisions of 4-term sums: round-off ~1e-7
    assert float((p.double() - ref).abs().max()) < 1e-6
    one = torch.ones(64, N, dtype=torch.float64)
    # the acceptance bound: rows and columns sum to 1 within 1e-5
    for m in (p.double(), ref):
        torch.testing.assert_close(m.sum(-1), one, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.sum(-2), one, rtol=0, atol=1e-5)
    assert (p > 0).all()
    # one round is only column-normalised: its rows are visibly off
    assert float((sinkhorn(logits, 1, 1e-6).sum(-1) - 1).abs().max()) > 0.01


def test_sinkhorn_converges_for_wide_logits_given_more_rounds():
    """With widely spread logits 20 rounds leave the rows off (measured: up to ~3e-2 at
    logit std 2; V4's reference does the same 20 rounds); the columns, normalised last, are
    exact, and more rounds converge."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(256, N, N, generator=g, dtype=torch.float64) * 2.0
    twenty, many = sinkhorn(logits, 20, 1e-6), sinkhorn(logits, 2000, 1e-6)
    one = torch.ones(256, N, dtype=torch.float64)
    torch.testing.assert_close(twenty.sum(-2), one, rtol=0, atol=1e-5)
    assert float((twenty.sum(-1) - 1).abs().max()) > 1e-4
    torch.testing.assert_close(many.sum(-1), one, rtol=0, atol=1e-5)
    torch.testing.assert_close(many.sum(-2), one, rtol=0, atol=1e-5)


# ---- against the reference with copied weights -------------------------------------------------
def v4_config(**kw):
    transformers = pytest.importorskip("transformers")
    fields = dict(vocab_size=50, hidden_size=DIM, moe_intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, q_lora_rank=8, n_routed_experts=6,
                  num_experts_per_tok=2, hc_mult=N, hc_sinkhorn_iters=20, hc_eps=1e-6,
                  rms_norm_eps=1e-6, o_groups=1, o_lora_rank=8, index_n_heads=2,
                  index_head_dim=8)
    fields.update(kw)
    return transformers.DeepseekV4Config(**fields)


@pytest.mark.peer
@pytest.mark.parametrize("iters", [1, 20])
def test_site_matches_transformers_hyper_connection(iters):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    ours = HyperConnection(DIM, hc_cfg(sinkhorn_iters=iters))
    randomize(ours)
    ref = DeepseekV4HyperConnection(v4_config(hc_sinkhorn_iters=iters))
    with torch.no_grad():
        ref.fn.copy_(ours.weight)
        ref.base.copy_(ours.bias)
        ref.scale.copy_(ours.scale)
    x = streams()
    y = torch.randn(2, 5, DIM)
    post_r, comb_r, collapsed_r = ref(x)
    h, (post, comb) = ours.read(x)
    out = ours.write(x, y * h, (post, comb))  # y * h: the sublayer output depends on h
    # the decoder layer's update, written as in DeepseekV4DecoderLayer.forward
    out_r = (post_r.unsqueeze(-1) * (y * collapsed_r).unsqueeze(-2)
             + torch.matmul(comb_r.transpose(-1, -2), x))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_r * g).sum().backward()
    # same operations in the same order; fp32 sums of <= 64 terms: round-off ~1e-6
    for a, b in ((post, post_r), (comb, comb_r), (h, collapsed_r), (out, out_r)):
        assert float((a - b).detach().abs().max()) < 1e-5
    # gradients through the projection and the Sinkhorn rounds (values of order 1-100)
    for mine, theirs in ((ours.weight, ref.fn), (ours.bias, ref.base), (ours.scale, ref.scale)):
        assert float((mine.grad - theirs.grad).abs().max()) < 1e-5 * float(theirs.grad.abs().max())
    assert float((comb - 1 / N).detach().abs().max()) > 0.05  # far from the uniform init
    assert float(ref.scale.grad.abs().min()) > 0
    assert float(h.detach().abs().max()) > 1.0


@pytest.mark.peer
def test_head_matches_transformers_hyper_head():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead

    ours = HyperHead(DIM, hc_cfg())
    randomize(ours, seed=3)
    ref = DeepseekV4HyperHead(v4_config())
    with torch.no_grad():
        ref.hc_fn.copy_(ours.weight)
        ref.hc_base.copy_(ours.bias)
        ref.hc_scale.copy_(ours.scale)
    x = streams(seed=4)
    with torch.no_grad():
        diff = float((ours(x) - ref(x)).abs().max())
    assert diff < 1e-5  # fp32, sums of 64 terms: ~1e-6


# ---- against a naive per-token computation ------------------------------------------------------
def naive_site(site: HyperConnection, x: torch.Tensor, y: torch.Tensor, constrained: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, X') token by token in float64 with explicit sums."""
    b, t, n, d = x.shape
    w, bias, s = site.weight.double(), site.bias.double(), site.scale.double().tolist()
    h = torch.zeros(b, t, d, dtype=torch.float64)
    out = torch.zeros(b, t, n, d, dtype=torch.float64)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for bi in range(b):
        for ti in range(t):
            xs = x[bi, ti].double()
            flat = xs.reshape(-1)
            z = flat / math.sqrt(float((flat * flat).mean()) + site.norm_eps)
            a = (w @ z + 0).tolist()
            bb = bias.tolist()
            pre = [sig(s[0] * a[i] + bb[i]) + site.eps for i in range(n)]
            post = [2 * sig(s[1] * a[n + i] + bb[n + i]) for i in range(n)]
            logits = [[s[2] * a[2 * n + i * n + j] + bb[2 * n + i * n + j] for j in range(n)]
                      for i in range(n)]
            if constrained:
                mat = naive_sinkhorn(logits, site.iters, site.eps)
            else:
                mat = [[logits[i][j] + (i == j) for j in range(n)] for i in range(n)]
            h[bi, ti] = sum(pre[i] * xs[i] for i in range(n))
            for k in range(n):
                out[bi, ti, k] = post[k] * y[bi, ti].double() + sum(mat[j][k] * xs[j]
                                                                     for j in range(n))
    return h, out


@pytest.mark.parametrize("constrained", [True, False])
def test_site_matches_naive_per_token_loop(constrained):
    site = HyperConnection(DIM, hc_cfg(constrained=constrained, n_streams=3))
    randomize(site, seed=7)
    x = streams(t=4, n=3, seed=8)
    y = torch.randn(2, 4, DIM)
    with torch.no_grad():
        h, mix = site.read(x)
        out = site.write(x, y, mix)
    h_ref, out_ref = naive_site(site, x, y, constrained)
    # fp32 against float64: relative round-off ~1e-6 of values of order 1-10
    assert float((h.double() - h_ref).abs().max()) < 1e-5
    assert float((out.double() - out_ref).abs().max()) < 1e-5
    post, res = mix
    if constrained:  # columns are normalised last (rows: see the Sinkhorn tests)
        torch.testing.assert_close(res.sum(-2), torch.ones(2, 4, 3), rtol=0, atol=1e-5)
    else:  # no Sinkhorn: rows do not sum to 1
        assert float((res.sum(-1) - 1).abs().max()) > 0.1


def test_double_parameters_compute_in_double():
    site = HyperConnection(DIM, hc_cfg()).double()
    randomize(site, seed=2)
    x = streams(t=3, seed=5, dtype=torch.float64)
    y = torch.randn(2, 3, DIM, dtype=torch.float64)
    with torch.no_grad():
        h, mix = site.read(x)
        out = site.write(x, y, mix)
    h_ref, out_ref = naive_site(site, x, y, True)
    assert h.dtype == torch.float64
    assert float((out - out_ref).abs().max()) < 1e-12  # float64 all the way


def test_head_matches_naive_per_token_loop():
    head = HyperHead(DIM, hc_cfg())
    randomize(head, seed=9)
    x = streams(t=3, seed=10)
    with torch.no_grad():
        y = head(x)
    w, b, s = head.weight.detach().double(), head.bias.detach().double(), float(head.scale.detach())
    for bi in range(2):
        for ti in range(3):
            xs = x[bi, ti].double()
            flat = xs.reshape(-1)
            a = w @ (flat / math.sqrt(float((flat * flat).mean()) + head.norm_eps))
            pre = torch.sigmoid(s * a + b) + head.eps
            ref = (pre[:, None] * xs).sum(0)
            assert float((y[bi, ti].double() - ref).abs().max()) < 1e-5


def test_one_stream_mhc_is_a_scaled_residual():
    """n = 1: H is the 1x1 matrix 1, so X' = X + post * f(h) with h = pre * X."""
    site = HyperConnection(DIM, hc_cfg(n_streams=1))
    randomize(site, seed=11)
    x = streams(n=1, seed=12)
    y = torch.randn(2, 5, DIM)
    with torch.no_grad():
        h, (post, res) = site.read(x)
        out = site.write(x, y, (post, res))
        pre = site.coefficients(x)[0]
    torch.testing.assert_close(res, torch.ones_like(res), rtol=0, atol=2e-6)
    torch.testing.assert_close(h, pre * x[:, :, 0])
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0] * res[..., 0] + post * y)


def test_expand_and_gradients_reach_every_parameter():
    site, head = HyperConnection(DIM, hc_cfg()), HyperHead(DIM, hc_cfg())
    randomize(site), randomize(head, seed=1)
    emb = torch.randn(2, 5, DIM, requires_grad=True)
    x = expand_streams(emb, N)
    assert x.shape == (2, 5, N, DIM) and torch.equal(x[:, :, 2], emb)
    h, mix = site.read(x)
    out = head(site.write(x, torch.tanh(h), mix))
    out.square().sum().backward()
    for p in [*site.parameters(), *head.parameters(), emb]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_autocast_keeps_coefficients_fp32():
    site = HyperConnection(DIM, hc_cfg())
    randomize(site)
    x = streams()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre, post, res = site.coefficients(x)
    assert pre.dtype == post.dtype == res.dtype == torch.float32
    torch.testing.assert_close(res, site.coefficients(x)[2])


@pytest.mark.parametrize("kw, key", [
    (dict(n_streams=0), "model.hc.n_streams"),
    (dict(sinkhorn_iters=0), "model.hc.sinkhorn_iters"),
    (dict(eps=-1.0), "model.hc.eps"),
])
def test_bad_config(kw, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed: "):
        HyperConnectionConfig(enabled=True, **kw).validate("model.hc")


# ---- in the model --------------------------------------------------------------------------------
def model_cfg(kind: str = "mha", hc: HyperConnectionConfig | None = None, hash_layers: int = 1,
              n_layers: int = 3) -> ModelConfig:
    att = AttentionConfig(kind=kind, n_heads=2, head_dim=8, kv_lora_rank=16, q_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                          kv_cache=KVCacheConfig(dtype="fp32"))
    moe = MoEConfig(enabled=True, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_dim=8,
                    first_dense_layers=0, hash_layers=hash_layers, score_func="sqrtsoftplus",
                    route_scale=1.5, swiglu_limit=1.0)
    return ModelConfig(vocab_size=50, dim=DIM, n_layers=n_layers, ffn_dim=24, max_seq_len=32,
                       init_std=0.2, attention=att, moe=moe, hc=hc or hc_cfg())


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    for i, blk in enumerate(model.blocks):  # coefficients far from their init values
        if blk.attn_hc is not None:
            randomize(blk.attn_hc, seed=100 + i), randomize(blk.ffn_hc, seed=200 + i)
    if model.hc_head is not None:
        randomize(model.hc_head, seed=300)
    return model


def test_model_with_hc_off_is_unchanged_and_on_adds_the_sites():
    off = build(model_cfg(hc=HyperConnectionConfig(enabled=False)))
    assert not any("hc" in k for k in off.state_dict())
    on = build(model_cfg())
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra == {f"blocks.{i}.{site}_hc.{p}" for i in range(3) for site in ("attn", "ffn")
                     for p in ("weight", "bias", "scale")} | {"hc_head.weight", "hc_head.bias",
                                                                 "hc_head.scale"}
    # Transformer's init reaches the sites (init_std 0.2, not the module default 0.02)
    fresh = Transformer(model_cfg())
    assert fresh.blocks[0].attn_hc.weight.std().item() == pytest.approx(0.2, rel=0.1)
    ids = torch.randint(0, 50, (2, 9))
    assert on(ids).shape == (2, 9, 50)


def sublayers(blk, ctx: ForwardContext):
    """(site, norm, sublayer) of a block's attention and FFN."""
    return ((blk.attn_hc, blk.attn_norm, lambda h: blk.attn(h, ctx, None)),
            (blk.ffn_hc, blk.ffn_norm, lambda h: blk.ffn(h, ctx)))


def naive_model_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The hyper-connected forward written with the sites' coefficients: streams as a list."""
    n = model.cfg.hc.n_streams
    ctx = ForwardContext(positions=torch.arange(ids.shape[1]), input_ids=ids)
    xs = [model.tok_emb(ids)] * n
    for blk in model.blocks:
        for site, norm, f in sublayers(blk, ctx):
            pre, post, res = site.coefficients(torch.stack(xs, dim=2))
            y = f(norm(sum(pre[..., i, None] * xs[i] for i in range(n))))
            xs = [post[..., k, None] * y + sum(res[..., j, k, None] * xs[j] for j in range(n))
                  for k in range(n)]
    return model.lm_head(model.norm(model.hc_head(torch.stack(xs, dim=2))))


@pytest.mark.parametrize("constrained", [True, False])
def test_model_forward_matches_stream_list_computation(constrained):
    model = build(model_cfg(hc=hc_cfg(constrained=constrained)))
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, ref = model(ids), naive_model_forward(model, ids)
    assert float(ref.abs().max()) > 1.0
    assert float((got - ref).abs().max()) < 1e-4  # fp32, logits of order 1-10


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("constrained", [True, False])
def test_token_by_token_decode_equals_full_forward_with_mhc_and_hash_routing(kind, constrained):
    model = build(model_cfg(kind, hc_cfg(constrained=constrained), hash_layers=2))
    assert [type(b.ffn.gate).__name__ for b in model.blocks] == ["HashGate", "HashGate", "Gate"]
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 12)
        steps = [model.forward_cached(ids[:, :3], caches, 0)]
        steps += [model.forward_cached(ids[:, i:i + 1], caches, i) for i in range(3, 12)]
    assert float(full.abs().max()) > 1.0
    # fp32 round-off only (batched vs one-row matmuls)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=5e-5, rtol=5e-5)


def test_a_few_training_steps_with_mhc_hash_routing_and_engram():
    cfg = model_cfg(hash_layers=1)
    cfg.engram = EngramConfig(enabled=True, layers=[1], ngram_orders=[2], heads_per_order=2,
                              table_size=31, head_dim=4, kernel_size=2)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=3e-3)
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(8))
    losses = []
    for step in range(30):
        ctx = ForwardContext(positions=torch.arange(15), step=step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids[:, :-1], ctx)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 50), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.blocks[0].attn_hc.weight.grad.abs().sum() > 0
        opt.step()
        model.on_train_step_end()
        losses.append(loss.item())
    stats = ctx.mean_stats()
    assert {"hc/fwd_gain", "hc/bwd_gain", "engram/gate_mean", "moe/load_cv"} <= set(stats)
    assert losses[-1] < 0.8 * losses[0]  # it learns the repeated batch


def test_composite_gain_statistics():
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    for constrained in (True, False):
        model = build(model_cfg(hc=hc_cfg(constrained=constrained)))
        ctx = ForwardContext(positions=torch.arange(9), step=0)
        with torch.no_grad():
            model(ids, ctx)
            # the product of the sites' matrices, recomputed here
            ref_ctx = ForwardContext(positions=torch.arange(9), input_ids=ids)
            x = expand_streams(model.tok_emb(ids), N)
            prod = torch.eye(N).expand(2, 9, N, N)
            for blk in model.blocks:
                for site, norm, f in sublayers(blk, ref_ctx):
                    h, mix = site.read(x)
                    x = site.write(x, f(norm(h)), mix)
                    prod = prod @ mix[1]
        stats = ctx.mean_stats()
        fwd = float(prod.abs().sum(-2).amax())
        assert stats["hc/fwd_gain"] == pytest.approx(fwd, rel=1e-5)
        assert stats["hc/bwd_gain"] == pytest.approx(float(prod.abs().sum(-1).amax()), rel=1e-5)
        if constrained:  # doubly stochastic matrices multiply to one: gain 1 (the rows of
            # these deliberately wide random sites converge to ~1e-3 in 20 Sinkhorn rounds)
            assert abs(fwd - 1) < 1e-4 and abs(stats["hc/bwd_gain"] - 1) < 1e-2
        else:
            assert abs(fwd - 1) > 0.1
    plain = ForwardContext(positions=torch.arange(9))
    with torch.no_grad():
        model(ids, plain)  # inference: nothing tracked
    assert plain.stats == {}


def test_decode_equals_full_forward_with_mhc_engram_and_hash_routing():
    cfg = model_cfg(hash_layers=2)
    cfg.engram = EngramConfig(enabled=True, layers=[0, 2], ngram_orders=[2, 3], heads_per_order=2,
                              table_size=31, head_dim=4, kernel_size=3)
    model = build(cfg)
    with torch.no_grad():
        for blk in model.blocks:  # non-zero conv and value weights: the memory matters
            if blk.engram is not None:
                assert blk.engram.n_streams == N
                blk.engram.conv.weight.normal_(std=0.5)
                blk.engram.w_v.weight.normal_(std=0.5)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 12)
        steps = [model.forward_cached(ids[:, :3], caches, 0, history=ids[:, :3])]
        steps += [model.forward_cached(ids[:, i:i + 1], caches, i, history=ids[:, :i + 1])
                  for i in range(3, 12)]
        for blk in model.blocks:
            if blk.engram is not None:
                torch.nn.init.zeros_(blk.engram.w_v.weight)
        without_memory = model(ids)
    assert float((full - without_memory).abs().max()) > 0.1
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=5e-5, rtol=5e-5)


# ---- one whole DeepSeek-V4 decoder layer, attention replaced by the same stand-in -------------
class CausalMean(torch.nn.Module):
    """Stand-in attention for both models: a linear map of the running mean over time."""

    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor, ctx=None, cache=None, **kwargs):
        mean = x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        return self.lin(mean) if not kwargs else (self.lin(mean), None)


@pytest.mark.peer
@pytest.mark.parametrize("layer", [0, 1])  # 0: hash-routed MoE, 1: learned routing
def test_block_matches_transformers_decoder_layer_with_stub_attention(layer):
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

    model = build(model_cfg(hash_layers=1, n_layers=2))
    blk = model.blocks[layer]
    with torch.no_grad():
        blk.attn_norm.weight.normal_(1.0, 0.3)
        blk.ffn_norm.weight.normal_(1.0, 0.3)
        blk.ffn.gate.proj.weight.normal_(std=0.5)
        if layer == 1:
            blk.ffn.gate.bias.normal_(std=0.1)
    cfg = v4_config(num_hidden_layers=2, vocab_size=50, moe_intermediate_size=8,
                    n_routed_experts=4, num_experts_per_tok=2, scoring_func="sqrtsoftplus",
                    routed_scaling_factor=1.5, swiglu_limit=1.0,
                    mlp_layer_types=["hash_moe", "moe"])
    ref = DeepseekV4DecoderLayer(cfg, layer)
    lin = torch.nn.Linear(DIM, DIM, bias=False)
    blk.attn, ref.self_attn = CausalMean(lin), CausalMean(lin)
    moe = blk.ffn
    with torch.no_grad():
        ref.input_layernorm.weight.copy_(blk.attn_norm.weight)
        ref.post_attention_layernorm.weight.copy_(blk.ffn_norm.weight)
        for mine, theirs in ((blk.attn_hc, ref.attn_hc), (blk.ffn_hc, ref.ffn_hc)):
            theirs.fn.copy_(mine.weight), theirs.base.copy_(mine.bias), theirs.scale.copy_(mine.scale)
        ref.mlp.gate.weight.copy_(moe.gate.proj.weight)
        if layer == 0:
            ref.mlp.gate.tid2eid.copy_(moe.gate.tid2eid)
        else:
            ref.mlp.gate.e_score_correction_bias.copy_(moe.gate.bias)
        ref.mlp.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1.transpose(1, 2),
                                                      moe.experts.w3.transpose(1, 2)], dim=1))
        ref.mlp.experts.down_proj.copy_(moe.experts.w2.transpose(1, 2))
        ref.mlp.shared_experts.gate_proj.weight.copy_(moe.shared.w1.weight)
        ref.mlp.shared_experts.up_proj.weight.copy_(moe.shared.w3.weight)
        ref.mlp.shared_experts.down_proj.weight.copy_(moe.shared.w2.weight)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    x = streams(t=9, seed=6) * 2
    with torch.no_grad():
        ours = blk(x, ForwardContext(positions=torch.arange(9), input_ids=ids))
        theirs = ref(x, input_ids=ids, position_embeddings=None)
    diff = float((ours - theirs).abs().max())
    print(f"decoder layer {layer}: max abs diff {diff:.2e}, max |out| {float(theirs.abs().max()):.1f}")
    assert float(theirs.abs().max()) > 1.0
    assert diff < 1e-5 * float(theirs.abs().max())  # fp32 round-off of O(10) outputs
