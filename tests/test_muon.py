"""V4's Muon (v4lab.optim): Newton-Schulz against the SVD, update RMS, torch.optim.Muon and
AdamW equality where the settings coincide, per-expert slices, parameter split, resume."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from conftest import deterministic
from v4lab.errors import ConfigError
from v4lab.optim import (
    V4_NS_SCHEDULE,
    MuonAdamW,
    build_muon_adamw,
    newton_schulz,
    split_params,
)

SHAPES = [(16, 48), (48, 16), (32, 32), (64, 128), (8, 200), (100, 37)]
KELLER = (3.4445, -4.775, 2.0315)


def test_v4_schedule_is_8_fast_then_2_stabilising_steps():
    assert V4_NS_SCHEDULE == (KELLER,) * 8 + ((2.0, -1.5, 0.5),) * 2


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_singular_values_near_one(shape):
    """Against torch.linalg.svd in float64: the hybrid schedule leaves every singular value
    in [1 - 1e-4, 1 + 1e-3] (measured: [0.99999, 1.00054] for these shapes, fp32 iteration),
    and the singular vectors are those of the input (O = U V^T). Keller's 5-step schedule
    alone leaves them in ~[0.68, 1.13], which the test would reject."""
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    o = newton_schulz(g).double()
    assert o.shape == g.shape and newton_schulz(g).dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert s.min() > 1 - 1e-4 and s.max() < 1 + 1e-3, (s.min(), s.max())
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert (o - u @ vh).abs().max() < 5e-4  # the polar factor (measured max 1.5e-4)
    keller = torch.linalg.svdvals(newton_schulz(g, (KELLER,) * 5, dtype=torch.float64))
    assert keller.min() < 0.9 or keller.max() > 1.1


def test_newton_schulz_matches_a_naive_float64_loop():
    """Independent transcription: X/||X||_F, then X <- aX + bAX + cA^2X with A = X X^T."""
    torch.manual_seed(1)
    g = torch.randn(24, 40, dtype=torch.float64)
    x = g / torch.linalg.matrix_norm(g)
    for a, b, c in V4_NS_SCHEDULE:
        A = x @ x.T
        x = a * x + b * (A @ x) + c * (A @ A @ x)
    out = newton_schulz(g, dtype=torch.float64)
    assert (out - x).abs().max() < 1e-12
    assert (newton_schulz(g.T, dtype=torch.float64) - x.T).abs().max() < 1e-12  # tall = wide^T


@pytest.mark.parametrize("shape", SHAPES + [(4, 24, 40)])
def test_update_rms_is_0_18(shape):
    """One step from zero weights with no decay: the update is the parameter itself; its
    RMS per matrix is 0.18 within 1e-3 relative (measured <= 2.5e-4)."""
    torch.manual_seed(2)
    p = nn.Parameter(torch.zeros(shape))
    opt = MuonAdamW([{"params": [p], "use_muon": True}], lr=1.0, weight_decay=0.0)
    p.grad = torch.randn(shape)
    opt.step()
    rms = p.detach().reshape(-1, *shape[-2:]).pow(2).mean(dim=(-2, -1)).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.18), rtol=1e-3, atol=0), rms


def _torch_muon_pair(shape, steps=3, wd=0.1, nesterov=True):
    torch.manual_seed(3)
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(steps)]
    ref = nn.Parameter(w0.clone())
    ours = nn.Parameter(w0.clone())
    t_opt = torch.optim.Muon([ref], lr=0.02, weight_decay=wd, momentum=0.95, nesterov=nesterov,
                             adjust_lr_fn="match_rms_adamw")
    o_opt = MuonAdamW([{"params": [ours], "use_muon": True}], lr=0.02, weight_decay=wd,
                      momentum=0.95, nesterov=nesterov, ns_schedule=(KELLER,) * 5,
                      ns_dtype=torch.bfloat16, update_rms=0.2)
    for g in grads:
        ref.grad, ours.grad = g.clone(), g.clone()
        t_opt.step()
        o_opt.step()
    return ref, ours, t_opt, o_opt


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_equals_torch_muon_where_settings_coincide(shape, nesterov):
    """torch.optim.Muon with adjust_lr_fn='match_rms_adamw' is this update with Keller's
    triple for 5 steps in bf16 and gamma = 0.2: bit-identical weights and momentum."""
    ref, ours, t_opt, o_opt = _torch_muon_pair(shape, nesterov=nesterov)
    assert torch.equal(ref, ours)
    assert torch.equal(t_opt.state[ref]["momentum_buffer"], o_opt.state[ours]["momentum_buffer"])


def test_adamw_half_equals_torch_adamw():
    torch.manual_seed(4)
    w0 = torch.randn(7, 5)
    ref, ours = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    t_opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    o_opt = MuonAdamW([{"params": [ours], "use_muon": False}], lr=3e-3, weight_decay=0.1,
                      betas=(0.9, 0.95), adam_eps=1e-8)
    for _ in range(4):
        g = torch.randn(7, 5)
        ref.grad, ours.grad = g.clone(), g.clone()
        t_opt.step()
        o_opt.step()
    assert torch.equal(ref, ours)


def test_nesterov_direction_is_v4s_sum_form():
    """V4 writes M <- mu M + G and orthogonalises mu M + G; the EMA buffer kept here is
    (1 - mu) times that, which the Frobenius normalisation removes: same update within
    fp32 round-off of 10 Newton-Schulz steps (bound 1e-7 on entries of size ~0.01)."""
    torch.manual_seed(5)
    shape, mu, lr = (20, 30), 0.95, 0.01
    p = nn.Parameter(torch.zeros(shape))
    opt = MuonAdamW([{"params": [p], "use_muon": True}], lr=lr, weight_decay=0.0)
    m = torch.zeros(shape, dtype=torch.float64)
    w = torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(shape)
        p.grad = g.clone()
        opt.step()
        m = mu * m + g.double()
        w -= lr * 0.18 * math.sqrt(30) * newton_schulz(mu * m + g.double(), dtype=torch.float64)
    assert (p.double() - w).abs().max() < 1e-7  # measured 6.5e-9


def test_expert_slices_orthogonalised_independently():
    """A stack [E, n, m] gives, slice by slice, what each matrix gives alone, and every
    slice is orthogonal on its own (not the stack as one matrix). Slices of very different
    scale check the per-slice Frobenius normalisation."""
    torch.manual_seed(6)
    g = torch.randn(3, 12, 20) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    stacked = newton_schulz(g)
    for e in range(3):
        alone = newton_schulz(g[e])
        assert (stacked[e] - alone).abs().max() < 1e-6  # measured 0 (bit-identical)
        s = torch.linalg.svdvals(stacked[e].double())
        assert s.min() > 1 - 1e-4 and s.max() < 1 + 1e-3

    p = nn.Parameter(torch.zeros(3, 12, 20))
    singles = [nn.Parameter(torch.zeros(12, 20)) for _ in range(3)]
    opt = MuonAdamW([{"params": [p, *singles], "use_muon": True}], lr=0.1, weight_decay=0.1)
    for _ in range(2):
        g = torch.randn(3, 12, 20)
        p.grad = g.clone()
        for e in range(3):
            singles[e].grad = g[e].clone()
        opt.step()
    for e in range(3):
        assert (p[e] - singles[e]).abs().max() < 1e-6


def _train(opt_model, opt, steps, seed=7):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 16, generator=gen)
        opt.zero_grad()
        opt_model(x).pow(2).mean().backward()
        opt.step()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16))])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.norm(x))


def test_state_dict_round_trip_resumes_bit_identically():
    """Two steps, save (model + optimizer through torch.save), load into fresh objects, two
    more == four uninterrupted steps, bit for bit."""
    torch.manual_seed(8)
    base = Tiny()
    straight = copy.deepcopy(base)
    opt = build_muon_adamw(straight, lr=0.01, weight_decay=0.1)
    _train(straight, opt, 4)

    first = copy.deepcopy(base)
    opt1 = build_muon_adamw(first, lr=0.01, weight_decay=0.1)
    gen_state = 7
    _train(first, opt1, 2, seed=gen_state)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = Tiny()
    resumed.load_state_dict(saved["model"])
    opt2 = build_muon_adamw(resumed, lr=0.01, weight_decay=0.1)
    opt2.load_state_dict(saved["opt"])
    # the same data stream: skip the two batches already seen
    gen = torch.Generator().manual_seed(gen_state)
    for _ in range(2):
        torch.randn(4, 16, generator=gen)
    for _ in range(2):
        x = torch.randn(4, 16, generator=gen)
        opt2.zero_grad()
        resumed(x).pow(2).mean().backward()
        opt2.step()
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert any("momentum_buffer" in s for s in opt2.state.values())


def test_split_muon_for_block_matrices_adamw_for_the_rest():
    torch.manual_seed(9)
    muon, adamw = split_params(Tiny())
    assert [n for n, _ in muon] == ["blocks.0.0.weight", "blocks.0.2.weight"]
    assert {n for n, _ in adamw} == {"emb.weight", "blocks.0.0.bias", "blocks.0.2.bias",
                                     "norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_split_on_the_lab_model_with_moe_and_engram():
    """Routed-expert stacks and attention/FFN/router matrices go to Muon; the Engram table
    (an embedding, with its lr multiplier), its depthwise conv, norms, the token embedding
    and the LM head stay on AdamW; every parameter lands in exactly one."""
    from v4lab.model import ModelConfig, Transformer
    from v4lab.modules.args import EngramConfig, MoEConfig

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, ffn_dim=48, max_seq_len=32,
                      moe=MoEConfig(enabled=True, n_routed_experts=4, top_k=2, expert_dim=16,
                                    first_dense_layers=1),
                      engram=EngramConfig(enabled=True, layers=[1]))
    model = Transformer(cfg)
    muon, adamw = split_params(model)
    mnames, anames = {n for n, _ in muon}, {n for n, _ in adamw}
    assert not mnames & anames
    assert mnames | anames == {n for n, _ in model.named_parameters()}
    assert {"blocks.1.ffn.experts.w1", "blocks.1.ffn.experts.w2", "blocks.1.ffn.experts.w3",
            "blocks.1.ffn.gate.proj.weight", "blocks.0.attn.wkv_a.weight",
            "blocks.0.ffn.w1.weight", "blocks.1.engram.w_k.weight"} <= mnames
    assert {"tok_emb.weight", "lm_head.weight", "norm.weight", "blocks.0.attn_norm.weight",
            "blocks.1.engram.table.weight", "blocks.1.engram.conv.weight"} <= anames
    assert all(p.dim() in (2, 3) for _, p in muon)
    assert not any("conv" in n or "norm" in n for n in mnames)
    opt = build_muon_adamw(model, lr=1e-3, weight_decay=0.1)
    engram_group = [g for g in opt.param_groups if any(p is model.blocks[1].engram.table.weight
                                                        for p in g["params"])]
    assert engram_group[0]["lr"] == pytest.approx(1e-3 * cfg.engram.lr_multiplier)
    assert engram_group[0]["weight_decay"] == 0.0 and not engram_group[0]["use_muon"]
    counted = sum(len(g["params"]) for g in opt.param_groups)
    assert counted == len(list(model.parameters()))


def test_muon_without_matrices_is_a_config_error():
    class NoMatrices(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.blocks = nn.ModuleList([nn.LayerNorm(4)])

    with pytest.raises(ConfigError, match="trainer.optimizer='muon'.*no matrix parameter"):
        build_muon_adamw(NoMatrices(), lr=1e-3, weight_decay=0.0)


def test_muon_group_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(5))], "use_muon": True}])


# ---- trainer.optimizer=muon end to end (smoke size) ----------------------------------------

def test_trainer_optimizer_is_validated():
    from v4lab.config import TrainerConfig

    with pytest.raises(ConfigError, match="trainer.optimizer='sgd'"):
        TrainerConfig(optimizer="sgd").validate()
    with pytest.raises(ConfigError, match="trainer.optimizer='muon'.*fsdp"):
        TrainerConfig(optimizer="muon", strategy="fsdp", accelerator="gpu").validate()
    TrainerConfig(optimizer="muon").validate()


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory, smoke_overrides):
    from v4lab.io import compose
    from v4lab.train import train

    run_dir = tmp_path_factory.mktemp("muon_run")
    cfg = compose(["+experiment=baseline", *smoke_overrides, "trainer.optimizer=muon"])
    return run_dir, train(cfg, run_dir)


def test_smoke_training_with_muon(muon_run):
    run_dir, metrics = muon_run
    assert metrics["train/steps"] == 12
    assert metrics["val/loss"] < math.log(512)  # learned something over a 512-token vocabulary
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["use_muon"] for g in groups].count(True) == 1
    assert sum("momentum_buffer" in s for s in ckpt["optimizer_states"][0]["state"].values()) > 0


def test_muon_kill_and_resume_equals_uninterrupted(muon_run, tmp_path, smoke_overrides):
    from conftest import Crash
    from v4lab.io import compose
    from v4lab.train import train

    _, metrics = muon_run
    cfg = compose(["+experiment=baseline", *smoke_overrides, "trainer.optimizer=muon"])
    run_dir = tmp_path / "resumed"
    with pytest.raises((KeyboardInterrupt, SystemExit, Exception)):
        train(cfg, run_dir, extra_callbacks=[Crash(at=7)])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    resumed = train(cfg, run_dir)
    assert resumed["train/steps"] == 12
    assert deterministic(resumed) == deterministic(metrics)
