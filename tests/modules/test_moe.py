"""DeepSeekMoE: routing, dispatch, balancing, accounting and config errors.

Every numerical check compares against an independent naive computation (per-token
Python routing, per-expert masked loop over all tokens, a dense SwiGLU).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from v4lab.errors import ConfigError
from v4lab.model import ModelConfig, Transformer
from v4lab.modules.args import MoEConfig
from v4lab.modules.context import ForwardContext
from v4lab.modules.ffn import SwiGLU
from v4lab.modules.moe import MoE, sequence_balance_loss

DIM = 16


def make_moe(seed: int = 0, **kw) -> MoE:
    base = dict(enabled=True, n_routed_experts=6, n_shared_experts=1, top_k=2, expert_dim=8,
                first_dense_layers=0, bias_update_rate=1e-3)
    base.update(kw)
    cfg = MoEConfig(**base)
    cfg.validate("model.moe", 2)
    torch.manual_seed(seed)
    moe = MoE(DIM, cfg)
    with torch.no_grad():  # larger router weights: distinct, well-separated scores
        moe.gate.proj.weight.normal_(std=0.5)
        moe.experts.w2.normal_(std=0.2)
    return moe


def ctx_for(t: int) -> ForwardContext:
    return ForwardContext(positions=torch.arange(t))


def expert_out(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    w1, w3, w2 = moe.experts.w1[e], moe.experts.w3[e], moe.experts.w2[e]
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def naive_route(moe: MoE, x: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Per-token routing written out in plain Python (V3 conventions)."""
    cfg_e, k, g, kg = moe.n_experts, moe.top_k, moe.gate.n_groups, moe.gate.topk_groups
    func, scale = moe.gate.score_func, moe.gate.route_scale
    bias = moe.gate.bias.tolist()
    all_idx, all_gates = [], []
    for row in x.double():
        u = (moe.gate.proj.weight.double() @ row).tolist()
        if func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in u]
        elif func == "softmax":
            z = sum(math.exp(v) for v in u)
            s = [math.exp(v) / z for v in u]
        else:
            s = [math.sqrt(math.log1p(math.exp(v))) for v in u]
        c = [si + bi for si, bi in zip(s, bias)]
        per = cfg_e // g
        eligible = list(range(cfg_e))
        if g > 1:
            gscore = [sum(sorted(c[j * per:(j + 1) * per], reverse=True)[:2]) for j in range(g)]
            kept = sorted(range(g), key=lambda j: -gscore[j])[:kg]
            eligible = [i for i in range(cfg_e) if i // per in kept]
        idx = sorted(eligible, key=lambda i: -c[i])[:k]
        tot = sum(s[i] for i in idx)
        all_idx.append(idx)
        all_gates.append([scale * s[i] / tot for i in idx])
    return all_idx, all_gates


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax", "sqrtsoftplus"])
@pytest.mark.parametrize("groups", [(1, 1), (3, 2)])
def test_router_matches_per_token_reference(score_func, groups):
    moe = make_moe(score_func=score_func, n_groups=groups[0], topk_groups=groups[1],
                   route_scale=2.5)
    with torch.no_grad():
        moe.gate.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.25, -0.1, 0.05]))
    x = torch.randn(40, DIM)
    gates, idx, scores = moe.gate(x)
    ref_idx, ref_gates = naive_route(moe, x)
    assert idx.tolist() == ref_idx
    torch.testing.assert_close(gates.double(), torch.tensor(ref_gates, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gates.sum(-1), torch.full((40,), 2.5))


def test_bias_used_for_selection_only():
    moe = make_moe(n_shared_experts=0)
    x = torch.randn(30, DIM)
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[4] = 10.0  # forces expert 4 into every token's top-2
    gates, idx, scores = moe.gate(x)
    assert (idx == 4).any(-1).all()
    # gates are the UNBIASED affinities of the selected experts, normalised
    sel = scores.gather(1, idx)
    torch.testing.assert_close(gates, sel / sel.sum(-1, keepdim=True))
    assert not moe.gate.bias.requires_grad
    assert "gate.bias" in moe.state_dict()
    assert all("bias" not in n for n, _ in moe.named_parameters())


def test_group_limited_selection_stays_in_kept_groups():
    moe = make_moe(n_routed_experts=8, top_k=3, n_groups=4, topk_groups=2)
    x = torch.randn(50, DIM)
    _, idx, _ = moe.gate(x)
    groups_used = (idx // 2).tolist()
    assert all(len(set(g)) <= 2 for g in groups_used)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax", "sqrtsoftplus"])
def test_single_expert_top1_equals_dense_swiglu(score_func):
    moe = make_moe(n_routed_experts=1, top_k=1, n_shared_experts=0, score_func=score_func)
    dense = SwiGLU(DIM, 8)
    with torch.no_grad():
        moe.experts.w1[0].copy_(dense.w1.weight.T)
        moe.experts.w3[0].copy_(dense.w3.weight.T)
        moe.experts.w2[0].copy_(dense.w2.weight.T)
    x = torch.randn(2, 7, DIM)
    torch.testing.assert_close(moe(x), dense(x))


def masked_loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert over ALL tokens, weighted by its (mostly zero) gate: the naive MoE."""
    flat = x.reshape(-1, x.shape[-1])
    gates, idx, _ = moe.gate(flat)
    out = torch.zeros_like(flat)
    for e in range(moe.n_experts):
        w = (gates * (idx == e)).sum(-1, keepdim=True)
        out = out + w * expert_out(moe, e, flat)
    if moe.shared is not None:
        out = out + moe.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize("grouped", [False, True])
def test_sorted_dispatch_matches_masked_loop_forward_and_grads(grouped):
    moe = make_moe(n_routed_experts=8, top_k=3)
    moe.experts.use_grouped_mm = grouped
    x = torch.randn(3, 11, DIM, requires_grad=True)
    g = torch.randn(3, 11, DIM)

    def grads(fn):
        moe.zero_grad()
        x.grad = None
        y = fn(moe, x)
        (y * g).sum().backward()
        return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()}

    y, gx, gp = grads(lambda m, x: m(x))
    y_ref, gx_ref, gp_ref = grads(masked_loop_reference)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert gp.keys() == gp_ref.keys() and "gate.proj.weight" in gp
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-5, atol=1e-6)


def test_unused_expert_is_fine():
    moe = make_moe(n_routed_experts=4, top_k=1, n_shared_experts=0)
    with torch.no_grad():
        moe.gate.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # everything to expert 0
    x = torch.randn(1, 5, DIM, requires_grad=True)
    y = moe(x)
    torch.testing.assert_close(y, masked_loop_reference(moe, x))
    y.sum().backward()
    assert moe.experts.w1.grad[1:].abs().sum() == 0


def test_stats_and_load_counted_only_in_training():
    moe = make_moe(n_routed_experts=6, top_k=2)
    x = torch.randn(2, 9, DIM)
    moe.eval()
    ctx = ctx_for(9)
    moe(x, ctx)
    assert moe.load.sum() == 0 and ctx.stats == {}
    moe.train()
    moe(x)  # ctx None: still counts load
    assert moe.load.sum() == 2 * 9 * 2
    ctx = ctx_for(9)
    moe(x, ctx)
    _, idx, _ = moe.gate(x.reshape(-1, DIM))
    load = torch.bincount(idx.flatten(), minlength=6).double()
    stats = ctx.mean_stats()
    assert stats["moe/load_cv"] == pytest.approx(float(load.std(unbiased=False) / load.mean()),
                                                 rel=1e-5)
    assert stats["moe/max_over_mean"] == pytest.approx(float(load.max() / load.mean()), rel=1e-5)
    assert stats["moe/dead_experts"] == float((load == 0).sum())
    assert stats["moe/bias_min"] == stats["moe/bias_max"] == 0.0
    assert "moe/aux_loss" not in ctx.aux_losses  # aux_loss_alpha = 0


def test_bias_update_rule():
    moe = make_moe(n_routed_experts=4, top_k=1, bias_update_rate=0.01)
    moe.load.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3
    moe.on_train_step_end()
    torch.testing.assert_close(moe.gate.bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert moe.load.sum() == 0
    frozen = make_moe(n_routed_experts=4, top_k=1, bias_update_rate=0.0)
    frozen.load.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0]))
    frozen.on_train_step_end()
    assert frozen.gate.bias.abs().sum() == 0 and frozen.load.sum() == 0


def test_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    moe = make_moe(n_routed_experts=8, top_k=2, n_shared_experts=0, bias_update_rate=5e-3)
    with torch.no_grad():  # router strongly prefers experts 0 and 1 for typical inputs
        direction = torch.randn(DIM)
        moe.gate.proj.weight.normal_(std=0.1)
        moe.gate.proj.weight[:2] += direction
    moe.train()

    def cv_now() -> float:
        ctx = ctx_for(64)
        with torch.no_grad():
            moe(torch.randn(4, 64, DIM) * 0.3 + direction / direction.norm(), ctx)
        moe.load.zero_()
        return ctx.mean_stats()["moe/load_cv"]

    before = cv_now()
    for _ in range(300):
        with torch.no_grad():
            moe(torch.randn(2, 32, DIM) * 0.3 + direction / direction.norm())
        moe.on_train_step_end()
    after = cv_now()
    assert before > 1.0
    assert after < 0.3 * before
    assert moe.gate.bias[:2].max() < 0 < moe.gate.bias[2:].max()


def naive_balance_loss(scores, idx, batch, alpha):
    scores = scores.detach()
    n, e = scores.shape
    t, k = n // batch, idx.shape[1]
    total = 0.0
    for b in range(batch):
        s = scores[b * t:(b + 1) * t]
        ids = idx[b * t:(b + 1) * t].tolist()
        for i in range(e):
            f = e / (k * t) * sum(i in row for row in ids)
            p = float((s[:, i] / s.sum(-1)).mean())
            total += f * p
    return alpha * total / batch


def test_sequence_balance_loss_matches_formula_and_reaches_ctx():
    moe = make_moe(aux_loss_alpha=0.1, score_func="sigmoid")
    x = torch.randn(3, 5, DIM)
    _, idx, scores = moe.gate(x.reshape(-1, DIM))
    got = sequence_balance_loss(scores, idx, 3, 0.1)
    assert float(got.detach()) == pytest.approx(naive_balance_loss(scores, idx, 3, 0.1), rel=1e-5)
    # perfectly balanced routing with uniform affinities gives exactly alpha
    uniform = torch.full((4, 4), 0.5)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert float(sequence_balance_loss(uniform, balanced, 1, 0.1)) == pytest.approx(0.1)
    moe.train()
    ctx = ctx_for(5)
    moe(x, ctx)
    loss = ctx.aux_losses["moe/aux_loss"]
    assert loss.item() == pytest.approx(got.item(), rel=1e-5)
    loss.backward()
    assert moe.gate.proj.weight.grad.abs().sum() > 0


def tiny_model(**moe_kw) -> Transformer:
    moe = dict(enabled=True, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_dim=8,
               first_dense_layers=1)
    moe.update(moe_kw)
    cfg = ModelConfig(vocab_size=50, dim=DIM, n_layers=3, ffn_dim=24, max_seq_len=32,
                      moe=MoEConfig(**moe))
    cfg.attention.kind = "mha"
    cfg.attention.n_heads = 2
    cfg.attention.head_dim = 8
    torch.manual_seed(0)
    return Transformer(cfg)


def test_model_accounting_and_hooks():
    model = tiny_model()
    assert isinstance(model.blocks[0].ffn, SwiGLU)
    assert all(isinstance(b.ffn, MoE) for b in model.blocks[1:])
    per_expert = 3 * DIM * 8
    assert model.blocks[1].ffn.inactive_params_per_token() == 2 * per_expert
    dense_counted = model.num_params() - (model.tok_emb.weight.numel() - DIM)
    assert model.num_active_params() == dense_counted - 2 * (2 * per_expert)
    # residual-output init: stacked w2 scaled like the dense w2
    w2 = model.blocks[1].ffn.experts.w2
    assert w2.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.1)
    assert model.blocks[1].ffn.experts.w1.std().item() == pytest.approx(0.02, rel=0.1)
    ids = torch.randint(0, 50, (2, 8))
    model.train()
    ctx = ForwardContext(positions=torch.arange(8), step=0)
    logits = model(ids, ctx)
    assert logits.shape == (2, 8, 50)
    assert set(ctx.mean_stats()) == {"moe/load_cv", "moe/max_over_mean", "moe/dead_experts",
                                     "moe/bias_min", "moe/bias_max"}
    model.on_train_step_end()
    bias = model.blocks[1].ffn.gate.bias
    assert bias.abs().sum() > 0
    state = model.state_dict()
    assert "blocks.1.ffn.gate.bias" in state and "blocks.1.ffn.load" not in state
    clone = tiny_model()
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.blocks[1].ffn.gate.bias, bias)
    assert all(bias is not p for p in model.parameters())


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(n_routed_experts=4, top_k=5), "model.moe.top_k"),
        (dict(n_routed_experts=0, top_k=1), "model.moe.n_routed_experts"),
        (dict(n_routed_experts=8, top_k=0), "model.moe.top_k"),
        (dict(n_routed_experts=8, top_k=5, n_groups=4, topk_groups=2), "model.moe.top_k"),
        (dict(n_routed_experts=8, n_groups=3), "model.moe.n_groups"),
        (dict(n_routed_experts=8, n_groups=4, topk_groups=5), "model.moe.topk_groups"),
        (dict(expert_dim=0), "model.moe.expert_dim"),
        (dict(score_func="relu"), "model.moe.score_func"),
        (dict(first_dense_layers=5), "model.moe.first_dense_layers"),
    ],
)
def test_bad_config_fails_before_training(kw, key):
    cfg = ModelConfig(n_layers=4, moe=MoEConfig(enabled=True, **kw))
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed: "):
        cfg.validate()
    with pytest.raises(ConfigError):
        Transformer(cfg)


@pytest.mark.parametrize("grouped", [False, True])
def test_autocast_bf16_runs_and_stays_close(grouped):
    moe = make_moe(n_routed_experts=4, top_k=2)
    moe.experts.use_grouped_mm = grouped
    x = torch.randn(2, 6, DIM, requires_grad=True)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        _, idx, _ = moe.gate(x.reshape(-1, DIM))
    assert torch.equal(idx, moe.gate(x.reshape(-1, DIM))[1])  # routing stays fp32
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.02)
    y.float().sum().backward()
    assert torch.isfinite(moe.experts.w1.grad).all()
