"""Hyper-connections (modules/mhc.py): against transformers' DeepSeek-V4 modules with copied
weights, against a float64 per-token computation of our own, Sinkhorn's doubly
stochastic output, the unconstrained variant, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from v4lab.errors import ConfigError
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
    with torch.no_grad():
        post_r, comb_r, collapsed_r = ref(x)
        h, (post, comb) = ours.read(x)
        out = ours.write(x, y, (post, comb))
        # the decoder layer's update, written as in DeepseekV4DecoderLayer.forward
        out_r = post_r.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb_r.transpose(-1, -2), x)
    # same operations in the same order; fp32 sums of <= 64 terms: round-off ~1e-6
    for a, b in ((post, post_r), (comb, comb_r), (h, collapsed_r), (out, out_r)):
        assert float((a - b).abs().max()) < 1e-5
    assert float((comb - 1 / N).abs().max()) > 0.05  # far from the uniform init matrix
    assert float(h.abs().max()) > 1.0


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
